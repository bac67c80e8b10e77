"""One owner per resource: a model reload under load (n_parallel 2, grounded streams) never
crashes the server, and every retriever (server, `docqa index query`, `docqa eval retrieval`,
the training-data builder) returns the same chunks for the same query and index."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from server.launch import DOCQA

from .conftest import FIXTURES

QUESTIONS = [
    "Which port does the Zephyrd HTTP API listen on?",
    "How do I install Zephyrd on Linux?",
    "How often do Zephyrd log files rotate?",
    "Where does the Zephyrd configuration file live?",
]
ADMIN = {"Authorization": "Bearer adm"}


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([DOCQA, *args], capture_output=True, text=True, env=env, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def owner_server(server_factory, tmp_path_factory):
    """A server with an index built by `docqa index build` at the default settings, two
    batched sequences, and an admin key."""
    tmp = tmp_path_factory.mktemp("owner")
    index_dir = tmp / "index"
    _run("index", "build", str(FIXTURES / "docs"), "--out", str(index_dir), cwd=tmp)
    s = server_factory(
        {
            "server": {"admin_key": "adm", "max_queue": 16, "reload_drain_s": 30},
            "model": {"n_ctx": 1024, "n_parallel": 2},
            "retrieval": {"index_dir": str(index_dir)},
        },
        "owner",
    )
    s.index_dir = index_dir
    return s


def _stream(c: OpenAI, q: str) -> tuple:
    try:
        text, finish = [], None
        for ch in c.chat.completions.create(
            model="docqa",
            stream=True,
            max_tokens=24,
            temperature=0,
            messages=[{"role": "user", "content": q}],
        ):
            if ch.choices:
                text.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
        return ("ok", finish, "".join(text))
    except openai.APIStatusError as exc:
        return ("status", exc.status_code, str(exc))
    except Exception as exc:  # noqa: BLE001 - reported by the assertion below
        return ("error", type(exc).__name__, str(exc))


def test_reload_under_load_never_crashes(owner_server):
    url = owner_server.url
    c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    results: list[tuple] = []
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            results.append(_stream(c, QUESTIONS[(i + n) % len(QUESTIONS)]))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    reloads = []
    try:
        for _ in range(3):
            time.sleep(1.5)
            r = httpx.post(
                url + "/admin/reload",
                headers=ADMIN,
                json={"model": "smollm2-135m-instruct"},
                timeout=120,
            )
            reloads.append((r.status_code, r.text))
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert owner_server.proc.poll() is None, owner_server.log.read_text()[-3000:]
    assert all(code == 200 for code, _ in reloads), reloads
    bad = [
        r
        for r in results
        if not ((r[0] == "ok" and r[1] in ("stop", "length") and r[2]) or r[:2] == ("status", 503))
    ]
    assert not bad, bad
    assert sum(r[0] == "ok" for r in results) >= 8, results
    # the server answers afterwards, and a reload to an unknown model changes nothing
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = httpx.post(url + "/admin/reload", headers=ADMIN, json={"model": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert _stream(c, QUESTIONS[0])[0] == "ok"
    assert httpx.get(url + "/health").json()["model"] == "smollm2-135m-instruct"


def test_server_eval_cli_and_training_data_see_the_same_hits(owner_server, tmp_path):
    from training.data import RagExamples

    idx = str(owner_server.index_dir)
    hits = tmp_path / "hits.jsonl"
    _run(
        "eval",
        "retrieval",
        "--index",
        idx,
        "--qa",
        str(FIXTURES / "zephyrd_qa.csv"),
        "--hits",
        str(hits),
    )
    rows = [json.loads(x) for x in hits.read_text().splitlines()]
    assert len(rows) >= 8
    builder = RagExamples(idx)
    for row in rows:
        r = httpx.post(
            owner_server.url + "/v1/retrieve", json={"query": row["question"], "top_k": 5}
        )
        served = [d["id"] for d in r.json()["data"]]
        assert served == row["hits"][:5], row["question"]
        assert [ch.id for ch in builder.retrieve(row["question"], 5)] == served
    q = rows[0]["question"]
    out = _run("index", "query", q, "--index", idx, "--top-k", "5", "--json").stdout
    assert [h["id"] for h in json.loads(out)] == row_hits(rows, q)


def row_hits(rows: list[dict], q: str) -> list[str]:
    return next(r["hits"][:5] for r in rows if r["question"] == q)
