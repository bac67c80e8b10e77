"""Retrieval evaluation: recall@k and MRR, in-process or through /v1/retrieve."""

from __future__ import annotations

import json
from pathlib import Path

from eval.metrics import recall_at_k, reciprocal_rank
from retrieval.questions import retrieval_devset


def gold_map(index_dir: str, pairs) -> dict[str, set[str]]:
    from retrieval.index import load_index

    idx = load_index(index_dir)
    return {it.question: set(it.gold_ids) for it in retrieval_devset(pairs, idx.chunks)}


def evaluate_retrieval(
    index_dir: str, target: str | None, pairs, ks=(1, 3, 5), hits_out: Path | None = None
) -> dict:
    """recall@k and MRR of the served retriever (``target``) or of the one
    ``retrieval.factory`` builds from the settings; ``hits_out`` gets each question's ranked
    chunk ids (JSONL)."""
    from retrieval.index import load_index

    idx = load_index(index_dir)
    items = retrieval_devset(pairs, idx.chunks)
    if target:
        from eval.targets import Target

        base = target.rstrip("/") + ("" if target.rstrip("/").endswith("/v1") else "/v1")
        t = Target("server", base, "docqa")

        def ranked(q):
            return [d["id"] for d in t.retrieve(q, max(ks))]
    else:
        from docqa.settings import load_settings
        from retrieval.factory import build_retriever

        ret = build_retriever(idx, load_settings())

        def ranked(q):
            return [h.chunk.id for h in ret.search(q, max(ks)).hits]

    rows = [(ranked(it.question), set(it.gold_ids)) for it in items]
    if hits_out is not None:
        with open(hits_out, "w") as f:
            for it, (ids, gold) in zip(items, rows):
                f.write(json.dumps({"question": it.question, "hits": ids, "gold": sorted(gold)}))
                f.write("\n")
    if not rows:
        raise ValueError("no question of the dev set has a gold chunk in this index")
    out = {f"recall@{k}": sum(recall_at_k(r, g, k) for r, g in rows) / len(rows) for k in ks}
    out["mrr"] = sum(reciprocal_rank(r, g) for r, g in rows) / len(rows)
    out["n"] = len(rows)
    out["table"] = (
        "| n | "
        + " | ".join(f"recall@{k}" for k in ks)
        + " | MRR |\n|---|"
        + "---|" * (len(ks) + 1)
        + f"\n| {len(rows)} | "
        + " | ".join(f"{out[f'recall@{k}']:.3f}" for k in ks)
        + f" | {out['mrr']:.3f} |"
    )
    return out
