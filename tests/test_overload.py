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
from server.engine import Admission, EngineStopped, QueueFull, retry_after
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


def test_retry_after_backs_off_when_far_more_clients_retry_than_are_admitted():
    """Each refused client comes back after its Retry-After. With many more clients than the
    queue admits, every comeback costs the server a refusal; so the admission's backoff grows
    while the last 30 s saw more than 4 refusals per admission, and falls back when fewer come."""
    clock = [0.0]
    adm = Admission(1)
    adm.clock = lambda: clock[0]

    def second(refusals: int) -> QueueFull | None:
        """One admission and ``refusals`` refused requests in one second."""
        last = None
        with adm.reserve():
            clock[0] += 0.5
            for _ in range(refusals):
                with pytest.raises(QueueFull) as e:
                    adm.reserve()
                last = e.value
            clock[0] += 0.5
        return last

    for _ in range(60):  # 3 refusals per admission: within the steady band, no backoff
        e = second(3)
    assert e.backoff == 1.0 and retry_after(e, 2, 30) == 2  # held 1 s: half a turnover < 2
    grown = []
    for _ in range(30):  # a flood: 20 per admission
        grown.append(second(20).backoff)
    assert grown == sorted(grown) and grown[-1] > 8 and retry_after(e, 2, 30) == 2
    assert retry_after(QueueFull("x", 6.0, grown[-1]), 2, 30) == 30  # capped
    assert retry_after(QueueFull("x", 6.0, 2.0), 2, 30) == 6
    for _ in range(31):  # the flood is gone: one admission a second, nobody refused
        second(0)
    assert adm.backoff() == 1.0
    assert adm.admitted == 0


# -- deadline admission (server.max_wait_s) ---------------------------------------------
def _answer(slot, clock: list[float], each_s: float) -> None:
    """One answer run in ``slot``, ``each_s`` seconds on the fake clock (the job is submitted
    and ended as an engine's worker would)."""

    async def run() -> None:
        job = slot.submit(_params())
        clock[0] += each_s
        slot._admission.release(job)  # noqa: SLF001 - the worker's side

    asyncio.run(run())


def _answered(adm: Admission, clock: list[float], n: int, each_s: float) -> None:
    """``n`` answers one after the other, ``each_s`` seconds each on the fake clock."""
    for _ in range(n):
        with adm.reserve() as slot:
            _answer(slot, clock, each_s)


def test_deadline_admission_counts_expected_work_not_places():
    clock = [0.0]
    adm = Admission(16, max_wait_s=1.0)
    adm.clock = lambda: clock[0]
    assert adm.answer_s() is None
    _answered(adm, clock, 5, 0.25)
    assert adm.answer_s() == pytest.approx(0.25)
    held = [adm.reserve() for _ in range(4)]  # 4 x 0.25 s = 1.0 s: still in time
    with pytest.raises(QueueFull, match=r"server\.max_wait_s 1 s") as e:
        adm.reserve()  # the fifth would wait ~1.25 s; 11 places are still free
    assert adm.admitted == 4 and e.value.drain_s is not None
    _answer(held[0], clock, 1.0)  # the four end together: the engine ran them at once,
    for slot in held[1:]:  # 0.25 s each
        _answer(slot, clock, 0.0)
    for slot in held:
        slot.release()
    clock[0] += 100.0  # idle time is not answer time
    assert adm.answer_s() == pytest.approx(0.25)
    _answered(adm, clock, 96, 0.5)  # answers slow down: fewer places meet the deadline
    assert adm.answer_s() == pytest.approx(0.5)
    assert adm.tail_factor() == 1.0  # and the predictions were right
    held = [adm.reserve() for _ in range(2)]
    with pytest.raises(QueueFull, match="max_wait_s"):
        adm.reserve()
    for slot in held:
        slot.release()
    _answered(adm, clock, 32, 5.0)  # slower than the deadline itself: an idle engine still
    assert adm.answer_s() == pytest.approx(5.0)  # admits, one request at a time
    with adm.reserve():
        with pytest.raises(QueueFull, match="max_wait_s"):
            adm.reserve()


def test_deadline_admission_learns_its_own_tail():
    """Waits longer than predicted (here: pairs that end together, the first predicted at
    one answer's time, held two) make the deadline check scale its prediction by their 95th
    percentile, so admitted requests meet the deadline at p95."""
    clock = [0.0]
    adm = Admission(16, max_wait_s=100.0)
    adm.clock = lambda: clock[0]
    _answered(adm, clock, 5, 0.5)
    _pairs(adm, clock, 32, 1.0)
    assert adm.answer_s() == pytest.approx(0.5)
    assert adm.tail_factor() == pytest.approx(2.0)
    adm.max_wait_s = 1.9  # two places at 0.5 s predict 1.0 s; x 2 = 2.0 s: refused
    with adm.reserve():
        with pytest.raises(QueueFull, match=r"about 2\.0 s"):
            adm.reserve()


def test_without_a_deadline_places_alone_limit_admission():
    clock = [0.0]
    adm = Admission(3, max_wait_s=0)
    adm.clock = lambda: clock[0]
    _answered(adm, clock, 8, 60.0)
    held = [adm.reserve() for _ in range(3)]
    with pytest.raises(QueueFull, match="3 requests admitted"):
        adm.reserve()
    for slot in held:
        slot.release()


def _pairs(adm: Admission, clock: list[float], n: int, held_s: float) -> None:
    """``n`` pairs of answers admitted together and ending together after ``held_s``."""
    for _ in range(n):
        pair = [adm.reserve(), adm.reserve()]
        _answer(pair[0], clock, held_s)
        _answer(pair[1], clock, 0.0)
        for slot in pair:
            slot.release()


def test_the_queue_bound_keeps_admitted_waits_within_what_the_queue_implies():
    """``server.wait_bound: queue`` (the default) with no deadline: the bound is ``max_queue``
    answers at a lone answer's service time. When answers under load get slower than alone,
    the queue holds fewer places, so admitted requests still wait no longer than that."""
    clock = [0.0]
    adm = Admission(4, None, wait_bound=True)
    adm.clock = lambda: clock[0]
    assert adm.deadline_s() is None  # nothing measured: places alone decide
    _answered(adm, clock, 5, 1.0)  # one at a time, 1 s each
    assert adm.solo_s() == pytest.approx(1.0)
    assert adm.deadline_s() == pytest.approx(4.0)  # 4 places x 1 s
    held = [adm.reserve() for _ in range(4)]  # at the lone pace all 4 places fit
    with pytest.raises(QueueFull, match="4 requests admitted"):
        adm.reserve()
    clock[0] += 4.0
    for slot in held:
        slot.release()
    # under load, pairs take 4 s together: 2 s per answer, twice the lone time; the first
    # of each pair was predicted 2 s and held 4 s
    _pairs(adm, clock, 32, 4.0)
    assert adm.solo_s() == pytest.approx(1.0)  # pairs are not alone
    assert adm.answer_s() == pytest.approx(2.0)
    assert adm.tail_factor() == pytest.approx(2.0)
    assert adm.deadline_s() == pytest.approx(8.0)  # the pace is slower than alone: 4 x 2 s
    held = [adm.reserve(), adm.reserve()]  # 2 answers x 2 s x the tail 2 = 8 s: in time
    with pytest.raises(QueueFull, match=r"queue's bound of 8\.0 s") as e:
        adm.reserve()  # 3 x 2 s x 2 = 12 s, with 2 places still free
    assert adm.admitted == 2 and e.value.drain_s is not None
    for slot in held:
        slot.release()
    # the same history without the bound: places alone decide
    off = Admission(4, None, wait_bound=False)
    off.clock = lambda: clock[0]
    _answered(off, clock, 5, 1.0)
    _pairs(off, clock, 32, 4.0)
    held = [off.reserve() for _ in range(4)]
    assert off.deadline_s() is None and off.admitted == 4
    for slot in held:
        slot.release()


def test_the_spread_of_answer_times_shortens_the_queue_before_any_miss():
    """When the load rises, the misses of deep queue places are measured only once those
    places end. Until then the spread of lone answers' times bounds the wait's tail: n
    answers of mean m and deviation s take about n*m + 1.645*s*sqrt(n) at p95."""
    clock = [0.0]
    adm = Admission(16, None, wait_bound=True)
    adm.clock = lambda: clock[0]
    for each in [1.0] + [0.5, 1.5] * 5:  # lone answers: mean 1 s, deviation 0.48 s
        _answered(adm, clock, 1, each)
    assert adm.tail_factor() == 1.0  # fewer than 16 misses: no tail of their own yet
    assert adm.answer_s() == pytest.approx(1.0) and adm.solo_s() == pytest.approx(1.0)
    assert adm.solo_cv() == pytest.approx(0.4767, abs=1e-4)
    assert adm.deadline_s() == pytest.approx(16.0)
    held = [adm.reserve() for _ in range(13)]  # 13 + 1.645 x 0.48 x sqrt(13) = 15.8 s
    with pytest.raises(QueueFull, match=r"about 16\.9 s \(13 requests ahead\)"):
        adm.reserve()  # 14 + 1.645 x 0.48 x sqrt(14) = 16.9 s, over 16 s
    for slot in held:
        slot.release()


def test_a_free_lane_always_admits_under_the_queue_bound():
    """A batch engine runs ``lanes`` answers side by side: a request that finds a lane free
    waits behind no one, so the queue's own bound never refuses it, however long the tail
    measured so far (an explicit ``max_wait_s`` still does)."""
    clock = [0.0]
    admitted = {}
    for lanes in (1, 4):
        adm = Admission(6, 1000.0, wait_bound=True, lanes=lanes)  # the history: a far deadline
        adm.clock = lambda: clock[0]
        _answered(adm, clock, 5, 1.0)
        _pairs(adm, clock, 32, 8.0)  # ~4 s per answer; the first of each pair held 2x or more
        adm.max_wait_s = None  # now the queue's own bound
        assert adm.tail_factor() >= 2.0 and adm.deadline_s() >= 6 * 3.0
        held = []
        with pytest.raises(QueueFull, match="queue's bound"):
            for _ in range(6):
                held.append(adm.reserve())
        admitted[lanes] = adm.admitted
        for slot in held:
            slot.release()
    # one lane: 3 ahead would wait 4 answers x >= 3 s x the tail >= 24 s, over 6 x 4 s;
    # four lanes: all four are admitted, the fifth is refused by the bound
    assert admitted[1] < 4 and admitted[4] == 4
    adm = Admission(16, 1.0, wait_bound=True, lanes=4)  # a deadline of its own
    adm.clock = lambda: clock[0]
    _answered(adm, clock, 5, 1.0)
    with adm.reserve():
        with pytest.raises(QueueFull, match="max_wait_s"):
            adm.reserve()


def test_a_lone_request_is_predicted_at_least_a_lone_answers_time():
    """On a batch engine answers run side by side, so the pace per answer is shorter than one
    answer alone. A request admitted alone is predicted the lone time, not the batched pace:
    its prediction is right, and it does not inflate the tail factor."""
    clock = [0.0]
    adm = Admission(16, None, wait_bound=True)
    adm.clock = lambda: clock[0]
    _answered(adm, clock, 5, 1.0)
    for _ in range(32):
        _answered(adm, clock, 1, 1.0)  # alone: 1 s
        _pairs(adm, clock, 2, 1.0)  # side by side: 2 answers in 1 s
    assert adm.answer_s() < 1.0  # the batched pace
    assert adm.deadline_s() == pytest.approx(16 * 1.0)  # the lone time, not the pace
    assert adm.tail_factor() == pytest.approx(1.0)


def test_a_ticket_place_is_not_a_miss():
    """A ticket runs one job per question in one place: its place is held for all of them,
    which is not a misprediction of one answer's wait."""
    clock = [0.0]
    adm = Admission(16, None, wait_bound=True)
    adm.clock = lambda: clock[0]
    _answered(adm, clock, 5, 1.0)

    async def ticket(questions: int) -> None:
        with adm.reserve(), adm.reserve() as slot:  # one request ahead: predicted 2 s
            for _ in range(questions):
                job = slot.submit(_params())
                clock[0] += 1.0
                adm.release(job)

    for _ in range(20):
        asyncio.run(ticket(5))  # held 5 s each, against the 2 s predicted for one answer
    assert adm.tail_factor() == pytest.approx(1.0)


def test_the_server_refuses_what_it_cannot_answer_in_time(tmp_path_factory):
    """The real server on the real model: once it knows its pace, a request that could not be
    answered within ``server.max_wait_s`` gets a 503 with Retry-After, before any work."""
    docs = tmp_path_factory.mktemp("docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    settings = load_settings(
        server={"max_queue": 8, "max_wait_s": 0.001},  # shorter than any answer
        model={"n_ctx": 1024, "n_parallel": 1, "store_dir": str(docs.parent / "store")},
        embedder={"query_backend": "eager"},
        retrieval={"docs_dir": str(docs), "chunk_tokens": 120, "chunk_overlap": 20},
    )
    s = Services.build(settings)
    try:
        rt = s.models.current()
        body = {"model": rt.id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(5):  # until 5 answers have set the pace, places alone decide
            (r,), _ = _call(s, [("/v1/chat/completions", body)])
            assert r.status_code == 200, r.text
        assert rt.engine.admission.answer_s() > 0.001
        (r,), _ = _call(s, [("/v1/chat/completions", body)])
        assert r.status_code == 200, r.text  # an idle server always admits
        with rt.reserve():  # one request ahead: its wait is over the deadline
            (r,), _ = _call(s, [("/v1/chat/completions", body)])
            assert rt.busy == 1  # refused before any work
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_busy"
        assert "server.max_wait_s" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert rt.busy == 0
    finally:
        s.close()
