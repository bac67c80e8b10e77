"""Prefill and decode speed of GGUF models on this machine (issues 16 and 19: the finetuned
reader is exported as Q8_0, the embedded model is Q4_1).

    DOCQA_MODEL__N_THREADS=1 .venv/bin/python benchmarks/bench_decode.py \
        [--model smollm2-135m-instruct --model runs/reader-2/export/model.gguf] \
        [--prompt-tokens 256] [--tokens 64] [--rounds 3]

Each model: a prompt of ``--prompt-tokens`` tokens of documentation-like text is prefilled
from an empty cache (prefill tok/s), then ``--tokens`` tokens are decoded greedily with the
end-of-generation token banned (decode tok/s); medians of ``--rounds`` interleaved rounds.
Threads: ``model.n_threads`` from the settings tree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The load model request takes llama_model_path, the path of the GGUF file, ctx_len, the "
    "context length, ngl, the number of layers offloaded to the GPU, and cont_batching with "
    "n_parallel for continuous batching. "
)


def main() -> None:
    import llama_cpp

    from docqa.settings import load_settings
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
    llms = {}
    for m in models:
        path = m if m.endswith(".gguf") else str(store.resolve(m).path)
        llms[m] = llama_cpp.Llama(
            path, n_ctx=1024, n_threads=s.model.n_threads, n_batch=512, verbose=False
        )
    prefill: dict[str, list[float]] = {m: [] for m in models}
    decode: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(a.rounds):
        for m, llm in llms.items():
            ids = llm.tokenize((TEXT * 40).encode())[: a.prompt_tokens]
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            prefill[m].append(len(ids) / (time.perf_counter() - t))
            eog = llm.token_eos()

            def no_end(_ids, scores, eog=eog):
                scores[eog] = -1e9
                return scores

            n, t = 0, time.perf_counter()
            gen = llm.generate(
                ids, temp=0.0, reset=False, logits_processor=llama_cpp.LogitsProcessorList([no_end])
            )
            for _ in gen:
                n += 1
                if n >= a.tokens:
                    break
            decode[m].append(n / (time.perf_counter() - t))
    print(f"threads {s.model.n_threads}, prompt {a.prompt_tokens} tokens, decode {a.tokens}")
    print("| model | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    for m in models:
        print(f"| {m} | {statistics.median(prefill[m]):.0f} | {statistics.median(decode[m]):.0f} |")


if __name__ == "__main__":
    main()
