"""Grounded answers through the batch engine vs the single engine, in process (issue 19 item
4): the same grounded requests (the dev grounded-fact questions, evidence layout, BM25, top 3,
``max_tokens`` 32, greedy), with the unit KV caches (warmed first) and with plain prefill; the
single engine one request at a time, an 8-slot batch engine with 8 at once.

    DOCQA_MODEL__N_THREADS=1 .venv/bin/python benchmarks/bench_batch_grounded.py \\
        [--index var/nitro-index] [--answers 48]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import types
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.settings import load_settings  # noqa: E402
from models.store import ModelStore  # noqa: E402
from retrieval.index import load_index  # noqa: E402
from retrieval.search import Retriever, SearchConfig  # noqa: E402
from server.batch_engine import BatchEngine  # noqa: E402
from server.generation import GenParams  # noqa: E402
from server.runtime import ModelRuntime  # noqa: E402
from server.services.index import IndexService  # noqa: E402
from server.services.rag import Grounding, RagService  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--answers", type=int, default=48)
    args = ap.parse_args()
    if args.index is None:
        from retrieval.corpus import nitro_index

        args.index = nitro_index()
    kv_dir = Path(tempfile.mkdtemp(prefix="bench-batch-kv-"))
    s = load_settings(
        model={"n_parallel": 1},
        retrieval={"mode": "bm25", "kv_cache": True, "kv_cache_dir": str(kv_dir)},
    )
    ms = s.model
    rt = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 256, kv_dir)
    index = load_index(args.index)
    dummy = types.SimpleNamespace(dim=index.embeddings.shape[1], name="none", fingerprint=None)
    retriever = Retriever(index, dummy, SearchConfig.from_settings(s.retrieval))
    rag = RagService(s.retrieval, IndexService(retriever, None))
    qs = [it["q"] for it in yaml.safe_load((ROOT / "eval/data/grounded_facts.yaml").read_text())]

    def params(q: str, kv: bool) -> GenParams:
        hits = rag.search(q).hits
        msgs, used, ev = rag.build_messages(
            rt, [{"role": "user", "content": q}], hits, rag.evidence(q, hits)
        )
        prompt = rt.format_chat(msgs)
        tokens = rt.prompt_tokens(prompt)
        p = GenParams(tokens, 32, temperature=0.0, loop_repeats=s.retrieval.loop_repeats)
        if kv:
            p.kv_plan = rag.kv_plan(rt, prompt, tokens, Grounding(used, None, 1.0, ev))
        return p

    async def load(engine, ps, conc):
        sem = asyncio.Semaphore(conc)

        async def one(p):
            async with sem:
                async for _ in engine.submit(p):
                    pass

        await asyncio.gather(*(one(p) for p in ps))

    def batch(kv: bool) -> list[GenParams]:
        return [params(qs[i % len(qs)], kv) for i in range(args.answers)]

    asyncio.run(load(rt.engine, [params(q, True) for q in qs], 1))  # every unit cached
    be = BatchEngine(rt.llm, 256, n_seq=8, n_batch=ms.n_batch, n_threads=ms.n_threads, kv=rt.kv)
    rows = []
    for name, engine, conc in (("single, 1 at a time", rt.engine, 1), ("batch, 8 at once", be, 8)):
        for kv in (True, False):
            t0 = time.perf_counter()
            asyncio.run(load(engine, batch(kv), conc))
            rate = args.answers / (time.perf_counter() - t0)
            rows.append((name, "unit KV" if kv else "plain prefill", rate))
            print(f"{name:22s} {rows[-1][1]:14s} {rate:.3f} answers/s", flush=True)
    be.close()
    rt.close()
    print("\n| engine | prompt | answers/s |\n|---|---|---|")
    for name, kind, rate in rows:
        print(f"| {name} | {kind} | {rate:.3f} |")


if __name__ == "__main__":
    main()
