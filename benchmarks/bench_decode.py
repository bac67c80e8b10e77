"""Prefill and decode speed of GGUF models on this machine (issues 16 and 19: the finetuned
reader is exported as Q8_0, the embedded model is Q4_1).

    DOCQA_MODEL__N_THREADS=1 .venv/bin/python benchmarks/bench_decode.py \
        [--model smollm2-135m-instruct --model runs/reader-2/export/model.gguf] \
        [--prompt-tokens 256] [--tokens 64] [--rounds 3]

Each model: a prompt of ``--prompt-tokens`` tokens of documentation-like text is prefilled
from an empty cache (prefill tok/s), then ``--tokens`` tokens are decoded greedily with the
end-of-generation token banned (decode tok/s); medians of ``--rounds`` interleaved rounds
(eval.speed, which the training pipeline's quant selection uses too).
Threads: ``model.n_threads`` from the settings tree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from docqa.settings import load_settings
    from eval.speed import measure_speed
    from models.store import ModelStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    s = load_settings()
    store = ModelStore(s.model.store_dir)
    models = a.model or [s.model.model]
    paths = {m: m if m.endswith(".gguf") else str(store.resolve(m).path) for m in models}
    res = measure_speed(
        paths,
        threads=s.model.n_threads,
        prompt_tokens=a.prompt_tokens,
        tokens=a.tokens,
        rounds=a.rounds,
    )
    print(f"threads {s.model.n_threads}, prompt {a.prompt_tokens} tokens, decode {a.tokens}")
    print("| model | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    for m in models:
        print(f"| {m} | {res[m]['prefill_tok_s']:.0f} | {res[m]['decode_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
