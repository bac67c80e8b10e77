"""CPU training speed of the embedded 135M model (issue 16): forward + backward tokens/s of
one sequence, by torch threads, trained layers and gradient checkpointing.

    .venv/bin/python benchmarks/bench_train.py --model runs/reader-v1/base/hf \
        [--tokens 260] [--steps 3] [--threads 1 2] [--layers 30 10]

``--model`` is an HF folder (the ``base`` step of any recipe writes one: the embedded GGUF
de-quantized to fp32). Each configuration runs in its own process (torch's thread pool is
fixed once used); the figure is the median of ``--steps`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(model: str, tokens: int, steps: int, threads: int, layers: int, gc: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    m.train()
    for p in m.parameters():
        p.requires_grad_(False)
    for layer in m.model.layers[-layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    if gc:
        m.gradient_checkpointing_enable()
    x = torch.randint(0, m.config.vocab_size, (1, tokens))
    rates = []
    for i in range(steps + 1):
        t = time.perf_counter()
        m(input_ids=x, labels=x).loss.backward()
        if i:
            rates.append(tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=260)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, nargs="+", default=[30, 10])
    ap.add_argument("--gc", action="store_true", help="also with gradient checkpointing")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        t, layers, gc = json.loads(a.one)
        print(one(a.model, a.tokens, a.steps, t, layers, gc))
        return
    print("| torch threads | trained layers | gradient checkpointing | tokens/s |")
    print("|---|---|---|---|")
    for t in a.threads:
        for layers in a.layers:
            for gc in [False, True] if a.gc else [False]:
                cmd = [sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens)]
                cmd += ["--steps", str(a.steps), "--one", json.dumps([t, layers, gc])]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rate = float(out.strip().splitlines()[-1])
                print(f"| {t} | {layers} | {'on' if gc else 'off'} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
