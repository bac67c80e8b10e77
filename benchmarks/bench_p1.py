"""P1: tokens/s of one streamed HTTP request / tokens/s of the same generation in-process
with llama-cpp-python (same GGUF, same settings, same run). Goal >= 0.97.

    .venv/bin/python benchmarks/bench_p1.py [--tokens 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.store import ModelStore  # noqa: E402
from server.engine import load_llama  # noqa: E402
from server.launch import running_server  # noqa: E402

PROMPT = "Write a long, detailed essay about the history of computing, section by section.\n\n"


def http_run(url: str, model: str, n: int) -> tuple[int, float]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    toks = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    toks = obj["usage"]["completion_tokens"]
    return toks, time.perf_counter() - t0


def inproc_run(llm: llama_cpp.Llama, n: int) -> tuple[int, float]:
    llm.reset()
    t0 = time.perf_counter()
    toks = 0
    for _ in llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True):
        toks += 1
    return toks, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    model = ModelStore("models/store").resolve("smollm2-135m-instruct")
    # the same loader (threads, batch) the server uses
    llm = load_llama(model.path, n_ctx=args.n_ctx, n_batch=512, n_threads=None, n_gpu_layers=0)
    cfg = {
        "model": {"n_ctx": args.n_ctx},
        "embedder": {"enabled": False},
        "server": {"log_level": "WARNING"},
    }
    http_rates, inproc_rates = [], []
    with running_server(cfg) as server:
        url = server.url
        http_run(url, model.id, 16)  # warm-up
        inproc_run(llm, 16)
        for _ in range(args.rounds):  # interleave so drift hits both sides equally
            n1, t1 = inproc_run(llm, args.tokens)
            n2, t2 = http_run(url, model.id, args.tokens)
            inproc_rates.append(n1 / t1)
            http_rates.append(n2 / t2)
    ip, hp = statistics.median(inproc_rates), statistics.median(http_rates)
    print(f"model: {model.id} ({model.path.name}), {args.tokens} tokens x {args.rounds} rounds")
    print(f"in-process llama-cpp-python: {ip:.1f} tok/s (median)")
    print(f"docqa HTTP stream:           {hp:.1f} tok/s (median)")
    print(f"P1 = {hp / ip:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
