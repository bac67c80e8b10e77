"""Reranking benchmark on the Nitro corpus (issue 16).

The held-out dev set of bench_retrieval.py (same split, same gold labels), on the plain and the
question-augmented index: the server's fused order (hybrid weighted) against its top
``--candidates`` reordered by the finetuned cross-encoder (``--reranker``, the folder
``docqa train rebuild --recipe reranker-nitro`` writes) and, on the first ``--llm`` questions,
by the embedded SmolLM2's yes/no log-probability. recall@1/@3 and MRR within the candidates;
per-query retrieval latency (embed + BM25 + FAISS + fusion + rerank) p50/p95, one thread.

    OMP_NUM_THREADS=1 DOCQA_EMBEDDER__QUERY_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py \
        --reranker runs/reranker-nitro/reranker/model [--candidates 10] [--llm 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.data import DEFAULT_DOCS, DEFAULT_QA, load_qa, split_qa  # noqa: E402
from docqa.settings import load_settings  # noqa: E402
from eval.rerank import LlamaYesNoReranker, evaluate_order  # noqa: E402
from retrieval.builder import build_index, default_tokenizer  # noqa: E402
from retrieval.factory import build_retriever, load_embedder, load_reranker  # noqa: E402
from retrieval.questions import retrieval_devset  # noqa: E402

SETTINGS = load_settings()


def row(index: str, order: str, n: int, r: dict) -> str:
    return (
        f"| {index} | {order} | {n} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | "
        f"{r['mrr']:.3f} | {r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} |"
    )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--reranker", default=None, help="cross-encoder folder (default: configured)")
    ap.add_argument("--candidates", type=int, default=10, help="fused candidates reranked")
    ap.add_argument("--llm", type=int, default=0, help="questions for the LLM yes/no reranker")
    ap.add_argument(
        "--llm-candidates", type=int, default=None, help="its candidates (default: same)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads")
    ap.add_argument("--skip-plain", action="store_true", help="question-augmented index only")
    ap.add_argument(
        "--only-llm", action="store_true", help="plain index, the --llm subset rows only"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = load_qa(DEFAULT_QA, duplicates=True)
    train, held = split_qa(pairs)
    tok = default_tokenizer()
    emb = load_embedder(SETTINGS.embedder)
    ce = load_reranker(SETTINGS, args.reranker)
    llm = LlamaYesNoReranker(n_threads=args.threads) if args.llm else None
    plain = build_index(DEFAULT_DOCS, emb, tok, progress=False)
    items = retrieval_devset(held, plain.chunks)
    print(f"dev set: {len(items)} held-out questions; {len(plain)} chunks; embedder {emb.name}")
    print(f"reranked: the fused top {args.candidates}; cross-encoder: {ce and ce.name}")
    print(f"threads: {args.threads}; query embedding: {emb.warm()}\n")
    print("| index | order | questions | recall@1 | recall@3 | MRR | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    indexes = [] if args.skip_plain else [("plain", plain)]
    if not args.only_llm:
        augmented = build_index(DEFAULT_DOCS, emb, tok, progress=False, questions=train)
        indexes.append(("question-augmented", augmented))
    k = args.candidates
    for name, index in indexes:
        fused = build_retriever(index, SETTINGS, emb, reranker=False).with_config(
            rerank_candidates=k
        )
        evaluate_order(fused, items[:20], k)  # warm-up
        if not args.only_llm:
            print(row(name, "fused (hybrid weighted)", len(items), evaluate_order(fused, items, k)))
        if ce is not None and not args.only_llm:
            r = fused.with_reranker(ce)
            evaluate_order(r, items[:5], k)
            print(row(name, "cross-encoder", len(items), evaluate_order(r, items, k)))
        if llm is not None:
            sub, kl = items[: args.llm], args.llm_candidates or k
            f = fused.with_config(rerank_candidates=kl)
            tag = f"(first {len(sub)}, top {kl})"
            print(row(name, f"fused {tag}", len(sub), evaluate_order(f, sub, kl)))
            r = f.with_reranker(llm)
            print(
                row(name, f"LLM yes/no, SmolLM2-135M {tag}", len(sub), evaluate_order(r, sub, kl))
            )
            if ce is not None:
                r = f.with_reranker(ce)
                print(row(name, f"cross-encoder {tag}", len(sub), evaluate_order(r, sub, kl)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
