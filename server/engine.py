"""Generation engines. An engine runs jobs on a worker thread; requests wait in a bounded
queue (``Admission``) and a full queue is refused at once (503 + Retry-After).

Interface (both engines; the runtime in ``server.runtime`` holds one): ``reserve() -> Slot``
(raises ``QueueFull``; ``Slot.submit(params) -> Job``), ``submit(params) -> Job`` (both at
once), ``busy``, ``n_ctx``, ``cancel_all()``, ``close()``. A ``Job``
is an async iterator of ``Delta``/``Finish`` events with ``cancel()``. Tokenization and chat
formatting belong to the model, not the engine: see ``server.runtime.ModelRuntime``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import queue
import statistics
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from server.cad import CadRunner
from server.generation import Delta, Finish, GenParams, generate
from server.kvcache import KVRunner, KVStore

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    def __init__(self, msg: str, drain_s: float | None = None, backoff: float = 1.0):
        super().__init__(msg)
        self.drain_s = drain_s  # about how long the full queue takes to turn over (seconds)
        # how many times longer than half a turnover refused clients should stay away: more
        # than 1 when far more clients retry than the queue admits (``Admission.backoff``)
        self.backoff = backoff


def retry_after(exc: QueueFull, min_s: int, max_s: int) -> int:
    """The Retry-After for a refused request: half the time the full queue takes to turn over
    (``Admission.drain_s``: a client coming back then finds places, while the queue still
    holds work), times the admission's backoff when far more clients retry than it admits
    (``Admission.backoff``), within [``min_s``, ``max_s``]; ``min_s`` before it is known.
    Fewer, better-timed retries: under a flood the refusals cost the server less."""
    if exc.drain_s is None:
        return min_s
    return int(min(max_s, max(min_s, math.ceil(exc.drain_s / 2 * exc.backoff))))


class EngineStopped(QueueFull):
    """The engine is shutting down (its model was replaced); retry on the current one."""


class PromptTooLong(ValueError):
    pass


_END = object()


class Job:
    """A submitted generation; iterate it for events. Thread-safe hand-off from the worker."""

    def __init__(self, params: GenParams, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.started = asyncio.Event()
        self.slot: Slot | None = None  # its place in the admission queue

    def cancel(self) -> None:
        self.cancelled.set()
        if self.slot is not None:  # still waiting in the queue: ends now and frees its place
            self.slot._admission.withdraw(self)  # noqa: SLF001

    def _put(self, item: Any) -> None:
        self._call(self._events.put_nowait, item)

    def _mark_started(self) -> None:
        self._call(self.started.set)

    def _call(self, fn, *args) -> None:
        """Run ``fn`` on the submitter's event loop. A loop that is closed has no one left to
        read the job: it is cancelled (the worker frees its place at its next step) instead
        of the error reaching, and ending, the worker thread."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Delta | Finish]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def load_llama(path: Path, *, n_ctx: int, n_batch: int, n_threads: int | None, n_gpu_layers: int):
    n_threads = n_threads or os.cpu_count() or 1
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_batch, n_ctx),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=n_gpu_layers,
        verbose=False,
    )


def named_chat_format(name: str):
    """llama-cpp-python's chat format ``name`` (``chatml``, ``llama-2``, ``mistral-instruct``,
    ...) as a formatter: ``f(messages=...) -> ChatFormatterResponse``; ValueError naming the
    known ones for another name."""
    from llama_cpp import llama_chat_format as formats

    known = sorted(n[len("format_") :] for n in dir(formats) if n.startswith("format_"))
    key = name.strip().lower().replace("-", "_")
    if key == "llama_2":
        key = "llama2"
    if key not in known:
        raise ValueError(
            f"model.chat_format {name!r} is not a llama.cpp chat format; known: "
            + ", ".join(k.replace("_", "-") for k in known)
        )
    return getattr(formats, f"format_{key}")


def chat_formatter(llm: llama_cpp.Llama, name: str | None = None):
    """The formatter of ``name`` (``model.chat_format``) or else of the GGUF's own chat
    template; None when the model has neither."""
    if name:
        return named_chat_format(name)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def tok_text(tid: int) -> str:
        return llm._model.token_get_text(tid) if tid >= 0 else ""  # noqa: SLF001

    return Jinja2ChatFormatter(
        template=template,
        eos_token=tok_text(llm.token_eos()),
        bos_token=tok_text(llm.token_bos()),
        stop_token_ids=[llm.token_eos()],
    )


class Slot:
    """A place in an engine's admission queue, reserved before a request does any work
    (retrieval, templating, tokenization) and turned into a ``Job`` by ``submit``. The owner
    calls ``release`` when it no longer needs the place (idempotent); the place is freed once
    the owner has released it and its job, if any, has ended. A slot runs one job at a time
    and may run several in turn (a ticket answers its questions one after the other)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self.job: Job | None = None  # the running job, if any
        self.released = False
        self.freed = False
        self.t0 = admission.clock()  # reserved at
        self.predicted: float | None = None  # its wait as predicted at admission (deadline)
        self.jobs = 0  # jobs run in it (a ticket runs one per question)
        self.alone = False  # nothing else was admitted while it was held

    def submit(self, params: GenParams) -> Job:
        return self._admission._submit(self, params)  # noqa: SLF001

    def release(self) -> None:
        self._admission._release_slot(self)  # noqa: SLF001

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _since(times: collections.deque[float], since: float) -> int:
    """How many of ``times`` (in order) are at or after ``since``."""
    n = 0
    for t in reversed(times):
        if t < since:
            break
        n += 1
    return n


class Admission:
    """Bounded admission and the FIFO hand-off to an engine's worker thread: at most
    ``max_queue`` places (``Slot``: reserved, running or waiting) at once; more are refused at
    once with ``QueueFull``. A request reserves its place first, then prepares its prompt, then
    submits it."""

    def __init__(
        self,
        max_queue: int,
        max_wait_s: float | None = None,
        wait_bound: bool = False,
        lanes: int = 1,
    ):
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s or None  # None or 0: no deadline of its own
        # with no deadline: the queue's own bound, max_queue answers at a lone answer's time
        self.wait_bound = wait_bound
        # answers the engine runs side by side (its batch slots): with only the queue's own
        # bound, a request that finds a lane free is not queued behind anyone and is admitted
        self.lanes = max(1, lanes)
        self.clock = time.monotonic
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.admitted = 0
        self._lock = threading.Lock()
        self._live: set[Job] = set()
        self._queued: set[Job] = set()  # submitted, not yet taken by the worker
        self._stopped = False
        self._held: collections.deque[float] = collections.deque(maxlen=32)  # seconds
        # busy time (some place admitted) accumulated, and its value at each of the last 33
        # freed places: the busy seconds per answer, the engine's recent pace under its load
        self._busy = 0.0
        self._busy_since = 0.0
        self._freed_at: collections.deque[float] = collections.deque(maxlen=33)
        # how long admitted places were really held, as a multiple of the wait predicted
        # at their admission: the deadline check scales its prediction by their 95th
        # percentile, so admitted requests meet the deadline at p95, not on average
        self._misses: collections.deque[float] = collections.deque(maxlen=64)
        # how long the last 32 places held alone took (a lone answer's service time), and
        # the place now held alone, if any
        self._solo: collections.deque[float] = collections.deque(maxlen=32)
        self._alone: Slot | None = None
        # when the last requests were refused and admitted, and the backoff they set
        self._refused: collections.deque[float] = collections.deque(maxlen=4096)
        self._admits: collections.deque[float] = collections.deque(maxlen=1024)
        self._backoff = 1.0
        self._backoff_at = 0.0

    def answer_s(self) -> float | None:
        """Busy seconds per answer over the last 32 freed places (prompt preparation
        included): the time one more queued answer adds, at the engine's recent pace and
        concurrency; None before 5 answers."""
        with self._lock:
            marks = list(self._freed_at)
        return (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) >= 5 else None

    def solo_s(self) -> float | None:
        """The mean time of the last 32 places held alone (nothing else admitted meanwhile),
        reservation to end: one answer's service time on an otherwise idle engine; None
        before 3 of them."""
        with self._lock:
            solo = list(self._solo)
        return sum(solo) / len(solo) if len(solo) >= 3 else None

    def solo_cv(self) -> float:
        """The spread of those lone answers' times: standard deviation ÷ mean (0 before 3)."""
        with self._lock:
            solo = list(self._solo)
        if len(solo) < 3:
            return 0.0
        return statistics.pstdev(solo) / statistics.fmean(solo)

    def deadline_s(self) -> float | None:
        """The wait an admitted request may be predicted: ``max_wait_s`` when set; else, with
        ``wait_bound``, what the queue implies: ``max_queue`` answers at a lone answer's
        service time, or at the engine's recent pace per answer when that is slower; else
        None."""
        return self._deadline(self.solo_s(), self.answer_s())

    def _deadline(self, solo: float | None, per: float | None) -> float | None:
        """``deadline_s`` from the lone answers' mean time and the recent pace."""
        if self.max_wait_s:
            return self.max_wait_s
        if not self.wait_bound:
            return None
        if solo is None and per is None:
            return None
        # a lone answer's time, or the pace when answers got slower than that (longer
        # answers than those last seen alone; a single engine under load)
        return self.max_queue * max(solo or 0.0, per or 0.0)

    def tail_factor(self) -> float:
        """The 95th percentile of held time ÷ predicted wait over the last 64 places admitted
        with a prediction (at least 1; 1 before 16 of them)."""
        with self._lock:
            misses = sorted(self._misses)
        if len(misses) < 16:
            return 1.0
        return max(1.0, misses[int(0.95 * (len(misses) - 1))])

    def drain_s(self) -> float | None:
        """About how long the full queue takes to turn over: the mean time the last 32 places
        were held, reservation to end (Little's law: places / throughput); None before 4."""
        with self._lock:
            held = list(self._held)
        return sum(held) / len(held) if len(held) >= 4 else None

    # Retry-After's backoff: refused requests per admission, over the last BACKOFF_WINDOW_S
    # seconds, that the backoff steers towards; how fast it moves (per second, in log scale,
    # per unit of log of the ratio); its bounds
    RETRIES_PER_ADMISSION = 2.0
    BACKOFF_WINDOW_S = 30.0
    BACKOFF_GAIN = 0.1
    BACKOFF_MAX = 64.0

    def backoff(self) -> float:
        """How many times half a turnover refused clients are asked to wait (at least 1).
        Each client that is refused comes back after its Retry-After; when many more come
        back than the queue can admit, each refusal still costs the server a request. So
        when the last 30 s saw more than 4 refusals per admission, the backoff grows (by
        ``BACKOFF_GAIN`` x the log of the excess per second: a few seconds to double), and
        it shrinks the same way when fewer come, down to 1. Steady state: 1 to 4 refusals
        per admission, whatever the number of clients."""
        with self._lock:
            return self._update_backoff(self.clock())

    def _update_backoff(self, now: float) -> float:  # with the lock held
        dt = now - self._backoff_at
        if dt < 1.0:
            return self._backoff
        self._backoff_at = now
        since = now - self.BACKOFF_WINDOW_S
        refused, admits = _since(self._refused, since), _since(self._admits, since)
        if not refused:
            self._backoff = 1.0
            return self._backoff
        ratio = refused / max(1, admits) / self.RETRIES_PER_ADMISSION
        if 0.5 <= ratio <= 2.0:  # within a factor of 2 of the target: steady
            return self._backoff
        ratio = min(8.0, max(1 / 8, ratio))
        step = self.BACKOFF_GAIN * min(dt, self.BACKOFF_WINDOW_S) * math.log(ratio)
        self._backoff = min(self.BACKOFF_MAX, max(1.0, self._backoff * math.exp(step)))
        return self._backoff

    def reserve(self) -> Slot:
        """A place in the queue, or ``QueueFull`` (``EngineStopped`` while shutting down)."""
        solo, per = self.solo_s(), self.answer_s()
        deadline = self._deadline(solo, per)
        per = per if deadline else None
        # a request waits for the answers ahead of it and its own at the engine's pace, and
        # never less than one answer alone takes (a lone request on a batch engine is not
        # served at the batched pace)
        floor = (solo or 0.0) if per is not None else 0.0
        factor = self.tail_factor() if per is not None else 1.0
        cv = self.solo_cv() if per is not None else 0.0
        with self._lock:
            if self._stopped:
                raise EngineStopped("the model is being replaced")
            n = self.admitted + 1
            predicted = None if per is None else max(floor, n * per)
            # its wait at the 95th percentile: the recent misses' tail, or the spread of a sum
            # of n answers' times (sd x sqrt(n), from the lone answers), whichever is longer;
            # the second holds when the load rises faster than misses are measured
            wait = None
            if predicted is not None:
                wait = max(predicted * factor, predicted + 1.645 * per * cv * math.sqrt(n))
            # an idle engine always admits (the deadline limits waiting behind others; and
            # the pace it measures must keep up with the engine)
            if not self.admitted or (not self.max_wait_s and self.admitted < self.lanes):
                wait = None
            if self.admitted < self.max_queue and (wait is None or wait <= deadline):
                slot = self._admit()
                slot.predicted = predicted
                return slot
            admitted = self.admitted
            now = self.clock()
            self._refused.append(now)
            backoff = self._update_backoff(now)
        drain = self.drain_s()
        if admitted < self.max_queue:  # refused by the deadline
            over = (
                f"server.max_wait_s {self.max_wait_s:g} s"
                if self.max_wait_s
                else f"the queue's bound of {deadline:.1f} s (server.max_queue "
                f"{self.max_queue} answers at {deadline / self.max_queue:.2f} s each)"
            )
            raise QueueFull(
                f"server busy: an answer admitted now would take about {wait:.1f} s "
                f"({admitted} requests ahead), over {over}",
                drain,
                backoff,
            )
        raise QueueFull(f"server busy: {self.max_queue} requests admitted", drain, backoff)

    def reserve_spare(self) -> Slot:
        """A place for an extra answer candidate: only from the lower half of the queue, so
        candidates never crowd out requests (``QueueFull`` otherwise)."""
        with self._lock:
            if not self._stopped and self.admitted < self.max_queue // 2:
                return self._admit()
        raise QueueFull("no spare place for an answer candidate")

    def _admit(self) -> Slot:  # with the lock held
        slot = Slot(self)
        if not self.admitted:  # the engine's busy time starts
            self._busy_since = slot.t0
            slot.alone, self._alone = True, slot
        elif self._alone is not None:  # no longer alone
            self._alone.alone, self._alone = False, None
        self.admitted += 1
        self._admits.append(slot.t0)
        return slot

    def submit(self, params: GenParams) -> Job:
        """Reserve and submit at once; the place is freed when the job ends."""
        slot = self.reserve()
        try:
            return slot.submit(params)
        finally:
            slot.release()

    def _submit(self, slot: Slot, params: GenParams) -> Job:
        with self._lock:
            if slot.released or slot.job is not None:
                raise RuntimeError("slot released or already running a job")
            if self._stopped:  # checked with the put under one lock: never behind the stop
                raise EngineStopped("the model is being replaced")
            job = Job(params, asyncio.get_running_loop())
            job.slot = slot
            slot.job = job
            slot.jobs += 1
            self._live.add(job)
            self._queued.add(job)
            self.jobs.put(job)
        return job

    def take(self, job: Job) -> bool:
        """The worker takes ``job`` off the queue: False when it was withdrawn (cancelled while
        waiting; it has ended and its place is free), and the worker skips it."""
        with self._lock:
            if job not in self._queued:
                return False
            self._queued.discard(job)
            return True

    def withdraw(self, job: Job) -> None:
        """A job cancelled before the worker took it ends at once and frees its place, instead
        of holding it (and refusing others) until the worker reaches it."""
        with self._lock:
            if job not in self._queued:
                return
            self._queued.discard(job)
        job._put(Finish("cancelled", len(job.params.prompt_tokens), 0))
        self.release(job)

    def _free(self, slot: Slot) -> None:  # with the lock held
        if not slot.freed:
            slot.freed = True
            now = self.clock()
            self._busy += now - self._busy_since
            self._busy_since = now
            self.admitted -= 1
            self._held.append(now - slot.t0)
            if self._alone is slot:
                self._alone = None
            if not slot.jobs:  # refused or failed before any answer: not an answer's time
                return
            self._freed_at.append(self._busy)
            if slot.predicted and slot.jobs == 1:  # a ticket's place holds several answers
                self._misses.append((now - slot.t0) / slot.predicted)
            if slot.alone:
                self._solo.append(now - slot.t0)

    def _release_slot(self, slot: Slot) -> None:
        with self._lock:
            slot.released = True
            if slot.job is None:
                self._free(slot)

    def release(self, job: Job) -> None:
        """The job is over: end its event stream, and free its place unless its owner keeps
        it for another job."""
        with self._lock:
            self._live.discard(job)
            slot = job.slot
            if slot is not None and slot.job is job:
                slot.job = None
                if slot.released:
                    self._free(slot)
        job._put(_END)

    def cancel_all(self) -> int:
        """Cancel every admitted job (their streams end as cancelled); the count."""
        with self._lock:
            live = list(self._live)
        for job in live:
            job.cancel()
        return len(live)

    def stop(self) -> None:
        """No more submissions; the worker ends after the jobs already queued."""
        with self._lock:
            self._stopped = True
            self.jobs.put(None)


class Worker:
    """What both engines share: admission, and one worker thread running ``_run``. An engine
    builds everything its worker needs, then calls ``_start_worker`` last."""

    admission: Admission
    _thread: threading.Thread
    stop_timeout_s: float = 60  # how long close() waits for the worker's current step

    def _start_worker(
        self, max_queue: int, name: str, max_wait_s: float | None, wait_bound: bool, lanes: int = 1
    ) -> None:
        self.admission = Admission(max_queue, max_wait_s, wait_bound, lanes)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:  # pragma: no cover - each engine has its own
        raise NotImplementedError

    def _stop_worker(self) -> bool:
        """Stop after the jobs already queued; True when the thread has ended."""
        self.admission.stop()
        self._thread.join(timeout=self.stop_timeout_s)
        return not self._thread.is_alive()

    @property
    def busy(self) -> int:
        return self.admission.admitted

    def reserve(self) -> Slot:
        """A place in the queue for a request about to prepare its prompt (``QueueFull``)."""
        return self.admission.reserve()

    def reserve_spare(self) -> Slot:
        """A place for an extra answer candidate, from the lower half of the queue only."""
        return self.admission.reserve_spare()

    def submit(self, params: GenParams) -> Job:
        return self.admission.submit(params)

    def cancel_all(self) -> int:
        return self.admission.cancel_all()


class Engine(Worker):
    """Single-context engine over a llama model's own context: a worker thread serves jobs one
    at a time, FIFO. Context-aware decoding requests (``GenParams.cad``) run on a small
    two-sequence context of its own instead (``server.cad.CadRunner``, created on the first
    one). It does not own the model (``server.runtime.ModelRuntime`` does)."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        max_queue: int,
        kv: KVStore | None = None,
        max_wait_s: float | None = None,
        wait_bound: bool = False,
    ):
        self.llm = llm
        self.cad = CadRunner(llm)
        self.kv = KVRunner(llm, kv) if kv is not None else None
        self._start_worker(max_queue, "docqa-engine", max_wait_s, wait_bound)

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def _run(self) -> None:
        while True:
            job = self.admission.jobs.get()
            if job is None:
                return
            if not self.admission.take(job):  # withdrawn: already ended
                continue
            try:
                job._mark_started()
                if job.cancelled.is_set():  # also: its loop closed, seen by _mark_started
                    job._put(Finish("cancelled", len(job.params.prompt_tokens), 0))
                    continue
                p = job.params
                events = None
                if p.kv_plan is not None and self.kv is not None and not p.cad:
                    events = self.kv.generate(p, job.cancelled)  # None: plain prefill
                if events is None:
                    run = self.cad.generate if p.cad else partial(generate, self.llm)
                    events = run(p, job.cancelled)
                for ev in events:
                    job._put(ev)
            except Exception as exc:  # a failing request must not kill the worker
                log.exception("generation failed")
                job._put(exc)
            finally:
                self.admission.release(job)

    def close(self) -> bool:
        """Stop the worker after the jobs already queued (cancel them first to be quick), then
        free the CAD context. False when the worker did not stop: it may still be decoding in
        the model's context, so nothing it uses is freed (the owner must not free the model)."""
        if not self._stop_worker():
            log.error("engine worker did not stop; leaking its CAD context rather than freeing it")
            return False
        self.cad.close()
        if self.kv is not None:
            self.kv.close()
        return True
