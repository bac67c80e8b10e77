"""Time to first token: bare vs grounded answers, plain prefill vs chunk KV caches (issue 19),
and the evidence layout (issue 16: the prompt holds the evidence lines, not the excerpts).

In process, on the served code path (``ModelRuntime``, its engines, ``RagService`` building
the grounded prompt with evidence lines, ``server.kvcache``), one run, interleaved per
question so that a busy machine slows every variant alike:

- TTFT (``max_tokens`` 1) of the bare question (with the shared prefix of the previous
  question's prompt cached, and, as issue 19 measured it, with a fresh prompt cache), the
  grounded prompt in the evidence layout
  (the default template), and in the excerpts layout with plain prefill, and with chunk KV
  caches cold (no entry: computed and saved) and warm (loaded);
- prefill tok/s (grounded prompt tokens / plain TTFT) and decode tok/s (bare, 64 tokens);
- answers/s with 1 (single engine, and batch engine: "1b"), 4 and 8 clients (batch engine, 8
  slots), plain vs cache, and the grounded P2 (8 clients over 1 on the batch engine);
- KV cache size per 1,000 chunks and the time ``docqa index kv`` adds to an index build.

    DOCQA_MODEL__N_THREADS=2 .venv/bin/python benchmarks/bench_ttft.py [--questions 12]
        [--index var/nitro-index] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docqa.settings import EXCERPTS_TEMPLATE, load_settings  # noqa: E402
from eval.metrics import has_facts  # noqa: E402
from models.store import ModelStore  # noqa: E402
from retrieval.factory import load_embedder  # noqa: E402
from retrieval.index import load_index  # noqa: E402
from retrieval.search import Retriever, SearchConfig  # noqa: E402
from server import kvcache  # noqa: E402
from server.batch_engine import BatchEngine  # noqa: E402
from server.generation import Delta, Finish, GenParams  # noqa: E402
from server.runtime import ModelRuntime  # noqa: E402
from server.services.index import IndexService  # noqa: E402
from server.services.rag import Grounding, RagService  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


async def _timed(engine, p: GenParams) -> tuple[float, float, int, str]:
    """-> (seconds to the first token, seconds in all, completion tokens, text)."""
    t0 = time.perf_counter()
    first, text, fin = None, [], None
    async for ev in engine.submit(p):
        if isinstance(ev, Delta):
            if first is None:
                first = time.perf_counter() - t0
            text.append(ev.text)
        elif isinstance(ev, Finish):
            fin = ev
    total = time.perf_counter() - t0
    return first if first is not None else total, total, fin.completion_tokens, "".join(text)


def run(engine, p):
    return asyncio.run(_timed(engine, p))


def answers_per_s(engine, clients: int, params: list) -> float:
    """Every request of ``params`` on ``engine``, ``clients`` at a time -> answers/s."""

    async def load():
        sem = asyncio.Semaphore(clients)

        async def one(p):
            async with sem:
                return await _timed(engine, p)

        return await asyncio.gather(*(one(p) for p in params))

    t0 = time.perf_counter()
    asyncio.run(load())
    return len(params) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--clients-answers", type=int, default=8, help="answers per client load")
    ap.add_argument("--answer-tokens", type=int, default=64, help="plain vs cache answers")
    ap.add_argument("--build-chunks", type=int, default=30, help="chunks timed for index kv")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--no-excerpts", action="store_true", help="skip the excerpts layout (plain and kv)"
    )
    ap.add_argument("--model", default=None, help="model.model (default: the settings')")
    ap.add_argument(
        "--recompute",
        type=int,
        default=0,
        help="also time unit KV caches with retrieval.kv_recompute N (0: not timed)",
    )
    ap.add_argument(
        "--p2-rounds",
        type=int,
        default=1,
        help="rounds in all of 1 and 8 clients on the batch engine for the served layout "
        "(units with --recompute): the first is the main load, each further one runs both "
        "again; each round's grounded P2 and their median",
    )
    args = ap.parse_args()
    model = {"n_parallel": 1, **({"model": args.model} if args.model else {})}

    if args.index is None:
        from retrieval.corpus import nitro_index

        args.index = nitro_index()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ttft-"))
    s = load_settings(
        model=model,
        retrieval={
            "kv_cache": True,
            "kv_cache_dir": str(tmp / "kv"),
            "mode": "bm25",
            "user_template": EXCERPTS_TEMPLATE,  # what chunk KV caches hold
        },
    )
    s_ev = load_settings(model=model, retrieval={"mode": "bm25"})  # the default

    def s_cached(recompute: int):  # the default layout with its evidence units cached
        return load_settings(
            model=model,
            retrieval={
                "mode": "bm25",
                "kv_cache": True,
                "kv_cache_dir": str(tmp / "kv"),
                "kv_recompute": recompute,
            },
        )

    s_evkv = s_cached(0)  # the caches alone (--recompute times the default's recompute)
    s_evrc = s_cached(max(args.recompute, 0))  # + later lines' heads and tags evaluated again
    ms = s.model
    rt = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 64, tmp / "kv")
    index = load_index(args.index)
    # bm25 retrieval; the embedder gives the abstain check its similarity (outside the timings)
    retriever = Retriever(index, load_embedder(s.embedder), SearchConfig.from_settings(s.retrieval))
    rag = RagService(s.retrieval, IndexService(retriever, None))
    rag_ev = RagService(s_ev.retrieval, IndexService(retriever, None))
    rag_evkv = RagService(s_evkv.retrieval, IndexService(retriever, None))
    rag_evrc = RagService(s_evrc.retrieval, IndexService(retriever, None))
    items = yaml.safe_load((ROOT / "eval/data/grounded_facts.yaml").read_text())
    items = items[: args.questions]
    qs = [it["q"] for it in items]

    def grounded(
        q: str, kv: bool, max_tokens: int = 1, evidence: bool = False, rc: bool = False
    ) -> GenParams:
        svc = (rag_evrc if rc else rag_evkv if kv else rag_ev) if evidence else rag
        hits = svc.search(q).hits
        msgs, used, ev = svc.build_messages(
            rt, [{"role": "user", "content": q}], hits, svc.evidence(q, hits)
        )
        prompt = rt.format_chat(msgs)
        tokens = rt.prompt_tokens(prompt)
        p = GenParams(
            tokens,
            max_tokens,
            temperature=0.0,
            stop=list(s.retrieval.stop),
            loop_repeats=s.retrieval.loop_repeats,
        )
        if kv:
            p.kv_plan = svc.kv_plan(rt, prompt, tokens, Grounding(used, None, 1.0, ev))
        return p

    def bare(q: str, max_tokens: int = 1, seed: int | None = None) -> GenParams:
        toks = rt.prompt_tokens(rt.format_chat([{"role": "user", "content": q}]))
        return GenParams(toks, max_tokens, temperature=0.0, seed=seed)

    single = rt.engine
    run(single, bare("warm-up"))
    rows = []
    n_plan = n_plan_ev = 0
    for i, item in enumerate(items):
        q = item["q"]
        r = {"q": q}
        prev = qs[i - 1] if i else "warm-up"
        # each TTFT with the prompt's shared prefix cached, as on a server answering a stream
        # of such requests: the previous question's prompt of the same kind runs first
        run(single, bare(prev))
        r["bare"] = run(single, bare(q))[0]
        # the issue's own protocol: "a fresh prompt cache" (a seeded request starts from an
        # empty KV cache, so the whole bare prompt is prefilled)
        r["bare_fresh"] = run(single, bare(q, seed=0))[0]
        run(single, grounded(prev, False, evidence=True))
        pe = grounded(q, False, args.answer_tokens, evidence=True)
        r["n_prompt_ev"] = len(pe.prompt_tokens)
        r["evidence"], _, _, r["ev_answer"] = run(single, pe)
        r["ev_ok"] = has_facts(r["ev_answer"], item["facts"])
        pu = grounded(q, True, evidence=True)
        n_plan_ev += pu.kv_plan is not None
        r["n_units"] = len(pu.kv_plan.items) if pu.kv_plan else 0
        r["ev_kv_cold"] = run(single, pu)[0]  # units not seen yet: computed and saved
        pu = grounded(q, True, args.answer_tokens, evidence=True)
        r["ev_kv_warm"], _, _, r["ev_kv_answer"] = run(single, pu)
        r["ev_kv_ok"] = has_facts(r["ev_kv_answer"], item["facts"])
        if args.recompute:  # the same units, warm, with the later lines' heads redone
            run(single, grounded(prev, True, evidence=True, rc=True))
            pr = grounded(q, True, args.answer_tokens, evidence=True, rc=True)
            r["ev_kv_rc"], _, _, r["ev_kv_rc_answer"] = run(single, pr)
            r["ev_kv_rc_ok"] = has_facts(r["ev_kv_rc_answer"], item["facts"])
            r["n_recomputed"] = sum(len(t) for t, _ in kvcache.recompute_runs(pr.kv_plan))
            # the protocol: no prompt reuse either (the assembler's prefix dropped, so
            # the system block is prefilled again; the chunk entries are the index's)
            single.kv.assembler.prefix = []
            r["ev_kv_rc_fresh"] = run(single, grounded(q, True, evidence=True, rc=True))[0]
        if args.no_excerpts:
            rows.append(r)
            print(
                f"[{i + 1}/{len(qs)}] bare {r['bare']:.3f}s  evidence {r['evidence']:.3f}s "
                f"({r['n_prompt_ev']} tok)  units cold {r['ev_kv_cold']:.3f}s warm "
                f"{r['ev_kv_warm']:.3f}s ({r['n_units']} units)  "
                + (
                    f"recompute {r['ev_kv_rc']:.3f}s  fresh: bare {r['bare_fresh']:.3f}s "
                    f"recompute {r['ev_kv_rc_fresh']:.3f}s  "
                    if args.recompute
                    else ""
                )
                + f"facts evidence {r['ev_ok']} units {r['ev_kv_ok']}",
                flush=True,
            )
            continue
        pp = grounded(q, False, args.answer_tokens)
        r["n_prompt"] = len(pp.prompt_tokens)
        r["plain"], _, _, r["plain_answer"] = run(single, pp)
        pk = grounded(q, True)
        n_plan += pk.kv_plan is not None
        r["kv_cold"] = run(single, pk)[0]  # no entries yet for new chunks: computed and saved
        r["kv_warm"], _, _, r["kv_answer"] = run(single, grounded(q, True, args.answer_tokens))
        r["plain_ok"] = has_facts(r["plain_answer"], item["facts"])
        r["kv_ok"] = has_facts(r["kv_answer"], item["facts"])
        r["same_answer"] = r["plain_answer"] == r["kv_answer"]
        rows.append(r)
        print(
            f"[{i + 1}/{len(qs)}] bare {r['bare']:.3f}s  evidence {r['evidence']:.3f}s "
            f"({r['n_prompt_ev']} tok)  plain {r['plain']:.3f}s  "
            f"kv cold {r['kv_cold']:.3f}s  kv warm {r['kv_warm']:.3f}s  ({r['n_prompt']} tok)  "
            f"facts plain {r['plain_ok']} kv {r['kv_ok']}",
            flush=True,
        )

    keys = ["bare", "bare_fresh", "evidence", "ev_kv_cold", "ev_kv_warm"]
    if args.recompute:
        keys += ["ev_kv_rc", "ev_kv_rc_fresh"]
    if not args.no_excerpts:
        keys += ["plain", "kv_cold", "kv_warm"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    per_q = {k: statistics.median(r[k] / r["bare"] for r in rows) for k in keys}
    n_prompt_ev = statistics.median(r["n_prompt_ev"] for r in rows)
    n_prompt = statistics.median(r["n_prompt"] for r in rows) if not args.no_excerpts else None
    first, total, n_out, _ = run(single, bare(qs[0], 64))  # the same run's first token
    decode = (n_out - 1) / max(1e-9, total - first)
    prefill = statistics.median(r["n_prompt_ev"] / r["evidence"] for r in rows)

    # answers/s: 1 client on the single engine, 4 and 8 on an 8-slot batch engine
    be = BatchEngine(rt.llm, 64, n_seq=8, n_batch=ms.n_batch, n_threads=ms.n_threads, kv=rt.kv)
    # TTFT on the batch engine, which serves every request under the defaults (n_parallel
    # auto): bare and grounded (the default layout and caches), one client, each with the
    # previous question's prompt of the same kind run first
    ttft_b = []
    if args.recompute:
        for i, q in enumerate(qs):
            prev = qs[i - 1] if i else "warm-up"
            run(be, bare(prev))
            tb = run(be, bare(q))[0]
            run(be, grounded(prev, True, evidence=True, rc=True))
            tg = run(be, grounded(q, True, evidence=True, rc=True))[0]
            ttft_b.append((tb, tg))
        mb = statistics.median(b for b, _ in ttft_b)
        mg = statistics.median(g for _, g in ttft_b)
        pq = statistics.median(g / b for b, g in ttft_b)
        print(
            f"batch engine TTFT: bare {mb:.3f}s, grounded {mg:.3f}s ({mg / mb:.2f}x; "
            f"per question {pq:.2f}x)",
            flush=True,
        )
    thr = {}
    n_ans = args.clients_answers
    work = [qs[i % len(qs)] for i in range(n_ans)]
    variants = ["evidence", "units"] + (["units_rc"] if args.recompute else [])
    variants += [] if args.no_excerpts else ["plain", "kv"]
    # "1b": one client on the batch engine, which serves every request under the defaults
    # (n_parallel auto): the grounded P2 is 8 clients' answers/s over it
    loads = ((1, single, "1"), (1, be, "1b"), (4, be, "4"), (8, be, "8"))

    def requests(name: str) -> list[GenParams]:  # new ones for every load
        return [
            grounded(
                q,
                name in ("units", "units_rc", "kv"),
                32,
                evidence=name in ("evidence", "units", "units_rc"),
                rc=name == "units_rc",
            )
            for q in work
        ]

    for name in variants:
        for clients, engine, key in loads:
            params = requests(name)

            thr[f"{name}_{key}"] = answers_per_s(engine, clients, params)
            print(f"answers/s {name} x{key}: {thr[list(thr)[-1]]:.3f}")
    p2 = {name: thr[f"{name}_8"] / thr[f"{name}_1b"] for name in variants}
    print(
        "grounded P2 (8 clients / 1, batch engine): "
        + ", ".join(f"{k} {v:.2f}" for k, v in p2.items())
    )
    # the served layout again, 1 and 8 clients interleaved: P2 per round and the median
    served = "units_rc" if args.recompute else "units"
    rounds = []
    for r in range(max(args.p2_rounds - 1, 0)):
        one, eight = answers_per_s(be, 1, requests(served)), answers_per_s(be, 8, requests(served))
        rounds.append({"1b": one, "8": eight, "p2": eight / one})
        print(f"round {r + 2}: {served} x1b {one:.3f}, x8 {eight:.3f}, P2 {eight / one:.2f}")
    be.close()
    every = [p2[served]] + [x["p2"] for x in rounds]  # each round's P2, the main load first
    if rounds:
        print(
            f"grounded P2 ({served}) over {len(every)} rounds: median "
            f"{statistics.median(every):.2f}, each " + ", ".join(f"{x:.2f}" for x in every)
        )

    # the index build step: every chunk of the index, into an empty store
    rt.kv = kvcache.KVStore(tmp / "kv-build", rt.kv.fingerprint, rt.id)
    sample = index.chunks[: args.build_chunks]
    build = kvcache.build_cache(rt, s.retrieval, sample, progress=False)
    rt.kv = kvcache.KVStore(tmp / "kv-build-units", rt.kv.fingerprint, rt.id)
    build_u = kvcache.build_cache(rt, s_evkv.retrieval, sample, progress=False)
    rt.close()
    per_1000 = build["bytes"] / max(1, len(sample)) * 1000
    out = {
        "questions": len(qs),
        "plans": n_plan,
        "unit_plans": n_plan_ev,
        "median_units": statistics.median(r["n_units"] for r in rows),
        "median_prompt_tokens": n_prompt,
        "median_prompt_tokens_evidence": n_prompt_ev,
        "ttft_s": med,
        "ratio_to_bare": {k: v / med["bare"] for k, v in med.items()},
        "ratio_to_bare_per_question_median": per_q,
        # the protocol (both with a fresh prompt cache): grounded over bare
        **(
            {
                "fresh_ratio": med["ev_kv_rc_fresh"] / med["bare_fresh"],
                "fresh_ratio_per_question_median": statistics.median(
                    r["ev_kv_rc_fresh"] / r["bare_fresh"] for r in rows
                ),
            }
            if args.recompute
            else {}
        ),
        "prefill_tok_s_evidence": prefill,
        "decode_tok_s": decode,
        **(
            {
                "batch_engine_ttft_s": {
                    "bare": statistics.median(b for b, _ in ttft_b),
                    "grounded": statistics.median(g for _, g in ttft_b),
                },
                "batch_engine_ratio": statistics.median(g for _, g in ttft_b)
                / statistics.median(b for b, _ in ttft_b),
                "batch_engine_ratio_per_question_median": statistics.median(
                    g / b for b, g in ttft_b
                ),
            }
            if ttft_b
            else {}
        ),
        "answers_per_s": thr,
        "p2_grounded": p2,
        **(
            {
                "p2_rounds": rounds,
                "p2_served_median": statistics.median(every),
            }
            if rounds
            else {}
        ),
        "index_chunks": len(index.chunks),
        "kv_bytes_per_1000_chunks": per_1000,
        "kv_build_s": build["seconds"],
        "kv_build_chunks": len(sample),
        "kv_build_s_per_1000_chunks": build["seconds"] / max(1, len(sample)) * 1000,
        "kv_build_span_tokens": build["span_tokens"],
        "unit_kv_bytes_per_1000_chunks": build_u["bytes"] / max(1, len(sample)) * 1000,
        "unit_kv_build_s_per_1000_chunks": build_u["seconds"] / max(1, len(sample)) * 1000,
        "unit_kv_spans": build_u["spans"],
        "facts_evidence": sum(r["ev_ok"] for r in rows),
        "facts_units": sum(r["ev_kv_ok"] for r in rows),
        "facts_evidence_only": sum(r["ev_ok"] and not r["ev_kv_ok"] for r in rows),
        "facts_units_only": sum(r["ev_kv_ok"] and not r["ev_ok"] for r in rows),
        "same_answers_units": sum(r["ev_answer"] == r["ev_kv_answer"] for r in rows),
        **(
            {
                "recompute": args.recompute,
                "median_recomputed_tokens": statistics.median(r["n_recomputed"] for r in rows),
                "facts_units_recompute": sum(r["ev_kv_rc_ok"] for r in rows),
                "same_answers_units_recompute": sum(
                    r["ev_answer"] == r["ev_kv_rc_answer"] for r in rows
                ),
            }
            if args.recompute
            else {}
        ),
        **(
            {}
            if args.no_excerpts
            else {
                "facts_plain": sum(r["plain_ok"] for r in rows),
                "facts_kv": sum(r["kv_ok"] for r in rows),
                "facts_plain_only": sum(r["plain_ok"] and not r["kv_ok"] for r in rows),
                "facts_kv_only": sum(r["kv_ok"] and not r["plain_ok"] for r in rows),
                "same_answers": sum(r["same_answer"] for r in rows),
            }
        ),
        "rows": rows,
        "n_threads": ms.n_threads,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
