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
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(path: str, threads: int, prompt: int, reps: int) -> dict:
    import llama_cpp as L

    m = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, 8
    cp.kv_unified = True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(m, cp)
    batch = L.llama_batch_init(512, 0, 8)
    mem = L.llama_get_memory(ctx)

    def decode(items: list[tuple[int, int, int, bool]]) -> float:
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        t = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    try:
        toks = [(i * 37) % 20000 + 100 for i in range(prompt)]  # any ids: timing only
        pf = []
        for _ in range(3):
            L.llama_memory_clear(mem, True)
            pf.append(decode([(t, p, 0, p == prompt - 1) for p, t in enumerate(toks)]))
        for s in range(1, 8):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        step = {}
        for n in (1, 8):
            ts = []
            for _ in range(reps):
                ts.append(decode([(500 + s, prompt, s, True) for s in range(n)]))
                for s in range(8):
                    L.llama_memory_seq_rm(mem, s, prompt, -1)
            step[n] = statistics.median(ts)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(m)
    return {
        "prefill_tok_s": prompt / statistics.median(pf),
        "step1_ms": step[1] * 1000,
        "step8_ms": step[8] * 1000,
        "gain": 8 * step[1] / step[8],
    }


def main() -> None:
    from docqa.settings import load_settings
    from models.store import ModelStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="store id or GGUF path")
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="default: model.n_threads or all")
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    import os

    import llama_cpp

    llama_cpp.llama_backend_init()
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
