"""The gate: the candidate GGUF against the published one, both with RAG, on the dev split
(grounded facts, held-out QA F1, dev MCQ). Worse by more than the margin on any → refuse."""

from __future__ import annotations

from eval.suite import SuiteConfig, evaluate_model
from training.config import GateStep

METRICS = ("facts_accuracy", "qa_f1", "mcq_accuracy")


def decide(candidate: dict, published: dict, margin: float) -> dict:
    rows, passed = {}, True
    for m in METRICS:
        c, p = candidate.get(m), published.get(m)
        if c is None or p is None:
            continue
        ok = c >= p - margin
        passed &= ok
        rows[m] = {"candidate": c, "published": p, "delta": c - p, "ok": ok}
    return {"passed": bool(passed and rows), "margin": margin, "metrics": rows}


def compare(candidate_gguf: str, cfg: GateStep) -> dict:
    from retrieval.corpus import nitro_index

    index = str(nitro_index())
    suite = SuiteConfig(
        facts=cfg.facts,
        facts_limit=cfg.facts_limit,
        qa_limit=cfg.qa_limit,
        offtopic=False,
        mcq_limit=cfg.mcq_limit,
        mcq_rounds=cfg.mcq_rounds,
    )
    cand = evaluate_model(candidate_gguf, rag=True, index=index, cfg=suite, progress=False)
    pub = evaluate_model(cfg.against, rag=True, index=index, cfg=suite, progress=False)
    return decide(cand, pub, cfg.margin) | {"candidate": cand, "published": pub}
