"""Candidate answers (retrieval.answer_candidates): several answers to a grounded question, run side
by side, the one best grounded in the evidence lines returned.

Unit tests of the score and of ``BestOfJob`` on scripted jobs; the real server on the real
model and a fixture index through the openai SDK and httpx; the queue's free places decide how
many candidates run (in process, real model)."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest

from retrieval.answers import grounding_score
from server.generation import Delta, Finish
from server.services.generation import BestOfJob

from .conftest import FIXTURES

EVIDENCE = ["Start it with `zephyrd --port 7311`.", "The config file is zephyr.toml."]
QUESTION = "Which port does the Zephyrd HTTP API listen on?"


def test_grounding_score_counts_evidence_words_and_penalizes_inventions():
    kept = grounding_score("Run `zephyrd --port 7311`.", EVIDENCE)
    invented = grounding_score("Run `zephyr_daemon --port 7311`.", EVIDENCE)
    vague = grounding_score("It listens on a port you choose.", EVIDENCE)
    echoed = grounding_score("Question: Run zephyrd --port 7311", EVIDENCE)
    assert kept > vague and kept > invented
    assert invented == kept - 2  # zephyr_daemon: not found (-1 instead of +1 for zephyrd)
    assert echoed == grounding_score("Run zephyrd --port 7311", EVIDENCE) - 5


class _Scripted:
    """A job that yields ``text`` and ends with ``reason``."""

    def __init__(self, text: str, reason: str = "stop", tokens: int = 5):
        self.text, self.reason, self.tokens = text, reason, tokens
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        yield Delta(self.text, [])
        yield Finish(self.reason, 11, self.tokens)


class _Failing(_Scripted):
    def __init__(self):
        super().__init__("")

    async def __aiter__(self):
        raise RuntimeError("engine failed")
        yield  # an async generator


def _grounding(text: str) -> int:
    return grounding_score(text, EVIDENCE)


def _run(job) -> list:
    async def go():
        return [ev async for ev in job]

    return asyncio.run(go())


def test_best_of_returns_the_best_grounded_answer_whole():
    jobs = [
        _Scripted("It listens on a port you choose."),
        _Scripted("Use `zephyr_daemon --port 8080`."),
        _Scripted("Start it with zephyrd --port 7311.", tokens=7),
    ]
    events = _run(b := BestOfJob(jobs, _grounding))
    assert b.chosen == 2 and b.scores[2] == max(b.scores)
    assert [type(e) for e in events] == [Delta, Finish]
    assert events[0].text == "Start it with zephyrd --port 7311."
    assert events[1].completion_tokens == 17  # every candidate's tokens were spent
    assert events[1].prompt_tokens == 11


def test_best_of_keeps_the_first_answer_on_a_tie_and_skips_failed_ones():
    same = "Start it with zephyrd --port 7311."
    b = BestOfJob([_Scripted(same), _Scripted(same + " "), _Scripted(same)], _grounding)
    assert _run(b)[0].text == same and b.chosen == 0
    better = "Start it with `zephyrd --port 7311`, config in zephyr.toml."
    b = BestOfJob([_Scripted("No idea."), _Scripted(better, "cancelled")], _grounding)
    assert _run(b)[0].text == "No idea." and b.chosen == 0
    b = BestOfJob([_Scripted("No idea."), _Failing(), _Scripted(better)], _grounding)
    assert _run(b)[0].text == better and b.chosen == 2  # a candidate that raised is skipped
    b = BestOfJob([_Failing(), _Scripted(better)], _grounding)
    with pytest.raises(RuntimeError, match="engine failed"):
        _run(b)  # the first answer's error is the request's
    assert b.jobs[1].cancelled
    first = _Scripted("cut", "cancelled")
    b = BestOfJob([first, _Scripted(better)], _grounding)
    events = _run(b)
    assert b.chosen is None and events[-1].reason == "cancelled"
    assert b.jobs[1].cancelled  # the others are stopped too


@pytest.fixture(scope="module")
def rag_server(server_factory, fixture_index):
    return server_factory(
        {
            "server": {"max_queue": 8},
            "model": {"n_ctx": 2048},
            "retrieval": {"index_dir": str(fixture_index())},
        },
        "candidates",
    )


def test_the_server_returns_the_best_grounded_of_its_candidates(rag_server):
    from openai import OpenAI

    client = OpenAI(base_url=rag_server.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(
        model="docqa", messages=msgs, max_tokens=48, temperature=0, seed=0
    )
    assert plain.model_extra.get("answer_candidates") is None
    r = client.chat.completions.create(
        model="docqa",
        messages=msgs,
        max_tokens=48,
        temperature=0,
        seed=0,
        extra_body={"answer_candidates": 4},
    )
    info = r.model_extra["answer_candidates"]
    assert info["n"] == 4 and len(info["scores"]) == 4
    best = max(info["scores"])
    assert info["scores"][info["chosen"]] == best
    if info["scores"][0] == best:
        assert info["chosen"] == 0  # a tie keeps the usual answer
    answer = r.choices[0].message.content
    assert answer and r.model_extra["sources"]
    if info["chosen"] == 0:
        assert answer == plain.choices[0].message.content
    # all four answers' tokens were generated
    assert r.usage.completion_tokens > plain.usage.completion_tokens
    # streamed: the chosen answer arrives whole
    with httpx.stream(
        "POST",
        rag_server.url + "/v1/chat/completions",
        json={
            "model": "docqa",
            "messages": msgs,
            "max_tokens": 48,
            "temperature": 0,
            "seed": 0,
            "answer_candidates": 4,
            "stream": True,
        },
        timeout=120,
    ) as s:
        assert s.status_code == 200
        body = "".join(s.iter_text())
    assert "[DONE]" in body
    import json

    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    texts = [t for t in texts if t]
    assert len(texts) == 1 and texts[0].strip()  # the chosen answer, whole, in one chunk


@pytest.mark.parametrize("bad", [0, 9, "x"])
def test_candidates_out_of_bounds_is_a_400(rag_server, bad):
    r = httpx.post(
        rag_server.url + "/v1/chat/completions",
        json={
            "model": "docqa",
            "messages": [{"role": "user", "content": "hi"}],
            "answer_candidates": bad,
        },
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "answer_candidates"


def test_spare_places_are_the_lower_half_of_the_queue():
    from server.engine import Admission, QueueFull

    adm = Admission(8)
    held = [adm.reserve_spare() for _ in range(4)]
    with pytest.raises(QueueFull):
        adm.reserve_spare()  # candidates never take the upper half
    held += [adm.reserve() for _ in range(4)]  # which stays for requests
    for slot in held:
        slot.release()
    assert adm.admitted == 0


def test_candidates_take_only_spare_places(tmp_path_factory, monkeypatch):
    """Extra candidates never cost a 503 and never take a place a request needs: only places
    in the lower half of the queue. Ticket replies choose among candidates the same way."""
    from docqa.settings import load_settings
    from server.app import create_app
    from server.state import Services

    docs = tmp_path_factory.mktemp("docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    settings = load_settings(
        server={"max_queue": 8},
        model={"n_ctx": 1024, "n_parallel": 1, "store_dir": str(docs.parent / "store")},
        embedder={"query_backend": "eager"},
        retrieval={
            "docs_dir": str(docs),
            "chunk_tokens": 120,
            "chunk_overlap": 20,
            "answer_candidates": 4,
        },
    )
    s = Services.build(settings)
    try:
        rt = s.models.current()
        app = create_app(settings)
        app.state.docqa.services = s
        body = {"model": "docqa", "messages": [{"role": "user", "content": QUESTION}]}
        body |= {"max_tokens": 8, "temperature": 0, "seed": 0}

        async def ask():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post("/v1/chat/completions", json=body, timeout=120)

        with rt.reserve(), rt.reserve():  # two places taken by others
            r = asyncio.run(ask())
        assert r.status_code == 200, r.text
        assert r.json()["answer_candidates"]["n"] == 2  # one spare place left of the lower 4
        assert rt.busy == 0
        r = asyncio.run(ask())
        assert r.json()["answer_candidates"]["n"] == 4  # as the setting asks

        seen: list[int] = []
        made = BestOfJob.__init__

        def spy(self, jobs, score):
            seen.append(len(jobs))
            made(self, jobs, score)

        monkeypatch.setattr(BestOfJob, "__init__", spy)
        body = {"id": 7, "subject": "Port", "body": QUESTION}
        path = "/v1/tickets/reply"

        async def ticket():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post(path, json=body, timeout=120)

        r = asyncio.run(ticket())
        assert r.status_code == 200, r.text
        assert seen == [4], r.json()  # the ticket's place and three spare ones
        assert rt.busy == 0
    finally:
        s.close()
