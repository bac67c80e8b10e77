"""Overload benchmark: goodput and latency of grounded answers when far more clients ask than
the server admits (issue 17).

A real ``docqa serve`` on the Nitro index answers ``model: docqa`` questions (held-out Nitro
questions, ``max_tokens`` small, greedy, not streamed):

1. one client, one request after the other, for ``--single-s`` seconds: the single-client
   goodput (answers/s) and mean service time;
2. ``--clients`` clients (64) at once for ``--overload-s`` seconds; a refused request (503)
   waits ``Retry-After`` (or ``--retry-wait``) and asks again.

Printed: goodput under overload as a fraction of the single-client one (goal >= 0.8), the p95
latency of admitted requests against what the queue implies (``max_queue`` x the single-client
mean service time; the 95th percentile of the sum of ``max_queue`` single-client service times
drawn from the run's, the same percentile of what a full FIFO queue implies; and Little's law
``max_queue`` / goodput; with deadline admission (config ``deadline``, ``server.max_wait_s`` =
``--max-wait-s``) also against that deadline; the same percentiles as the server timed them,
its ``Server-Timing`` header: without the clients' own delays on a shared machine), the number
of rejections and the server's CPU time per rejection (the server's CPU time under overload
minus what its answers cost at one client, shared among the rejections: an estimate, noisy when
answers cost much more than rejections), and the same for the event-loop thread alone (where a
refused request is handled; retrieval, templating and tokenization ran there before issue 17).
Run for the default settings (``server.wait_bound: queue``: the queue's own bound on waiting)
and ``places`` (``wait_bound: off``, places alone, the default until session 13).

    .venv/bin/python benchmarks/bench_load.py [--index var/nitro-index] [--clients 64]
        [--single-s 60] [--overload-s 90] [--max-tokens 32] [--configs default,single]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docqa.settings import load_settings  # noqa: E402
from server.launch import running_server  # noqa: E402

CONFIGS = {
    # the defaults: Q4_1, n_parallel auto (8 slots), plain prefill, the queue's wait bound
    "default": {},
    # the defaults until session 13: places alone limit admission
    "places": {"server": {"wait_bound": "off"}},
    "single": {"model": {"n_parallel": 1}},  # one request at a time
    "single_places": {"model": {"n_parallel": 1}, "server": {"wait_bound": "off"}},
    # the defaults until session 11: one request at a time, chunk KV caches
    "q4_single": {"model": {"n_parallel": 1}, "retrieval": {"kv_cache": True}},
    "parallel8": {"model": {"n_parallel": 8}},
    "kv": {"retrieval": {"kv_cache": True}},  # default engine, chunk KV caches
    # the defaults with deadline admission (server.max_wait_s from --max-wait-s)
    "deadline": {"server": {"max_wait_s": None}},
}


def questions() -> list[str]:
    from docqa.data import load_qa, split_qa

    held_out = split_qa(load_qa())[1]
    seen, out = set(), []
    for p in held_out:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p.question)
    return out


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def cpu_seconds(pid: int, thread: bool = False) -> float:
    """User + system CPU time of process ``pid`` (all its threads), or with ``thread`` of its
    main thread only (the event loop), from /proc."""
    stat = f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stats:
    def __init__(self):
        self.latencies: list[float] = []  # admitted requests, from their (last) send
        self.server: list[float] = []  # the same, as the server timed them (Server-Timing)
        self.done_at: list[float] = []
        self.abstained = 0
        self.rejections = 0
        self.errors: list[str] = []
        self.overall = 0.0


async def client(
    c: httpx.AsyncClient,
    qs: list[str],
    start: int,
    step: int,
    deadline: float,
    stats: Stats,
    max_tokens: int,
    retry_wait: float | None,
) -> None:
    i = start
    while time.perf_counter() < deadline:
        body = {
            "model": "docqa",
            "messages": [{"role": "user", "content": qs[i % len(qs)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        t0 = time.perf_counter()
        try:
            r = await c.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            stats.errors.append(type(exc).__name__)
            continue
        if r.status_code == 503:
            stats.rejections += 1
            wait = retry_wait if retry_wait is not None else float(r.headers["retry-after"])
            await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
            continue
        t1 = time.perf_counter()
        if r.status_code != 200:
            stats.errors.append(f"HTTP {r.status_code}")
        else:
            stats.latencies.append(t1 - t0)
            timing = r.headers.get("server-timing", "")
            if timing.startswith("app;dur="):
                stats.server.append(float(timing.split("=", 1)[1]) / 1000)
            stats.done_at.append(t1)
            stats.abstained += not r.json().get("sources")
        i += step


async def phase(url: str, n: int, seconds: float, qs, max_tokens: int, retry_wait) -> tuple:
    stats = Stats()
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(
            *(client(c, qs, k, n, deadline, stats, max_tokens, retry_wait) for k in range(n))
        )
    answers = sum(t <= deadline for t in stats.done_at)
    log(f"{n} clients: drained {time.perf_counter() - deadline:.0f} s after the deadline")
    # every admitted answer, over the time until the last one (the drain included): the
    # goodput of an engine whose answers all end together, later than the window
    stats.overall = len(stats.done_at) / (max(stats.done_at, default=deadline) - t0)
    return stats, answers / seconds, answers


def run_config(name: str, args, qs) -> dict:
    cfg: dict = {
        "server": {"log_level": "WARNING"},
        "retrieval": {"index_dir": str(args.index)},
    }
    for section, values in CONFIGS[name].items():
        cfg.setdefault(section, {}).update(values)
    if "max_wait_s" in cfg["server"]:
        cfg["server"]["max_wait_s"] = args.max_wait_s
    with running_server(cfg, name=f"load-{name}") as server:
        pid = server.proc.pid
        health = httpx.get(server.url + "/health").json()
        asyncio.run(phase(server.url, 1, 5, qs, args.max_tokens, args.retry_wait))  # warm-up
        log(f"{name}: one client for {args.single_s:.0f} s")
        c0, l0 = cpu_seconds(pid), cpu_seconds(pid, True)
        single, g1, n1 = asyncio.run(
            phase(server.url, 1, args.single_s, qs, args.max_tokens, args.retry_wait)
        )
        cpu_single, loop_single = cpu_seconds(pid) - c0, cpu_seconds(pid, True) - l0
        log(f"{name}: {n1} answers; {args.clients} clients for {args.overload_s:.0f} s")
        c0, l0 = cpu_seconds(pid), cpu_seconds(pid, True)
        over, g64, n64 = asyncio.run(
            phase(server.url, args.clients, args.overload_s, qs, args.max_tokens, args.retry_wait)
        )
        cpu_over, loop_over = cpu_seconds(pid) - c0, cpu_seconds(pid, True) - l0
        log(f"{name}: {n64} answers in time, {over.rejections} rejections")
        rss = Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]
    started = load_settings(**cfg).server  # as the server was started
    max_queue, max_wait_s = started.max_queue, started.max_wait_s
    service = statistics.mean(single.latencies)
    # what a full FIFO queue implies at the 95th percentile: an admitted request waits for the
    # max_queue - 1 ahead of it and its own answer; sums of max_queue single-client service
    # times drawn from this run's (bootstrap)
    rng = np.random.default_rng(0)
    draws = rng.choice(np.asarray(single.latencies), size=(20000, max_queue)).sum(axis=1)
    server_draws = (
        rng.choice(np.asarray(single.server), size=(20000, max_queue)).sum(axis=1)
        if single.server
        else np.asarray([float("nan")])
    )
    cpu_answer = cpu_single / max(n1, 1)
    rejection_cpu = (cpu_over - len(over.latencies) * cpu_answer) / max(over.rejections, 1)
    loop_answer = loop_single / max(len(single.latencies), 1)
    loop_rejection = (loop_over - len(over.latencies) * loop_answer) / max(over.rejections, 1)
    return {
        "config": name,
        "health": health,
        "single_goodput": g1,
        "single_answers": n1,
        "service_s": service,
        "cpu_per_answer": cpu_answer,
        "goodput": g64,
        "answers": n64,
        "ratio": g64 / g1 if g1 else float("nan"),
        "overall": over.overall,
        "overall_ratio": over.overall / single.overall if single.overall else float("nan"),
        "p50": float(np.percentile(over.latencies, 50)) if over.latencies else float("nan"),
        "p95": float(np.percentile(over.latencies, 95)) if over.latencies else float("nan"),
        "server_p50": float(np.percentile(over.server, 50)) if over.server else float("nan"),
        "server_p95": float(np.percentile(over.server, 95)) if over.server else float("nan"),
        "max_queue": max_queue,
        "max_wait_s": max_wait_s,
        "wait_bound": started.wait_bound,
        "p95_over_deadline": (
            float(np.percentile(over.latencies, 95)) / max_wait_s
            if max_wait_s and over.latencies
            else float("nan")
        ),
        "bound_service": max_queue * service,
        "bound_service_p95": float(np.percentile(draws, 95)),
        "bound_little": max_queue / g64 if g64 else float("nan"),
        "server_service_s": statistics.mean(single.server) if single.server else float("nan"),
        "bound_server_p95": float(np.percentile(server_draws, 95)),
        "rejections": over.rejections,
        "rejection_cpu_ms": 1000 * rejection_cpu,
        "rejection_loop_ms": 1000 * loop_rejection,
        "loop_per_answer_ms": 1000 * loop_answer,
        "errors": over.errors + single.errors,
        "abstained": (single.abstained, over.abstained),
        "rss_mb": int(rss) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=None, help="default: the Nitro index")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--single-s", type=float, default=60)
    ap.add_argument("--overload-s", type=float, default=90)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--retry-wait", type=float, default=None, help="seconds after a 503 (default Retry-After)"
    )
    ap.add_argument("--configs", default="default,places")
    ap.add_argument(
        "--max-wait-s", type=float, default=6.0, help="server.max_wait_s of the deadline config"
    )
    args = ap.parse_args()
    if args.index is None:
        from retrieval.corpus import nitro_index

        args.index = nitro_index()
    qs = questions()
    rows = []
    for name in args.configs.split(","):
        rows.append(run_config(name, args, qs))
        print(f"{name}: {rows[-1]}", flush=True)
    print(
        f"\n{args.clients} clients for {args.overload_s:.0f} s vs one client for "
        f"{args.single_s:.0f} s; max_tokens {args.max_tokens}; max_queue {rows[0]['max_queue']}; "
        f"after a 503: {'Retry-After' if args.retry_wait is None else f'{args.retry_wait} s'}"
    )
    print(
        "| config | 1 client (answers/s) | overload (answers/s) | ratio (goal >= 0.8) | "
        "p50 / p95 latency (s) | server-timed p50 / p95 (s) | queue x mean service (s) | "
        "p95 of queue x service (s) | queue / goodput (s) | rejections | "
        "CPU per rejection, all / event loop (ms) | errors |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['config']} | {r['single_goodput']:.3f} | {r['goodput']:.3f} | "
            f"{r['ratio']:.2f} | {r['p50']:.1f} / {r['p95']:.1f} | "
            f"{r['server_p50']:.1f} / {r['server_p95']:.1f} | {r['bound_service']:.1f} | "
            f"{r['bound_service_p95']:.1f} | "
            f"{r['bound_little']:.1f} | {r['rejections']} | {r['rejection_cpu_ms']:.0f} / "
            f"{r['rejection_loop_ms']:.1f} | "
            f"{len(r['errors'])} |"
        )
    for r in rows:
        print(
            f"{r['config']}: server-timed: single-client service {r['server_service_s']:.3f} s, "
            f"p95 of queue x service {r['bound_server_p95']:.1f} s, admitted p95 "
            f"{r['server_p95']:.1f} s; "
            f"with the drain, {r['overall']:.3f} answers/s "
            f"({r['overall_ratio']:.2f} of one client's); service time {r['service_s']:.2f} s, "
            "server CPU per answer "
            f"{r['cpu_per_answer']:.2f} s (event loop {r['loop_per_answer_ms']:.0f} ms), "
            f"abstained (1 client, overload) {r['abstained']}, "
            f"RSS {r['rss_mb']:.0f} MB, errors {sorted(set(r['errors']))[:5]}; "
            f"server.wait_bound {r['wait_bound']}"
        )
        if r["max_wait_s"]:
            print(
                f"{r['config']}: deadline admission, server.max_wait_s {r['max_wait_s']:g} s: "
                f"admitted p95 {r['p95']:.1f} s = {r['p95_over_deadline']:.2f} of it"
            )


if __name__ == "__main__":
    main()
