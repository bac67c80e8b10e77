"""Remote generation: a front docqa (retrieval, prompts, citations) generating on two bare
``docqa serve`` backends (``model.endpoints``), all real servers on loopback. Grounded chat
(whole and streamed), usage, abstain and ticket replies go through the backends; routing uses
both; a backend killed -> requests keep succeeding; all killed -> 503 with Retry-After."""

from __future__ import annotations

import signal

import httpx
import pytest
from openai import OpenAI

from .conftest import SERVED, serving


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Two bare servers (the tests kill them: not shared with other modules)."""
    configs = {
        n: {"server": {"max_queue": 8}, "model": {"n_ctx": 2048, "n_threads": 1}}
        for n in ("backend-1", "backend-2")
    }
    with serving(tmp_path_factory, configs) as servers:
        yield servers


@pytest.fixture(scope="module")
def front(backends, tmp_path_factory, fixture_index):
    index = fixture_index(chunk_tokens=120, chunk_overlap=20)  # the fixture docs, built once
    cfg = {
        "server": {"max_queue": 8},
        "model": {
            "n_ctx": 2048,
            "endpoints": [b.url + "/v1" for b in backends],
            "endpoint_health_s": 0.5,
        },
        "retrieval": {"index_dir": str(index), "chunk_tokens": 120, "chunk_overlap": 20},
        "tickets": {"max_tokens": 40, "min_similarity": 0.3},
    }
    with serving(tmp_path_factory, {"front": cfg}) as (s,):
        yield s


@pytest.fixture(scope="module")
def client(front):
    return OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, q="How many jobs can run at once?", **kw):
    return client.chat.completions.create(
        model="docqa",
        messages=[{"role": "user", "content": q}],
        max_tokens=40,
        temperature=0,
        **kw,
    )


def test_front_lists_the_remote_model_and_its_endpoints(front, client):
    ids = [m.id for m in client.models.list().data]
    assert sorted(ids) == ["docqa", SERVED]  # the first id the backends list
    h = httpx.get(front.url + "/health").json()
    assert [e["healthy"] for e in h["endpoints"]] == [True, True]


def test_grounded_answer_with_sources_and_usage(client, backends):
    r = _ask(client)
    assert r.choices[0].message.content.strip()
    sources = r.model_extra["sources"]
    assert "guide/config.md" in [s["path"] for s in sources]
    assert r.usage.prompt_tokens > 100 and r.usage.completion_tokens > 0  # the backend's count
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_answer_passes_through(client):
    chunks = list(
        _ask(
            client,
            "Which port does the Zephyrd HTTP API use?",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert final and "guide/install.md" in [s["path"] for s in final[0].model_extra["sources"]]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_abstain_and_tickets(client, front):
    r = _ask(client, "What is the recipe for a chocolate souffle with raspberries?")
    assert "could not find" in r.choices[0].message.content and r.model_extra["sources"] == []
    r = httpx.post(
        front.url + "/v1/tickets/reply",
        timeout=120,
        json={"id": 1, "subject": "Port", "body": "Which port does the Zephyrd HTTP API use?"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["reply"] and "guide/install.md" in [s["path"] for s in r.json()["sources"]]


def test_requests_go_to_both_backends(client, front):
    for _ in range(4):
        _ask(client)
    served = [e["served"] for e in httpx.get(front.url + "/health").json()["endpoints"]]
    assert all(n > 0 for n in served), served


def test_one_backend_killed_requests_keep_succeeding(client, front, backends):
    backends[0].proc.send_signal(signal.SIGKILL)
    backends[0].proc.wait()
    for _ in range(3):  # the first may hit the dead one: retried on the other
        r = _ask(client)
        assert r.choices[0].message.content.strip()
    eps = httpx.get(front.url + "/health").json()["endpoints"]
    assert [e["healthy"] for e in eps] == [False, True], eps


def test_all_backends_down_is_503_with_retry_after(front, backends):
    backends[1].proc.send_signal(signal.SIGKILL)
    backends[1].proc.wait()
    r = httpx.post(
        front.url + "/v1/chat/completions",
        json={
            "model": "docqa",
            "messages": [{"role": "user", "content": "How many jobs can run at once?"}],
        },
        timeout=60,
    )
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    assert r.json()["error"]["code"] == "endpoints_unavailable"
