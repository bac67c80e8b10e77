"""Context-aware decoding cost (issue 16): time per generated token of plain decoding vs CAD
(the context-free prompt as a second sequence, decoded in the same batch) on the same grounded
prompt, in both engines (single: ``n_parallel`` 1; batch: two sequences), in-process on the
embedded model. Goal: CAD <= 1.3x plain. Time per token counts decoding only: from the first
generated token to the end, over the tokens after the first (prompt evaluation, which CAD
also doubles for the shorter context-free prompt, is reported apart). Then the floor: one
``llama_decode`` of a two-token batch (a token on each sequence) vs a one-token batch, timed
alone on a two-sequence context holding both prompts (``--raw-only``: just that).

    .venv/bin/python benchmarks/bench_cad.py [--tokens 64] [--rounds 3] [--threads 1]
                                             [--raw-only]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from docqa.settings import load_settings  # noqa: E402
from models.store import ModelStore  # noqa: E402
from server.batch_engine import BatchEngine  # noqa: E402
from server.cad import _decode  # noqa: E402
from server.generation import BatchContext, Delta, GenParams  # noqa: E402
from server.runtime import ModelRuntime  # noqa: E402

DOCS = ROOT / "tests" / "fixtures" / "docs" / "guide"
QUESTION = "Explain, step by step and in detail, how to install and configure Zephyrd."


def prompts(rt: ModelRuntime) -> tuple[list[int], list[int]]:
    """(grounded prompt, the context-free prompt) as the server builds them under the default
    settings: in the evidence layout the evidence lines ``retrieval.evidence.for_reader`` picks
    from three fixture excerpts; in the excerpts layout the excerpts. The context-free prompt
    follows ``retrieval.cad_context_free`` (the question alone, or the template without
    excerpts or evidence)."""
    from retrieval.evidence import for_reader
    from retrieval.prompting import evidence_lines, rag_messages

    r = load_settings().retrieval
    texts = [(DOCS / n).read_text()[:1200] for n in ("install.md", "config.md", "internals.md")]
    blocks = [f"[{i}] {t}" for i, t in enumerate(texts, 1)] if r.shows_excerpts else []
    ev = for_reader(QUESTION, texts, lambda w: 1.0, r.evidence_units)
    lines = evidence_lines([(e.chunk + 1, e.text) for e in ev])
    grounded = rag_messages(r.system_prompt, r.user_template, QUESTION, blocks, evidence=lines)
    if r.cad_context_free == "template":
        free = rag_messages(r.system_prompt, r.user_template, QUESTION, [], evidence="")
    else:
        free = [{"role": "user", "content": QUESTION}]
    return (rt.prompt_tokens(rt.format_chat(grounded)), rt.prompt_tokens(rt.format_chat(free)))


async def one(engine, p: GenParams) -> tuple[float, float, int]:
    """-> (prompt seconds, decode seconds per token after the first, tokens)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    async for ev in engine.submit(p):
        if isinstance(ev, Delta):
            first = first or time.perf_counter()
        else:
            n = ev.completion_tokens
    t_end = time.perf_counter()
    if first is None or n < 2:
        raise RuntimeError(f"too short a generation ({n} tokens) to time")
    return first - t0, (t_end - first) / (n - 1), n


def raw_decode(rt: ModelRuntime, full, free, threads: int, reps: int = 30) -> dict[int, float]:
    """Median ms of one llama_decode of 1 token (the grounded sequence) and of 2 tokens (one
    on each sequence), after both prompts are in the KV cache."""
    bctx = BatchContext(rt.llm, 1, rt.llm.n_batch, threads)
    try:
        for seq, toks in ((1, free), (0, full)):
            for start in range(0, len(toks), rt.llm.n_batch):
                part = toks[start : start + rt.llm.n_batch]
                for i, t in enumerate(part):
                    bctx.add(i, t, start + i, seq, i == len(part) - 1)
                bctx.batch.n_tokens = len(part)
                _decode(bctx)
        pos = [len(full), len(free)]
        times: dict[int, list[float]] = {1: [], 2: []}
        tok = full[-1]
        for _ in range(reps):
            for k in (1, 2):
                for i in range(k):
                    bctx.add(i, tok, pos[i], i, True)
                    pos[i] += 1
                bctx.batch.n_tokens = k
                t0 = time.perf_counter()
                _decode(bctx)
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) * 1000 for k, v in times.items()}
    finally:
        bctx.close()


def print_raw(raw: dict[int, float], threads: int) -> None:
    print(
        f"llama_decode alone, {threads} thread(s): 1 token {raw[1]:.1f} ms, 2 tokens (one per "
        f"sequence) {raw[2]:.1f} ms: {raw[2] / raw[1]:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--raw-only", action="store_true", help="only the llama_decode floor")
    args = ap.parse_args()
    ms = load_settings(model={"n_ctx": 2048, "n_threads": args.threads}).model
    rt = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 16)
    if args.raw_only:
        try:
            print_raw(raw_decode(rt, *prompts(rt), args.threads), args.threads)
        finally:
            rt.close()
        return
    # no prefix cache: each run evaluates its prompts in full, as the single engine does
    be = BatchEngine(rt.llm, 16, n_seq=2, n_threads=args.threads, prefix_cache=False)
    full, free = prompts(rt)
    print(
        f"model {rt.id}, {args.threads} thread(s), grounded prompt {len(full)} tokens, "
        f"context-free prompt {len(free)} tokens, {args.tokens} tokens, alpha {args.alpha}\n"
    )

    def params(cad: bool) -> GenParams:
        # sampled (seeded) rather than greedy, so both runs go on for the full length
        kw = {"cad_alpha": args.alpha, "cad_prompt_tokens": free} if cad else {}
        return GenParams(full, args.tokens, temperature=0.7, seed=7, **kw)

    rows = []
    raw = None
    try:
        for name, engine in (("single", rt.engine), ("batch (2 sequences)", be)):
            res: dict[bool, list] = {False: [], True: []}
            for _ in range(args.rounds):  # interleaved: load changes hit both alike
                for cad in (False, True):
                    res[cad].append(asyncio.run(one(engine, params(cad))))
            med = {
                cad: (
                    statistics.median(r[0] for r in runs),
                    statistics.median(r[1] for r in runs),
                    statistics.median(r[2] for r in runs),
                )
                for cad, runs in res.items()
            }
            rows.append((name, med))
        raw = raw_decode(rt, full, free, args.threads)
    finally:
        be.close()
        rt.close()
    print("| engine | plain ms/token | CAD ms/token | CAD / plain | prompt s, plain | CAD |")
    print("|---|---|---|---|---|---|")
    for name, med in rows:
        (pp, pt, _), (cp, ct, _) = med[False], med[True]
        print(
            f"| {name} | {pt * 1000:.1f} | {ct * 1000:.1f} | {ct / pt:.2f}x | {pp:.2f} | {cp:.2f} |"
        )
    print(f"\nmedians of {args.rounds} interleaved rounds; goal: CAD / plain <= 1.3x")
    print_raw(raw, args.threads)


if __name__ == "__main__":
    main()
