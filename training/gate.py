"""The gate: the candidate GGUF against the published one, both with RAG, on the dev split
(grounded facts, held-out QA F1, dev MCQ). Worse by more than the margin on any → refuse; with
``min_gain``, the candidate must also beat the published model on grounded facts by that much,
significantly (exact McNemar over the same questions), or the published model is kept."""

from __future__ import annotations

from eval.suite import SuiteConfig, evaluate_model
from training.config import GateStep

_EPS = 1e-9  # score differences are float sums of 1/n: 0.57 - 0.55 < 0.02
METRICS = ("facts_accuracy", "qa_f1", "mcq_accuracy")


def decide(
    candidate: dict,
    published: dict,
    margin: float,
    min_gain: float | None = None,
    alpha: float = 0.05,
) -> dict:
    from eval.metrics import mcnemar, welch

    rows, passed = {}, True
    for m in METRICS:
        c, p = candidate.get(m), published.get(m)
        if p is None:
            continue
        # a metric the published model has and the candidate lacks fails (closed); the
        # tolerance keeps a drop of exactly the margin (0.14 - 0.12) from failing on rounding
        ok = c is not None and c >= p - margin - _EPS
        passed &= ok
        rows[m] = {"candidate": c, "published": p, "delta": None if c is None else c - p, "ok": ok}
    out: dict = {"margin": margin, "metrics": rows}
    a, b = candidate.get("facts_correct"), published.get("facts_correct")
    if a is not None and b is not None:
        out["facts_paired"] = mcnemar(a, b)  # only_a: questions only the candidate gets
    ra, rb = candidate.get("mcq_rounds"), published.get("mcq_rounds")
    if ra and rb and len(ra) > 1 and len(rb) > 1:
        out["mcq_welch"] = welch(ra, rb)
    if min_gain is not None:
        gain = rows.get("facts_accuracy", {}).get("delta")
        p = out.get("facts_paired", {}).get("p")
        beats = gain is not None and p is not None and gain >= min_gain - _EPS and p < alpha
        out["beats"] = beats
        passed &= beats
        out["verdict"] = (
            f"candidate beats the published model on grounded facts by {gain:+.3f} (McNemar "
            f"p={p:.3g} < {alpha})"
            if beats
            else "the published model is kept: the candidate does not beat it on grounded facts "
            f"by {min_gain:.2f} with McNemar p < {alpha} ("
            + (f"gain {gain:+.3f}, p={p:.3g}" if gain is not None and p is not None else "no facts")
            + ")"
        )
    out["passed"] = bool(passed and rows)
    return out


def _loglik(model: str, index: str, cfg: GateStep) -> dict:
    from docqa.settings import load_settings
    from eval.mcq import read_mcq, run_loglik
    from eval.resources import dev_mcq
    from models.store import ModelStore
    from retrieval.factory import build_retriever

    s = load_settings()
    path = model if model.endswith(".gguf") else ModelStore(s.model.store_dir).resolve(model).path
    items = read_mcq(dev_mcq())[: cfg.mcq_limit]
    res = run_loglik(path, items, s.model, build_retriever(index, s), progress=False)
    return {"mcq_loglik": res.accuracy[0]}


def evaluate(model: str, cfg: GateStep, settings: dict | None = None) -> dict:
    """The gate's evaluation of one model (a GGUF path or a store name) with RAG on the Nitro
    index, served with ``settings`` over the defaults: the figures :func:`decide` compares."""
    from retrieval.corpus import nitro_index

    index = str(nitro_index())
    suite = SuiteConfig(
        facts=cfg.facts,
        facts_limit=cfg.facts_limit,
        facts_set=cfg.facts_set,
        qa_limit=cfg.qa_limit,
        offtopic=False,
        mcq_limit=cfg.mcq_limit,
        mcq_rounds=cfg.mcq_rounds,
    )
    out = evaluate_model(model, rag=True, index=index, cfg=suite, progress=False, settings=settings)
    if cfg.mcq_loglik and cfg.mcq_limit:
        out |= _loglik(model, index, cfg)
    return out


def published_model(cfg: GateStep) -> str:
    """The model the candidate must beat: ``against``, else the one the settings serve."""
    from docqa.settings import load_settings

    return cfg.against or load_settings().model.model


def compare(candidate_gguf: str, cfg: GateStep) -> dict:
    cand = evaluate(candidate_gguf, cfg, cfg.candidate_settings or None)
    pub = evaluate(published_model(cfg), cfg)
    return decide(cand, pub, cfg.margin, cfg.min_gain, cfg.alpha) | {
        "candidate": cand,
        "published": pub,
    }
