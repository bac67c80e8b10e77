"""A short soak: 64 clients against a real server with a small queue, for a bounded time. Every
answer is a 200 or a 503 with Retry-After (no other error, no dropped connection), every
admitted stream ends with its finish_reason and [DONE], the queue is empty afterwards and the
server's RSS stays flat after warm-up. Longer soaks: benchmarks/bench_load.py."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

CLIENTS = 64
WARM_S = 8
SOAK_S = 24
RSS_MARGIN_MB = 64  # allocator noise; a per-request leak of 64 clients x 24 s is far above it

QUESTIONS = [
    "Which port does the Zephyrd HTTP API listen on?",
    "How do I install Zephyrd?",
    "What does the widgets endpoint return?",
    "Tell me a joke about cats.",
]


@pytest.fixture(scope="module")
def soak_server(server_factory, fixture_index):
    index = fixture_index(chunk_tokens=120, chunk_overlap=20)  # the fixture docs, built once
    return server_factory(
        {
            "server": {"max_queue": 4, "retry_after_s": 1, "log_level": "WARNING"},
            "model": {"n_ctx": 1024},
            "retrieval": {"index_dir": str(index), "chunk_tokens": 120, "chunk_overlap": 20},
        },
        "soak",
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Tally:
    def __init__(self):
        self.codes: Counter = Counter()
        self.problems: list[str] = []
        self.finished_streams = 0


def _request(rng: random.Random, model: str) -> tuple[str, dict]:
    stream = rng.random() < 0.5
    kind = rng.choice(["grounded", "plain", "text"])
    body: dict = {"max_tokens": rng.randint(2, 8), "temperature": 0, "stream": stream}
    if kind == "text":
        return "/v1/completions", body | {"model": model, "prompt": rng.choice(QUESTIONS)}
    messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    return "/v1/chat/completions", body | {
        "model": "docqa" if kind == "grounded" else model,
        "messages": messages,
    }


async def _one(c: httpx.AsyncClient, path: str, body: dict, tally: Tally) -> None:
    where = f"{path} stream={body['stream']} model={body['model']}"
    if not body["stream"]:
        r = await c.post(path, json=body)
        tally.codes[r.status_code] += 1
        if r.status_code == 200:
            if r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                tally.problems.append(f"{where}: {r.text[:200]}")
        elif r.status_code != 503 or not r.headers.get("retry-after"):
            tally.problems.append(f"{where}: HTTP {r.status_code} {r.text[:200]}")
        return
    async with c.stream("POST", path, json=body) as r:
        tally.codes[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            if r.status_code != 503 or not r.headers.get("retry-after"):
                tally.problems.append(f"{where}: HTTP {r.status_code} {r.text[:200]}")
            return
        finish, done = None, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                obj = json.loads(line[6:])
                if "error" in obj:
                    tally.problems.append(f"{where}: in-band error {obj['error']}")
                for ch in obj.get("choices") or []:
                    finish = ch.get("finish_reason") or finish
        if not done or finish not in ("stop", "length"):
            tally.problems.append(f"{where}: stream cut (finish {finish}, [DONE] {done})")
        else:
            tally.finished_streams += 1


async def _load(url: str, model: str, seconds: float, seed: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        deadline = time.monotonic() + seconds

        async def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < deadline:
                path, body = _request(rng, model)
                try:
                    await _one(c, path, body, tally)
                except httpx.HTTPError as exc:  # a reset or a cut connection
                    tally.problems.append(f"{path}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(rng.uniform(0.05, 0.3))

        await asyncio.gather(*(client(k) for k in range(CLIENTS)))
    return tally


def test_soak_64_clients(soak_server):
    model = next(
        m["id"]
        for m in httpx.get(soak_server.url + "/v1/models").json()["data"]
        if m["id"] != "docqa"
    )
    pid = soak_server.proc.pid
    warm = asyncio.run(_load(soak_server.url, model, WARM_S, 1))
    assert not warm.problems, warm.problems[:5]
    rss_warm = rss_mb(pid)
    tally = asyncio.run(_load(soak_server.url, model, SOAK_S, 2))
    rss_end = rss_mb(pid)

    assert not tally.problems, tally.problems[:5]
    assert set(tally.codes) <= {200, 503}, tally.codes
    assert tally.codes[200] >= 1 and tally.codes[503] >= 1, tally.codes  # both happened
    assert httpx.get(soak_server.url + "/health").json()["busy"] == 0  # no place leaked
    assert rss_end <= rss_warm + RSS_MARGIN_MB, (rss_warm, rss_end)


def test_idle_keep_alive_outlives_the_clients_expiry(soak_server):
    """httpx and the openai SDK drop idle pooled connections after 5 s. A server closing them at
    the same 5 s races a client reusing one: the request gets a reset (the ReadError this soak
    once caught). The server must keep them longer than the client does."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(soak_server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection") != "close"
        # the server's own time, for clients telling it from the network's (W3C Server-Timing)
        assert re.fullmatch(r"app;dur=\d+\.\d", first.getheader("server-timing") or ""), (
            first.getheader("server-timing")
        )
        sock = conn.sock
        time.sleep(httpx.Limits().keepalive_expiry + 1.5)  # idle longer than a client's pool
        conn.request("GET", "/health")  # on the same socket: a closed one raises here
        second = conn.getresponse()
        second.read()
        assert second.status == 200 and conn.sock is sock
    finally:
        conn.close()
