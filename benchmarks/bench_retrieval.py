"""Retrieval benchmark on the Nitro corpus.

Prints recall@1/3/5 and MRR for BM25, dense and hybrid on a dev set built from the held-out
Nitro Q&A pairs, for the plain index and for the question-augmented one (the train pairs
attached to their chunks; the held-out pairs never are); the same after the manual audit of
the dev set (eval/data/nitro_retrieval_audit.yaml); a larger train-internal check (half of
the train pairs attached, the other half asked); retrieval latency p50/p95 (query embed +
BM25 + FAISS + fusion), and BM25 query latency at 10k and 100k synthetic chunks against
rank-bm25.

    .venv/bin/python benchmarks/bench_retrieval.py [--all-pairs] [--skip-scale] [--show-audit]
        [--embedder DIR]   # e.g. the folder `docqa train embedder` wrote
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.data import DEFAULT_DOCS, DEFAULT_QA, load_qa, split_qa  # noqa: E402
from docqa.settings import load_settings  # noqa: E402
from eval.devsets import audited_devset, load_audit, question_key  # noqa: E402
from retrieval.bm25 import BM25  # noqa: E402
from retrieval.builder import build_index, default_tokenizer  # noqa: E402
from retrieval.factory import build_retriever, load_embedder  # noqa: E402
from retrieval.index import assemble  # noqa: E402
from retrieval.questions import attach_questions, retrieval_devset  # noqa: E402
from retrieval.search import Retriever  # noqa: E402

SETTINGS = load_settings()


def systems(ret: Retriever) -> dict[str, Retriever]:
    """The configured retriever (the server's settings) and the alternatives it is compared to."""
    w = ret.config.weights(ret.has_questions)
    rrf = ret.with_config(
        fusion="rrf", bm25_weight=1.0, dense_weight=1.0, question_dense_weight=1.0
    )
    return {
        "bm25": ret.with_config(mode="bm25"),
        "dense": ret.with_config(mode="dense"),
        f"hybrid rrf (k={ret.config.rrf_k}, w=1/1)": rrf,
        f"hybrid {ret.config.fusion} (default, w={w[0]:g}/{w[1]:g})": ret,
    }


def recall_table(ret: Retriever, items, ks=(1, 3, 5)) -> dict[str, dict[str, float]]:
    out = {}
    for mode, system in systems(ret).items():
        hits = {k: 0 for k in ks}
        path_hits = 0
        rr = 0.0
        for it in items:
            found = system.search(it.question, max(ks)).hits
            ids = [h.chunk.id for h in found]
            path_hits += bool({h.chunk.path for h in found[:3]} & set(it.gold_paths))
            gold = set(it.gold_ids)
            for k in ks:
                hits[k] += bool(gold & set(ids[:k]))
            rank = next((i for i, c in enumerate(ids, 1) if c in gold), None)
            rr += 1 / rank if rank else 0
        out[mode] = {
            **{f"recall@{k}": hits[k] / len(items) for k in ks},
            "mrr": rr / len(items),
            "doc_recall@3": path_hits / len(items),
        }
    return out


def scale_bench(n_docs: int, rng: np.random.Generator, n_queries: int = 20):
    from rank_bm25 import BM25Okapi

    vocab = [f"t{i}" for i in range(30000)]
    p = 1 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    corpus = [list(rng.choice(vocab, size=120, p=p)) for _ in range(n_docs)]
    queries = [list(rng.choice(vocab[:5000], size=5)) for _ in range(n_queries)]
    ours = BM25.build(corpus)
    ref = BM25Okapi(corpus)
    t_ours, t_ref = [], []
    for q in queries:
        t0 = time.perf_counter()
        s1 = ours.scores(q)
        np.argpartition(-s1, 10)[:10]
        t_ours.append((time.perf_counter() - t0) * 1000)
    for q in queries[:5]:
        t0 = time.perf_counter()
        s2 = ref.get_scores(q)
        t_ref.append((time.perf_counter() - t0) * 1000)
        np.testing.assert_allclose(ours.scores(q), s2, rtol=1e-7, atol=1e-9)
    return statistics.median(t_ours), statistics.median(t_ref)


def print_table(table) -> None:
    print("| retriever | recall@1 | recall@3 | recall@5 | MRR | doc recall@3 |")
    print("|---|---|---|---|---|---|")
    for mode, r in table.items():
        print(
            f"| {mode} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | {r['recall@5']:.3f} "
            f"| {r['mrr']:.3f} | {r['doc_recall@3']:.3f} |"
        )


def latency(ret: Retriever, items) -> list[float]:
    lat = []
    for _ in range(2):
        for it in items:
            t0 = time.perf_counter()
            ret.search(it.question, 5)
            lat.append((time.perf_counter() - t0) * 1000)
    return lat[len(items) :]  # second pass: warm


def show_audit(pairs) -> None:
    audit = load_audit()
    by_key = {question_key(p.question): p.question for p in pairs}
    for key, v in audit["misses"].items():
        print(f"{v['verdict']:>12}  {by_key.get(key, '?')}  ({v.get('note', '')})")
        for path, heading in v.get("sections", []):
            print(f"{'':>14}-> {path} > {heading}")
    hits = audit["hits_sampled"]
    print(f"\nsampled hits ({hits['verdict']}): {len(hits['keys'])}")
    for key in hits["keys"]:
        print(f"{'':>14}{by_key.get(key, '?')}")


def train_internal(plain, train, emb) -> None:
    """Half of the train pairs attached, the other half asked: ~5x the held-out dev set."""
    half = [int(question_key(p.question), 16) % 2 for p in train]
    attached = [p for p, h in zip(train, half) if h == 0]
    asked = [p for p, h in zip(train, half) if h == 1]
    qs = attach_questions(attached, plain.chunks, emb)
    index = assemble(plain.chunks, plain.embeddings, plain.manifest, qs)
    items = retrieval_devset(asked, plain.chunks)
    print(
        f"\ntrain-internal check: {qs.n_attached} train questions attached, {len(items)} other "
        "train questions asked\n"
    )
    print_table(recall_table(build_retriever(index, SETTINGS, emb), items))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all-pairs", action="store_true", help="use all 3,000 pairs, not held-out")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--show-audit", action="store_true", help="print the audit and exit")
    ap.add_argument("--embedder", default=None, help="embedder name or folder (default: MiniLM)")
    args = ap.parse_args()
    pairs = load_qa(DEFAULT_QA, duplicates=True)  # every answer of a repeated question
    if args.show_audit:
        return show_audit(pairs)
    tok = default_tokenizer()
    emb = load_embedder(SETTINGS.embedder, args.embedder)
    train, held = split_qa(pairs)
    plain = build_index(DEFAULT_DOCS, emb, tok, progress=False)
    augmented = build_index(DEFAULT_DOCS, emb, tok, progress=False, questions=train)
    items = retrieval_devset(pairs if args.all_pairs else held, plain.chunks)
    print(f"corpus: {DEFAULT_DOCS} -> {len(plain)} chunks (300 tokens, 30 overlap)")
    print(
        f"dev set: {len(items)} questions ({'all' if args.all_pairs else 'held-out'} pairs "
        f"with a gold chunk)"
    )
    print(f"embedder: {emb.name}; query embedding: {emb.warm()}")
    clear = [it for it in items if it.containment >= 0.5]
    for name, index in (("plain index", plain), ("question-augmented index", augmented)):
        ret = build_retriever(index, SETTINGS, emb)
        extra = ""
        if index.questions is not None:
            extra = f": {index.questions.n_attached} train questions attached"
        print(f"\n{name}{extra}\n")
        print_table(recall_table(ret, items))
        sub = recall_table(ret, clear)
        print(
            f"\nquestions with a clear gold chunk (containment >= 0.5, n={len(clear)}): "
            + ", ".join(f"{m} r@3 {r['recall@3']:.3f}" for m, r in sub.items())
        )
        if index.questions is not None and not args.all_pairs:
            audited = audited_devset(items, index.chunks, load_audit())
            print(
                f"\nafter the manual audit of the default's misses (n={len(audited)}; "
                "other systems' misses are not audited, so their figures are lower bounds):\n"
            )
            print_table(recall_table(ret, audited))
        lat = latency(ret, items)
        print(
            f"\nhybrid retrieval latency over {len(lat)} queries: p50 "
            f"{np.percentile(lat, 50):.2f} ms, p95 {np.percentile(lat, 95):.2f} ms "
            "(embed + BM25 + FAISS + fusion)"
        )
    if not args.all_pairs:
        if args.embedder:
            print("\n(an embedder trained on the train pairs has seen the questions asked below)")
        train_internal(plain, train, emb)
    if not args.skip_scale:
        rng = np.random.default_rng(0)
        print(
            "\n| chunks | docqa BM25 p50 (ms) | rank-bm25 p50 (ms) | speed-up |\n|---|---|---|---|"
        )
        for n in (10_000, 100_000):
            ours, ref = scale_bench(n, rng)
            print(f"| {n:,} | {ours:.2f} | {ref:.1f} | {ref / ours:.0f}x |")


if __name__ == "__main__":
    main()
