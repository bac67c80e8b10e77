"""What batching can gain per quant, below the engine (issue 19 item 4): one ``llama_decode``
step of 1 and of 8 sequences (one token each, after a shared prompt on a unified KV cache),
and a prompt's prefill speed, in process, for each model.

    .venv/bin/python benchmarks/bench_steps.py [--model smollm2-135m-instruct \
        --model smollm2-135m-instruct-f16] [--prompt-tokens 250] [--threads 2] [--reps 12]

"gain" is 8 single steps' time over one 8-sequence step: what continuous batching can give at
best at 8 clients before any engine or HTTP overhead (P2's ceiling). Medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(path: str, threads: int, prompt: int, reps: int) -> dict:
    """Timed on the batch engine's own context (``BatchContext``: unified KV, 8 sequences)."""
    import llama_cpp

    from server.engine import load_llama
    from server.generation import BatchContext

    llm = load_llama(Path(path), n_ctx=512, n_batch=512, n_threads=threads, n_gpu_layers=0)
    bctx = BatchContext(llm, 8, 512, threads)

    def decode(items: list[tuple[int, int, int, bool]]) -> float:
        for i, item in enumerate(items):
            bctx.add(i, *item)
        bctx.batch.n_tokens = len(items)
        t = time.perf_counter()
        if llama_cpp.llama_decode(bctx.ctx, bctx.batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    try:
        toks = [(i * 37) % 20000 + 100 for i in range(prompt)]  # any ids: timing only
        pf = []
        for _ in range(3):
            llama_cpp.llama_memory_clear(bctx.mem, True)
            pf.append(decode([(t, p, 0, p == prompt - 1) for p, t in enumerate(toks)]))
        for s in range(1, 8):
            llama_cpp.llama_memory_seq_cp(bctx.mem, 0, s, -1, -1)
        step = {}
        for n in (1, 8):
            ts = []
            for _ in range(reps):
                ts.append(decode([(500 + s, prompt, s, True) for s in range(n)]))
                for s in range(8):
                    llama_cpp.llama_memory_seq_rm(bctx.mem, s, prompt, -1)
            step[n] = statistics.median(ts)
    finally:
        bctx.close()
        llm.close()
    return {
        "prefill_tok_s": prompt / statistics.median(pf),
        "step1_ms": step[1] * 1000,
        "step8_ms": step[8] * 1000,
        "gain": 8 * step[1] / step[8],
    }


def main() -> None:
    import llama_cpp

    from docqa.settings import load_settings
    from models.store import ModelStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="store id or GGUF path")
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="default: model.n_threads or all")
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, None)  # llama.cpp's load logs would bury the table
    s = load_settings()
    threads = a.threads or s.model.n_threads or os.cpu_count() or 1
    store = ModelStore(s.model.store_dir)
    models = a.model or [s.model.model]
    print(f"threads {threads}, prompt {a.prompt_tokens} tokens, medians of {a.reps} steps")
    print("| model | prefill tok/s | 1 sequence (ms) | 8 sequences (ms) | gain (8 x 1 / 8) |")
    print("|---|---|---|---|---|")
    for name in models:
        path = name if name.endswith(".gguf") else str(store.resolve(name).path)
        r = measure(path, threads, a.prompt_tokens, a.reps)
        print(
            f"| {name} | {r['prefill_tok_s']:.0f} | {r['step1_ms']:.1f} | {r['step8_ms']:.1f} | "
            f"{r['gain']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
