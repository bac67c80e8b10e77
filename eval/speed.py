"""Prefill and decode speed of GGUF models with llama.cpp in-process (benchmarks/bench_decode.py
and the training pipeline's quant selection, training.quants).

Each model: a prompt of ``prompt_tokens`` tokens of documentation-like text (the size of a
grounded prompt's excerpts) is prefilled from an empty cache (prefill tok/s), then ``tokens``
tokens are decoded greedily from that cache with the end-of-generation token banned (decode
tok/s; before 2026-12 benchmarks/bench_decode.py's decode time also held a second prefill of the
prompt); medians of
``rounds`` rounds, the models interleaved within each round so a load change on the machine
hits them all alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

TEXT = (
    "The load model request takes llama_model_path, the path of the GGUF file, ctx_len, the "
    "context length, ngl, the number of layers offloaded to the GPU, and cont_batching with "
    "n_parallel for continuous batching. "
)


def measure_speed(
    models: dict[str, str | Path],
    *,
    threads: int | None,
    prompt_tokens: int = 256,
    tokens: int = 64,
    rounds: int = 3,
    n_batch: int = 512,
) -> dict[str, dict]:
    """``{name: GGUF path}`` -> ``{name: {prefill_tok_s, decode_tok_s, prompt_tokens,
    decode_tokens, rounds, threads}}`` (medians over the rounds)."""
    import llama_cpp

    llms = {
        m: llama_cpp.Llama(
            str(p),
            n_ctx=prompt_tokens + tokens + 64,
            n_threads=threads,
            n_batch=n_batch,
            verbose=False,
        )
        for m, p in models.items()
    }
    prefill: dict[str, list[float]] = {m: [] for m in models}
    decode: dict[str, list[float]] = {m: [] for m in models}
    try:
        for _ in range(rounds):
            for m, llm in llms.items():
                ids = llm.tokenize((TEXT * (prompt_tokens // 10 + 1)).encode())[:prompt_tokens]
                llm.reset()
                t = time.perf_counter()
                llm.eval(ids)
                prefill[m].append(len(ids) / (time.perf_counter() - t))
                eog = llm.token_eos()

                def no_end(_ids, scores, eog=eog):
                    scores[eog] = -1e9
                    return scores

                n, t = 0, time.perf_counter()
                # the prompt is cached: generate decodes from it without prefilling again
                gen = llm.generate(
                    ids,
                    temp=0.0,
                    logits_processor=llama_cpp.LogitsProcessorList([no_end]),
                )
                for _tok in gen:
                    n += 1
                    if n >= tokens:
                        break
                decode[m].append(n / (time.perf_counter() - t))
    finally:
        for llm in llms.values():
            llm.close()
    return {
        m: {
            "prefill_tok_s": round(statistics.median(prefill[m]), 1),
            "decode_tok_s": round(statistics.median(decode[m]), 1),
            "prompt_tokens": prompt_tokens,
            "decode_tokens": tokens,
            "rounds": rounds,
            "threads": threads,
        }
        for m in models
    }
