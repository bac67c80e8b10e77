"""The reader's ablation table (issue 16 item 6): one row per system, each a real server run
by the evaluation harness (``eval.suite.evaluate_model``) with its settings given as
environment variables (the server inherits them).

    DOCQA_MODEL__N_THREADS=1 DOCQA_EMBEDDER__QUERY_THREADS=1 \
      .venv/bin/python benchmarks/bench_reader.py [--finetuned GGUF_OR_STORE_NAME] \
        [--reranker FOLDER] [--rows base,evidence,...] [--qa-limit 0] [--mcq-limit 0] \
        [--json out.json]

Rows: ``excerpts`` (the excerpts layout with evidence lines, no loop guard: the reader before
this issue's second session), ``evidence`` (the evidence layout, no loop guard), ``default``
(evidence layout + loop guard: today's defaults), ``rerank`` (+ the cross-encoder), ``cad05``
/ ``cad10`` (+ context-aware decoding, alpha 0.5 / 1.0, contrasted with the empty template),
``finetuned`` (the finetuned model, defaults), ``everything`` (finetuned + rerank + CAD 0.5).
Grounded facts, right doc in sources and answers echoing scaffolding always; QA F1, citation
precision and abstain rates with ``--qa-limit``; the dev MCQ (letter protocol) with
``--mcq-limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.settings import EXCERPTS_TEMPLATE  # noqa: E402

BASE = "smollm2-135m-instruct"
CAD05 = {"DOCQA_RETRIEVAL__CAD_ALPHA": "0.5", "DOCQA_RETRIEVAL__CAD_CONTEXT_FREE": "template"}


def rows(finetuned: str | None, reranker: str | None) -> dict[str, tuple[str, str, dict]]:
    rr = {"DOCQA_RETRIEVAL__RERANKER": reranker} if reranker else None
    out = {
        "excerpts": (
            "base, excerpts layout + evidence lines (before)",
            BASE,
            {
                "DOCQA_RETRIEVAL__USER_TEMPLATE": EXCERPTS_TEMPLATE,
                "DOCQA_RETRIEVAL__LOOP_REPEATS": "0",
            },
        ),
        "evidence": ("base, evidence layout", BASE, {"DOCQA_RETRIEVAL__LOOP_REPEATS": "0"}),
        "default": ("base, evidence layout + loop guard (defaults)", BASE, {}),
        "cad05": ("base, defaults + CAD a=0.5", BASE, CAD05),
        "cad10": (
            "base, defaults + CAD a=1.0",
            BASE,
            {**CAD05, "DOCQA_RETRIEVAL__CAD_ALPHA": "1.0"},
        ),
    }
    if rr:
        out["rerank"] = ("base, defaults + reranker", BASE, rr)
    if finetuned:
        out["finetuned"] = ("finetuned, defaults", finetuned, {})
        if rr:
            out["everything"] = ("finetuned + reranker + CAD a=0.5", finetuned, {**rr, **CAD05})
    return out


def main() -> None:
    from eval.suite import SuiteConfig, evaluate_model
    from retrieval.corpus import nitro_index

    ap = argparse.ArgumentParser()
    ap.add_argument("--finetuned", default=None)
    ap.add_argument("--reranker", default=None)
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    ap.add_argument("--qa-limit", type=int, default=0)
    ap.add_argument("--mcq-limit", type=int, default=0)
    ap.add_argument("--mcq-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    table = rows(a.finetuned, a.reranker)
    keys = a.rows.split(",") if a.rows else list(table)
    index = str(nitro_index())
    cfg = SuiteConfig(
        qa_limit=a.qa_limit,
        offtopic=a.qa_limit > 0,
        mcq_limit=a.mcq_limit,
        mcq_rounds=a.mcq_rounds,
    )
    results = []
    for k in keys:
        label, model, env = table[k]
        saved = {v: os.environ.get(v) for v in env}
        os.environ.update(env)
        try:
            r = evaluate_model(model, rag=True, index=index, cfg=cfg, progress=False)
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
        r |= {"row": k, "label": label, "env": env}
        results.append(r)
        print(json.dumps({x: y for x, y in r.items() if x != "facts_correct"}), flush=True)
    cols = [
        ("facts_accuracy", "grounded facts"),
        ("facts_doc_in_sources", "right doc in sources"),
        ("facts_unclean", "answers echoing scaffolding"),
        ("qa_f1", "QA F1"),
        ("citation_precision", "citation prec."),
        ("abstain_offtopic", "abstain off-topic"),
        ("abstain_in_corpus", "abstain in-corpus"),
        ("mcq_accuracy", "dev MCQ (letter)"),
    ]
    print("| system | " + " | ".join(c for _, c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in results:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}"))
        print(f"| {r['label']} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
