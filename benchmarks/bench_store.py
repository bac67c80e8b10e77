"""The shared PostgreSQL store against local index files, same machine, same run, on the
Nitro corpus: ingest throughput (chunks/s), load time, retrieval p50 and recall on the Nitro
dev set (the in-memory index is built from either by the same code: the figures must match),
and how long a change written by one replica takes to be served by a second one.

Starts its own PostgreSQL 15 (tests/pgserver.py) unless ``--database-url`` is given.

    .venv/bin/python benchmarks/bench_store.py [--database-url postgresql://...] [--docs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.data import DEFAULT_DOCS, load_qa, split_qa  # noqa: E402
from docqa.settings import Settings  # noqa: E402
from retrieval.builder import build_index, default_tokenizer, update_index  # noqa: E402
from retrieval.factory import build_retriever  # noqa: E402
from retrieval.index import load_index, save_index  # noqa: E402
from retrieval.loaders import load_tree  # noqa: E402
from retrieval.pgstore import PgStore, Watcher  # noqa: E402
from retrieval.questions import retrieval_devset  # noqa: E402
from server.services.index import IndexService  # noqa: E402


def p50(xs):
    return statistics.median(xs)


def recall(ret, items, k=3) -> float:
    return sum(
        bool(set(it.gold_ids) & {h.chunk.id for h in ret.search(it.question, k).hits})
        for it in items
    ) / len(items)


def search_ms(ret, items) -> list[float]:
    out = []
    for _ in range(2):
        for it in items:
            t0 = time.perf_counter()
            ret.search(it.question, 5)
            out.append((time.perf_counter() - t0) * 1000)
    return out[len(items) :]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database-url")
    ap.add_argument("--docs", type=int, default=20, help="documents ingested one by one")
    ap.add_argument("--changes", type=int, default=10, help="changes timed to the 2nd replica")
    args = ap.parse_args()

    pg = None
    url = args.database_url
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from pgserver import PostgresServer

        pg = PostgresServer().init().start()
        url = pg.url
    try:
        run(url, args)
    finally:
        if pg is not None:
            pg.close()


def run(url: str, args) -> None:
    from retrieval.embedder import Embedder

    emb, tok = Embedder(), default_tokenizer()
    settings = Settings()
    t0 = time.perf_counter()
    full = build_index(DEFAULT_DOCS, emb, tok, progress=False)
    print(
        f"Nitro index: {len(full)} chunks, {len(full.files)} files "
        f"(built in {time.perf_counter() - t0:.1f}s)"
    )

    # -- whole-index write and load -----------------------------------------------------------
    r = settings.retrieval
    store = PgStore(url, r.db_pool_size, r.db_connect_timeout_s).open()
    store.migrate()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ix"
        t0 = time.perf_counter()
        save_index(full, out)
        t_save_files = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.save(full)
        t_save_pg = time.perf_counter() - t0
        t0 = time.perf_counter()
        from_files = load_index(out, mmap=False)
        t_load_files = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, from_pg = store.load()
        t_load_pg = time.perf_counter() - t0
    n = len(full)
    print("\n| | local files | PostgreSQL |")
    print("|---|---|---|")
    print(
        f"| write whole index ({n} chunks) | {t_save_files:.2f}s ({n / t_save_files:.0f} chunks/s) "
        f"| {t_save_pg:.2f}s ({n / t_save_pg:.0f} chunks/s) |"
    )
    print(f"| load into memory (BM25 + vectors) | {t_load_files:.2f}s | {t_load_pg:.2f}s |")

    # -- ingest: documents one by one (chunk, embed, write) -------------------------------------
    docs = load_tree(DEFAULT_DOCS)[: args.docs]
    paths = [d.path for d in docs]
    base = update_index(full, emb, tok, remove=paths)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ix"
        save_index(base, out)
        cur, t0, chunks_files = base, time.perf_counter(), 0
        for d in docs:
            new = update_index(cur, emb, tok, add=[d])
            save_index(new, out)
            chunks_files += len(new) - len(cur)
            cur = new
        t_ing_files = time.perf_counter() - t0
        files_after = load_index(out, mmap=False)
    store.save(base)
    svc = IndexService(
        build_retriever(base, settings, emb), None, store=store, version=store.version()
    )
    t0, chunks_pg = time.perf_counter(), 0
    for d in docs:
        before = len(svc.index)
        with svc.write_lock:
            svc.update(lambda b, d=d: update_index(b, emb, tok, add=[d]))
        chunks_pg += len(svc.index) - before
    t_ing_pg = time.perf_counter() - t0
    print(
        f"| ingest {len(docs)} documents one by one ({chunks_files} chunks: chunk + embed + "
        f"write) | {t_ing_files:.1f}s ({chunks_files / t_ing_files:.1f} chunks/s) "
        f"| {t_ing_pg:.1f}s ({chunks_pg / t_ing_pg:.1f} chunks/s) |"
    )

    # -- retrieval from memory: same scores, same recall, same speed ------------------------------
    pairs = split_qa(load_qa(duplicates=True))[1]
    items = retrieval_devset(pairs, full.chunks)
    r_files = build_retriever(from_files, settings, emb)
    r_pg = build_retriever(from_pg, settings, emb)

    def same(x, y) -> bool:
        return all(
            [(h.chunk.id, h.score) for h in x.search(it.question, 5).hits]
            == [(h.chunk.id, h.score) for h in y.search(it.question, 5).hits]
            for it in items
        )

    same_built = same(r_files, r_pg)
    same_ingested = same(
        build_retriever(files_after, settings, emb),
        build_retriever(store.load()[1], settings, emb),
    )
    lf, lp = search_ms(r_files, items), search_ms(r_pg, items)
    print(
        f"| recall@3 on the Nitro dev set ({len(items)} questions) | {recall(r_files, items):.3f} "
        f"| {recall(r_pg, items):.3f} |"
    )
    print(
        f"| retrieval p50 (query embed + BM25 + FAISS + fusion) | {p50(lf):.1f} ms "
        f"| {p50(lp):.1f} ms |"
    )
    print(
        "\nsame top-5 chunks and scores for every dev question: whole index "
        f"{same_built}, after the same {len(docs)} ingests {same_ingested}"
    )

    # -- a change reaching a second replica ----------------------------------------------------
    b = IndexService(
        build_retriever(from_pg, settings, emb),
        None,
        store=PgStore(url, r.db_pool_size, r.db_connect_timeout_s).open(),
        version=store.version(),
    )
    b.watcher = Watcher(
        url, b.refresh, r.db_refresh_s, r.db_retry_s, r.db_connect_timeout_s
    ).start()
    time.sleep(1.0)
    lags, cur = [], from_pg
    for i in range(args.changes):
        d = docs[i // 2 % len(docs)]
        change = dict(remove=[d.path]) if d.path in cur.files else dict(add=[d])
        new = update_index(cur, emb, tok, **change)
        with store.transaction() as tx:
            tx.apply(cur, new)
        t0 = time.perf_counter()  # committed: the NOTIFY is on its way
        while b.version != tx.version:
            time.sleep(0.002)
        lags.append((time.perf_counter() - t0) * 1000)
        cur = new
    print(
        f"\nchange committed -> served by the second replica (NOTIFY, reload of ~{len(cur)} "
        f"chunks, BM25/FAISS rebuilt), {len(lags)} changes: p50 {p50(lags):.0f} ms, "
        f"max {max(lags):.0f} ms"
    )
    b.close()
    store.close()


if __name__ == "__main__":
    main()
