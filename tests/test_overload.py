"""Admission before work: a request gets its place in the engine's queue (or a 503 with
Retry-After) before retrieval, chat templating and tokenization, and that preparation runs in
a worker thread, never on the event loop.

The app runs in-process on the real model, embedder and a fixture index (``Services.build``),
called through httpx's ASGI transport; the model's and the index's own methods are wrapped
(spies, not stubs) to see when and on which thread the work runs. The same behaviour is
exercised over HTTP by tests/test_soak.py; the figures are benchmarks/bench_load.py's."""

from __future__ import annotations

import asyncio
import shutil
import threading

import httpx
import pytest

from docqa.settings import load_settings
from server.app import create_app
from server.engine import Admission, EngineStopped, QueueFull
from server.generation import GenParams
from server.runtime import ModelRuntime
from server.services.index import IndexService
from server.state import Services

from .conftest import FIXTURES

QUESTION = "Which port does the Zephyrd HTTP API listen on?"
MAX_QUEUE = 2


# -- the admission queue itself --------------------------------------------------------
def _params() -> GenParams:
    return GenParams(prompt_tokens=[1, 2, 3], max_tokens=1)


def test_reserved_places_count_and_are_freed_once():
    adm = Admission(2)
    a, b = adm.reserve(), adm.reserve()
    with pytest.raises(QueueFull):
        adm.reserve()
    a.release()
    a.release()  # idempotent: frees one place, not two
    assert adm.admitted == 1
    with adm.reserve():
        assert adm.admitted == 2
    assert adm.admitted == 1
    b.release()
    assert adm.admitted == 0


def test_a_submitted_place_is_freed_when_its_job_ends():
    async def run():
        adm = Admission(1)
        with adm.reserve() as slot:
            job = slot.submit(_params())
        assert adm.admitted == 1  # released by its owner, but the job holds it
        assert adm.jobs.get_nowait() is job
        adm.release(job)  # the worker is done with it
        assert adm.admitted == 0
        with pytest.raises(RuntimeError):
            slot.submit(_params())  # a released slot takes no new job

        slot = adm.reserve()  # a kept slot runs several jobs in turn (a ticket's questions)
        for _ in range(3):
            job = slot.submit(_params())
            adm.release(adm.jobs.get_nowait())
            assert adm.admitted == 1
        slot.release()
        assert adm.admitted == 0

    asyncio.run(run())


def test_stopped_admission_refuses_reserved_places():
    async def run():
        adm = Admission(4)
        slot = adm.reserve()
        adm.stop()
        with pytest.raises(EngineStopped):
            slot.submit(_params())  # never queued behind the worker's stop
        with pytest.raises(EngineStopped):
            adm.reserve()
        slot.release()
        assert adm.admitted == 0

    asyncio.run(run())


# -- the app, in-process on the real model and index -----------------------------------
@pytest.fixture(scope="module")
def services(tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    settings = load_settings(
        server={"max_queue": MAX_QUEUE, "retry_after_s": 4},
        model={"n_ctx": 1024, "store_dir": str(docs.parent / "store")},
        embedder={"query_backend": "eager"},
        retrieval={"docs_dir": str(docs), "chunk_tokens": 120, "chunk_overlap": 20},
    )
    s = Services.build(settings)
    yield s
    s.close()


@pytest.fixture
def spy(monkeypatch):
    """Calls of the preparation's work: {name: [thread ident, ...]}."""
    calls: dict[str, list[int]] = {"search": [], "format_chat": [], "prompt_tokens": []}

    def wrap(cls, name):
        real = getattr(cls, name)

        def spied(self, *a, **kw):
            calls[name].append(threading.get_ident())
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, name, spied)

    wrap(IndexService, "search")
    wrap(ModelRuntime, "format_chat")
    wrap(ModelRuntime, "prompt_tokens")
    return calls


def _requests(model: str) -> list[tuple[str, dict]]:
    chat = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}
    return [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", chat | {"stream": True}),
        ("/v1/chat/completions", chat | {"model": "docqa"}),
        ("/v1/completions", {"model": model, "prompt": "Zephyrd is", "max_tokens": 8}),
        ("/v1/tickets/reply", {"id": 7, "subject": "Port", "body": QUESTION}),
    ]


def _call(services, requests):
    """Send ``requests`` concurrently to the app; -> (responses, the event loop's thread)."""
    app = create_app(services.settings)
    app.state.docqa.services = services

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))

    return asyncio.run(run()), threading.get_ident()


def test_full_queue_refuses_before_any_work(services, spy):
    rt = services.models.current()
    held = [rt.reserve() for _ in range(MAX_QUEUE)]
    try:
        responses, _ = _call(services, _requests(rt.id))
    finally:
        for slot in held:
            slot.release()
    for r in responses:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "4"
        assert r.json()["error"]["code"] == "server_busy"
    assert spy == {"search": [], "format_chat": [], "prompt_tokens": []}  # nothing was prepared
    assert rt.busy == 0


def test_preparation_runs_off_the_event_loop(services, spy):
    rt = services.models.current()
    responses, loop_thread = _call(services, _requests(rt.id)[2:3] + _requests(rt.id)[4:])
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert responses[0].json()["sources"]  # grounded: retrieval ran
    assert spy["search"] and spy["format_chat"] and spy["prompt_tokens"]
    on_loop = {k: v.count(loop_thread) for k, v in spy.items()}
    assert on_loop == {"search": 0, "format_chat": 0, "prompt_tokens": 0}
    assert rt.busy == 0


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},  # 400 in prepare
        {"messages": [{"role": "user", "content": "word " * 1500}]},  # 400 at submit: too long
        {"messages": [{"role": "user", "content": "hi"}], "model": "nope"},  # 404
        {"messages": [{"role": "user", "content": "Do you like chess?"}], "model": "docqa"},
    ],
    ids=["bad-param", "too-long", "unknown-model", "abstain"],
)
def test_every_outcome_frees_its_place(services, body):
    rt = services.models.current()
    body = {"model": rt.id, "max_tokens": 4} | body
    (r,), _ = _call(services, [("/v1/chat/completions", body)])
    assert r.status_code in (200, 400, 404), r.text
    assert rt.busy == 0
    with rt.reserve(), rt.reserve():  # the queue takes MAX_QUEUE requests again
        pass


def test_retry_after_follows_how_long_places_are_held():
    """A refused request is told to come back after half the time the full queue takes to
    turn over (the mean time recent places were held), within the settings' bounds; the
    configured minimum before anything has finished."""
    import time

    from server.engine import Admission, QueueFull, retry_after

    a = Admission(3)
    held = [a.reserve() for _ in range(3)]
    with pytest.raises(QueueFull) as e:
        a.reserve()
    assert e.value.drain_s is None and retry_after(e.value, 2, 30) == 2
    time.sleep(0.3)
    for slot in held:
        slot.release()
    held = [a.reserve() for _ in range(3)]
    time.sleep(0.2)
    held[0].release()
    held[0] = a.reserve()  # full again
    with pytest.raises(QueueFull) as e:
        a.reserve()
    assert 0.25 <= e.value.drain_s <= 1.0  # three held ~0.3 s, one ~0.2 s
    assert retry_after(QueueFull("x", 41.0), 2, 30) == 21
    assert retry_after(QueueFull("x", 1.0), 2, 30) == 2
    assert retry_after(QueueFull("x", 400.0), 2, 30) == 30
