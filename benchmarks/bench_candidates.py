"""What answer candidates cost (retrieval.answer_candidates): a real ``docqa serve`` on the
Nitro index answers the same held-out questions (``model: docqa``, greedy, ``max_tokens``
as given, not streamed), one client, one request after the other, once per candidate count.

Printed per count: mean and p95 latency of a grounded answer, answers/s, completion tokens
generated per answer (every candidate's), and how often a sampled candidate was chosen.

    .venv/bin/python benchmarks/bench_candidates.py [--index var/nitro-index] [--counts 1,3,5]
        [--questions 20] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.launch import running_server  # noqa: E402


def questions(n: int) -> list[str]:
    from docqa.data import load_qa, split_qa

    seen, out = set(), []
    for p in split_qa(load_qa())[1]:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p.question)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=None, help="default: the Nitro index")
    ap.add_argument("--counts", default="1,3,5")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    if args.index is None:
        from retrieval.corpus import nitro_index

        args.index = nitro_index()
    qs = questions(args.questions)
    cfg = {"server": {"log_level": "WARNING"}, "retrieval": {"index_dir": str(args.index)}}
    rows = []
    with running_server(cfg, name="bench-candidates") as server:
        c = httpx.Client(base_url=server.url, timeout=600)

        def ask(q: str, n: int) -> dict:
            body = {
                "model": "docqa",
                "messages": [{"role": "user", "content": q}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "seed": 0,
                "answer_candidates": n,
            }
            r = c.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()

        ask(qs[0], 1)  # warm-up
        for n in [int(x) for x in args.counts.split(",")]:
            lat, toks, chosen, ran = [], [], 0, []
            t0 = time.perf_counter()
            for q in qs:
                t = time.perf_counter()
                out = ask(q, n)
                lat.append(time.perf_counter() - t)
                toks.append(out["usage"]["completion_tokens"])
                info = out.get("answer_candidates")
                if info:
                    ran.append(info["n"])
                    chosen += info["chosen"] != 0
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "n": n,
                    "mean_s": statistics.mean(lat),
                    "p95_s": float(np.percentile(lat, 95)),
                    "answers_s": len(qs) / wall,
                    "tokens": statistics.mean(toks),
                    "ran": statistics.mean(ran) if ran else 1.0,
                    "sampled_chosen": chosen,
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\n{len(qs)} held-out questions, one client, max_tokens {args.max_tokens}\n"
        "| answer_candidates | mean latency (s) | p95 (s) | answers/s | completion tokens per "
        "answer | candidates run | sampled answer chosen |\n|---|---|---|---|---|---|---|"
    )
    base = rows[0]["mean_s"]
    for r in rows:
        print(
            f"| {r['n']} | {r['mean_s']:.2f} ({r['mean_s'] / base:.2f}x) | {r['p95_s']:.2f} | "
            f"{r['answers_s']:.2f} | {r['tokens']:.0f} | {r['ran']:.1f} | "
            f"{r['sampled_chosen']} of {len(qs)} |"
        )


if __name__ == "__main__":
    main()
