"""The standard dev-split suite for one model: grounded facts, held-out QA F1, dev MCQ.
Used by `make eval` and by the training gate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from eval.qa import DEFAULT_FACT_SET


@dataclass
class SuiteConfig:
    facts: bool = True
    facts_limit: int | None = None
    facts_set: str = DEFAULT_FACT_SET
    qa_limit: int = 40
    offtopic: bool = True
    mcq_limit: int = 50
    mcq_rounds: int = 3
    temperature: float = 0.1


def evaluate_model(
    model: str,
    *,
    rag: bool,
    index: str | None,
    cfg: SuiteConfig,
    progress: bool = True,
    settings: dict | None = None,
) -> dict:
    from docqa.data import load_qa, split_qa
    from eval.mcq import read_mcq, run_letter
    from eval.qa import fact_set, load_offtopic, run_abstain, run_facts, run_qa
    from eval.resources import dev_mcq
    from eval.retrieval_eval import gold_map
    from eval.targets import open_target

    out: dict = {"model": model, "rag": rag}
    t0 = time.time()
    _, held = split_qa(load_qa())
    pairs = held[: cfg.qa_limit]
    with open_target(model, rag=rag, index=index if rag else None, settings=settings) as t:
        out["name"] = t.name
        if cfg.facts:
            f = run_facts(t, fact_set(cfg.facts_set)[: cfg.facts_limit], progress=progress)
            out["facts_accuracy"] = f["accuracy"]
            out["facts_doc_in_sources"] = f["doc_in_sources"]
            out["facts_unclean"] = f["unclean"]
            out["facts_unsupported"] = f["unsupported"] / f["n"]
            out["facts_correct"] = [r["correct"] for r in f["per_question"]]  # paired tests
        if cfg.qa_limit:
            q = run_qa(t, pairs, gold_map(index, pairs) if index else None, progress=progress)
            out.update(
                qa_f1=q["f1"],
                qa_rouge_l=q["rouge_l"],
                citation_precision=q["citation_precision"],
                abstain_in_corpus=q["abstain_in_corpus"],
            )
        if cfg.offtopic:
            out["abstain_offtopic"] = run_abstain(t, load_offtopic(), progress=progress)[
                "abstain_rate"
            ]
        if cfg.mcq_limit:
            items = read_mcq(dev_mcq())[: cfg.mcq_limit]
            m = run_letter(t, items, cfg.mcq_rounds, cfg.temperature, progress=progress)
            out.update(
                mcq_accuracy=m.to_dict()["accuracy_summary"]["mean"],
                mcq_rounds=m.accuracy,
                mcq_invalid=sum(m.invalid),
            )
    out["seconds"] = round(time.time() - t0, 1)
    return out


COLUMNS = [
    ("facts_accuracy", "grounded facts"),
    ("facts_doc_in_sources", "right doc in sources"),
    ("facts_unsupported", "naming what sources lack"),
    ("qa_f1", "QA F1"),
    ("qa_rouge_l", "ROUGE-L"),
    ("citation_precision", "citation prec."),
    ("abstain_offtopic", "abstain off-topic"),
    ("abstain_in_corpus", "abstain in-corpus"),
    ("mcq_accuracy", "dev MCQ (letter)"),
]


def table(rows: list[dict]) -> str:
    head = "| system | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            cells.append("n/a" if v is None else f"{v:.3f}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
