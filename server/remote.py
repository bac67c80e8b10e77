"""Generation on remote OpenAI-compatible servers (``model.endpoints``: vLLM, llama.cpp's
server, another docqa) instead of a local GGUF.

``RemoteRuntime`` is a ``ModelRuntime`` whose engine is an ``EndpointPool``: prompts are still
built and measured here (the embedded model's tokenizer and chat template count tokens, so the
context budget, chunking and ``check_fits`` work as with a local model; ``n_ctx`` comes from
``model.n_ctx``), and each job is sent to the least busy healthy endpoint as a streamed
``/chat/completions`` (the request's messages) or ``/completions`` (a raw prompt).

Before the first token, a job moves on to another endpoint when its endpoint cannot be reached
or drops the connection (that endpoint is marked unhealthy until a background check, ``GET
/models`` every ``endpoint_health_s``, passes again) or answers busy or failed (429, 5xx: tried
elsewhere, not marked). An endpoint that does not answer within ``endpoint_timeout_s`` is a
504, not retried (it may still be working on it); a failure after the first token, an endpoint
refusing docqa itself (401, 403, 404) or every endpoint answering with a failure is a 502
``upstream_error``; only the request's own faults (400, 413, 422) are passed through. With none
healthy (at ``submit``, or once each was tried and found unreachable) the answer is 503
``endpoints_unavailable`` with Retry-After. A cancelled job (its client left) closes its
request at once, so the endpoint stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from docqa.settings import ModelSettings
from models.store import DERIVED, ModelStore, ResolvedModel
from server.engine import QueueFull
from server.errors import APIError
from server.generation import Delta, Finish, GenParams
from server.runtime import ModelRuntime

log = logging.getLogger(__name__)
EMBEDDED = ModelSettings.model_fields["model"].default  # the tokenizer used to count tokens


@dataclass
class Endpoint:
    base: str  # .../v1
    healthy: bool = False
    busy: int = 0
    served: int = 0
    models: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "url": self.base,
            "healthy": self.healthy,
            "busy": self.busy,
            "served": self.served,
            "error": self.error,
        }


class NoEndpoint(APIError):
    def __init__(self, why: str, retry_after: int):
        super().__init__(
            503,
            f"no generation endpoint is available ({why}); retry later",
            code="endpoints_unavailable",
            headers={"Retry-After": str(retry_after)},
        )


class EndpointPool:
    """The remote endpoints: health, least-busy choice, and the ``engine`` interface
    (``submit``, ``busy``, ``n_ctx``, ``cancel_all``, ``close``) for ``ModelRuntime``."""

    def __init__(self, ms: ModelSettings, model: str | None, max_queue: int, tokenize):
        self.endpoints = [Endpoint(u.rstrip("/")) for u in ms.endpoints]
        self.n_ctx = ms.n_ctx
        self.timeout = ms.endpoint_timeout_s
        self.interval = ms.endpoint_health_s
        self.retry_after = max(1, round(ms.endpoint_health_s))
        key = ms.endpoint_api_key.get_secret_value() if ms.endpoint_api_key else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = model
        self.max_queue = max_queue
        self.tokenize = tokenize
        self._lock = threading.Lock()
        self._jobs: set[RemoteJob] = set()
        self._reserved = 0  # places taken by requests still preparing (RemoteSlot)
        self._next = 0
        self._stop = threading.Event()
        # one client per event loop (its connections belong to the loop), closed with the pool
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
        self.on_listed = None  # called after a health check lists an endpoint's models
        self.check_all()
        self._thread = threading.Thread(target=self._watch, name="docqa-endpoints", daemon=True)
        self._thread.start()

    # -- health ---------------------------------------------------------------------------
    def check(self, ep: Endpoint) -> None:
        try:
            r = httpx.get(ep.base + "/models", headers=self.headers, timeout=min(5, self.timeout))
            r.raise_for_status()
            # a docqa endpoint also lists its retrieval model: not a base model to generate with
            ep.models = [
                m["id"]
                for m in r.json().get("data", [])
                if not (m.get("meta") or {}).get("retrieval")
            ]
            if not ep.healthy:
                log.info("endpoint %s healthy (%s)", ep.base, ", ".join(ep.models))
            ep.healthy, ep.error = True, None
        except Exception as exc:  # noqa: BLE001
            self.mark_down(ep, f"health check: {exc}")
            return
        if self.on_listed is not None:
            try:
                self.on_listed()
            except Exception:  # noqa: BLE001 - logged; the checks go on
                log.exception("checking the served model name failed")

    def check_all(self) -> None:
        for ep in self.endpoints:
            self.check(ep)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.check_all()

    def mark_down(self, ep: Endpoint, why: str) -> None:
        if ep.healthy or ep.error is None:
            log.warning("endpoint %s unhealthy: %s", ep.base, why)
        ep.healthy, ep.error = False, why

    def pick(self, tried: set[str]) -> Endpoint | None:
        """The healthy endpoint with the fewest requests in flight (ties: round robin)."""
        with self._lock:
            ok = [e for e in self.endpoints if e.healthy and e.base not in tried]
            if not ok:
                return None
            self._next += 1
            n = len(self.endpoints)
            order = {e.base: (i - self._next) % n for i, e in enumerate(self.endpoints)}
            ep = min(ok, key=lambda e: (e.busy, order[e.base]))
            ep.busy += 1
            return ep

    def done(self, ep: Endpoint) -> None:
        with self._lock:
            ep.busy -= 1

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:  # a new loop (or a dead one's id reused)
            c = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(5.0, self.timeout)),
                headers=self.headers,
                # every admitted job may hold a connection (httpx's default is 100)
                limits=httpx.Limits(max_connections=max(100, self.max_queue)),
            )
            entry = self._clients[id(loop)] = (loop, c)
        return entry[1]

    # -- engine interface -------------------------------------------------------------------
    def _check_healthy(self) -> None:
        if not any(e.healthy for e in self.endpoints):
            why = "; ".join(f"{e.base}: {e.error}" for e in self.endpoints)
            raise NoEndpoint(why, self.retry_after)

    def reserve(self) -> int:
        """Take a place before the request prepares its prompt (admission before work, as the
        local engines do): ``QueueFull`` when in-flight jobs and reserved places fill
        ``max_queue``; 503 at once when no endpoint is healthy."""
        self._check_healthy()
        with self._lock:
            taken = len(self._jobs) + self._reserved
            if taken >= self.max_queue:
                raise QueueFull(f"{taken} requests in flight")
            self._reserved += 1
        return self._reserved

    def unreserve(self) -> None:
        with self._lock:
            self._reserved -= 1

    def submit(self, params: GenParams, reserved: bool = False) -> RemoteJob:
        self._check_healthy()
        with self._lock:
            if not reserved and len(self._jobs) + self._reserved >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests in flight")
            job = RemoteJob(self, params)
            self._jobs.add(job)
        return job

    def _finished(self, job: RemoteJob) -> None:
        with self._lock:
            self._jobs.discard(job)

    @property
    def busy(self) -> int:
        return len(self._jobs)

    def cancel_all(self) -> int:
        with self._lock:
            jobs = list(self._jobs)
        for j in jobs:
            j.cancel()
        return len(jobs)

    def close(self) -> bool:
        self._stop.set()
        clients, self._clients = list(self._clients.values()), {}
        for loop, c in clients:  # closed on their own loops (a reload must not leak sockets)
            if loop.is_closed():  # so are its connections
                continue
            coro = c.aclose()
            try:
                asyncio.run_coroutine_threadsafe(coro, loop)
            except RuntimeError:  # closed meanwhile
                coro.close()
        self._thread.join(timeout=min(5.0, self.timeout) + 1)
        return True  # no thread of its own uses the vocabulary-only model


def _body(params: GenParams, model: str | None) -> tuple[str, dict]:
    body: dict = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = params.stop
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.logit_bias:  # ids of the runtime's vocabulary: the endpoints serve its model
        body["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}
    if params.grammar is not None:  # GBNF: llama.cpp's server and docqa take it as is
        body["grammar"] = params.grammar._grammar  # noqa: SLF001
    if params.messages is not None:
        return "/chat/completions", {**body, "messages": params.messages}
    return "/completions", {**body, "prompt": params.prompt_text}


class _Retry(Exception):
    pass


_END = object()  # the end of a pump's events


def _upstream(status: int, message: str, code: str = "upstream_error") -> APIError:
    return APIError(status, message, code=code)


class RemoteJob:
    """One remote generation with the interface of an engine ``Job``: an async iterator of
    ``Delta`` events ending with a ``Finish``, and ``cancel()`` (from any thread)."""

    def __init__(self, pool: EndpointPool, params: GenParams):
        self.pool = pool
        self.params = params
        self.cancelled = threading.Event()
        self.endpoint: str | None = None
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if not self._started:  # never iterated (the client left first): free its admission
            self.pool._finished(self)  # noqa: SLF001
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:  # wakes the iterator at once, which closes the request
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # its loop is closed: nothing left to stop
                pass

    async def __aiter__(self) -> AsyncIterator[Delta | Finish]:
        pool = self.pool
        tried: set[str] = set()
        failures: list[str] = []
        self._started = True
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            if self.cancelled.is_set():  # cancelled before it started: nothing is sent
                yield Finish("cancelled", len(self.params.prompt_tokens), 0)
                return
            while True:
                ep = pool.pick(tried)
                if ep is None:
                    if failures and any(e.healthy for e in pool.endpoints):
                        # some endpoint is up but answered with a failure (429, 5xx)
                        raise _upstream(502, "every endpoint failed: " + "; ".join(failures))
                    # every endpoint is down (cannot be reached): unavailable, retry later
                    why = "; ".join(f"{e.base}: {e.error}" for e in pool.endpoints)
                    raise NoEndpoint(why, pool.retry_after)
                tried.add(ep.base)
                self.endpoint = ep.base
                try:
                    async for ev in self._run(ep):
                        if isinstance(ev, Finish):
                            ep.served += 1  # before the consumer stops at the Finish
                        yield ev
                    return
                except _Retry as r:
                    if r.args:
                        failures.append(f"{ep.base}: {r.args[0]}")
                    continue  # nothing was streamed yet: another endpoint
                finally:
                    pool.done(ep)
        finally:
            pool._finished(self)  # noqa: SLF001

    async def _run(self, ep: Endpoint) -> AsyncIterator[Delta | Finish]:
        """The events of ``_pump`` on ``ep``; a cancel closes its request at once (before:
        only when the endpoint sent its next line, up to ``endpoint_timeout_s`` later)."""
        q: asyncio.Queue = asyncio.Queue()
        pump = asyncio.create_task(self._pump(ep, q))
        waker = asyncio.create_task(self._wake.wait())
        n_out = 0
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # cancelled: the request is closed by the finally
                    getter.cancel()
                    yield Finish("cancelled", len(self.params.prompt_tokens), n_out)
                    return
                item = getter.result()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                n_out += isinstance(item, Delta)
                yield item
        finally:
            pump.cancel()
            waker.cancel()
            await asyncio.gather(pump, waker, return_exceptions=True)

    async def _pump(self, ep: Endpoint, q: asyncio.Queue) -> None:
        try:
            async for ev in self._stream(ep):
                q.put_nowait(ev)
            q.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the iterator
            q.put_nowait(exc)

    async def _stream(self, ep: Endpoint) -> AsyncIterator[Delta | Finish]:
        pool = self.pool
        path, body = _body(self.params, pool.model)
        started = False
        text: list[str] = []
        usage = None
        reason = "stop"
        t0 = time.perf_counter()
        try:
            async with pool.client().stream("POST", ep.base + path, json=body) as r:
                if r.status_code >= 500 or r.status_code == 429:  # busy or failed: elsewhere
                    detail = (await r.aread()).decode(errors="replace")[:300]
                    raise _Retry(f"HTTP {r.status_code}: {detail}")
                if r.status_code >= 400:
                    raise _remote_error(
                        ep.base, r.status_code, (await r.aread()).decode(errors="replace")
                    )
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError as exc:
                        raise _upstream(
                            502, f"endpoint {ep.base} sent a line that is not JSON: {data[:200]}"
                        ) from exc
                    if "error" in obj:
                        err = obj["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        raise _upstream(502, f"endpoint {ep.base} failed: {msg}")
                    usage = obj.get("usage") or usage
                    for ch in obj.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content") if "delta" in ch else None
                        if piece is None:
                            piece = ch.get("text")
                        if piece:
                            started = True
                            text.append(piece)
                            yield Delta(piece, [])
                        if ch.get("finish_reason"):
                            reason = ch["finish_reason"]
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):  # never reached: not working on it
                pool.mark_down(ep, f"{type(exc).__name__}: {exc}")
                raise _Retry(str(exc) or type(exc).__name__) from exc
            # still working on it, maybe: another endpoint would do it twice
            raise _upstream(
                504,
                f"endpoint {ep.base} did not answer within {pool.timeout:g} s "
                "(model.endpoint_timeout_s)",
                "upstream_timeout",
            ) from exc
        except httpx.TransportError as exc:  # refused, reset, dropped: the endpoint is down
            pool.mark_down(ep, f"{type(exc).__name__}: {exc}")
            if started:  # the client has part of the answer
                raise _upstream(502, f"endpoint {ep.base} failed mid-answer: {exc}") from exc
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        n_prompt = (usage or {}).get("prompt_tokens") or len(self.params.prompt_tokens)
        n_out = (usage or {}).get("completion_tokens")
        if n_out is None:
            n_out = len(pool.tokenize("".join(text)))
        log.debug("%s: %d tokens in %.2fs", ep.base, n_out, time.perf_counter() - t0)
        yield Finish(
            reason if reason in ("stop", "length", "cancelled") else "stop", n_prompt, n_out
        )


def _remote_error(base: str, status: int, text: str) -> APIError:
    """An endpoint's 4xx: the request's own fault (400, 413, 422) is passed through; one
    about docqa itself (a wrong ``endpoint_api_key``: 401, 403; a model it does not serve:
    404) is a 502, so that the client is not told its own key or model is wrong."""
    try:
        err = json.loads(text)["error"]
        msg, param, code = err.get("message", text), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        msg, param, code = text[:500], None, "remote_error"
    if status in (400, 413, 422):
        return APIError(status, msg, param=param, code=code)
    return _upstream(502, f"endpoint {base} refused the request: HTTP {status}: {msg}")


class RemoteRuntime(ModelRuntime):
    """A runtime that generates on ``model.endpoints``; tokenizes with the embedded model's
    vocabulary (vocab only: no weights, no context)."""

    def reserve_spare(self):
        """No answer candidates on remote endpoints (their queues are not ours to fill)."""
        raise QueueFull("no spare places on remote endpoints")

    def __init__(self, ms: ModelSettings, max_queue: int):
        import llama_cpp

        t0 = time.perf_counter()
        store = ModelStore(ms.store_dir)
        try:
            # a quant made from the embedded model counts with the embedded file itself (the
            # same vocabulary), not made here just to count
            name = DERIVED[ms.model][0] if ms.model in DERIVED else ms.model
            counter: ResolvedModel = store.resolve(name)
        except Exception:  # noqa: BLE001 - a remote-only name: count with the embedded model
            counter = store.resolve(EMBEDDED)
            self.same_vocab = False  # token ids (a logit bias) are not the endpoints' own
        self.path = counter.path
        self.provenance = {"kind": "remote", "endpoints": list(ms.endpoints)}
        self.llm = llama_cpp.Llama(str(counter.path), vocab_only=True, verbose=False)
        try:
            self._read_vocab(ms.chat_format)
            self.engine = EndpointPool(ms, None, max_queue, self.tokenize)
            self.id = self.engine.model = self._model_name(ms)
            # no endpoint listed its models yet: the name is checked when one does
            self._named = any(e.models for e in self.engine.endpoints)
            self.engine.on_listed = lambda: self._relisted(ms)
        except BaseException:
            if getattr(self, "engine", None) is not None:
                self.engine.close()
            self.llm.close()
            raise
        self.n_ctx = ms.n_ctx
        self.loaded_at = time.time()
        self.load_seconds = time.perf_counter() - t0
        self._cond = threading.Condition()
        self._users = 0
        self._retired = False
        self._closed = False
        self._warned_cad = False
        log.info(
            "remote model %s on %d endpoints (%d healthy)",
            self.id,
            len(ms.endpoints),
            sum(e.healthy for e in self.engine.endpoints),
        )

    def _model_name(self, ms: ModelSettings) -> str:
        listed = [m for e in self.engine.endpoints for m in e.models]
        if ms.model in listed or (ms.model != EMBEDDED and not listed):
            return ms.model
        if ms.model == EMBEDDED and listed:
            return listed[0]  # the default name: the first id an endpoint lists
        if not listed:
            return ms.model  # none reachable yet: the configured name, checked when one is
        raise ValueError(
            f"model {ms.model!r} is not served by the endpoints (they list {', '.join(listed)})"
        )

    def _relisted(self, ms: ModelSettings) -> None:
        """The served name, once an endpoint lists its models (docqa started before its
        endpoints: the default name is then the first id listed, not the embedded model's)."""
        if self._named or not any(e.models for e in self.engine.endpoints):
            return
        try:
            name = self._model_name(ms)
        except ValueError as exc:
            log.error("%s", exc)
            return
        self._named = True
        if name != self.id:
            log.info("remote model name: %s (listed by the endpoints)", name)
            self.id = self.engine.model = name

    @property
    def endpoints(self) -> list[dict]:
        return [e.to_dict() for e in self.engine.endpoints]

    def reserve(self) -> RemoteSlot:
        """A place taken before the request prepares its prompt (``server.engine.Slot``'s
        interface)."""
        self.engine.reserve()
        return RemoteSlot(self)

    def submit(self, params: GenParams, reserved: bool = False):
        if params.messages is None and params.prompt_text is None:
            params.prompt_text = self.detokenize(params.prompt_tokens)
        if params.cad and not self._warned_cad:
            self._warned_cad = True
            log.warning("context-aware decoding needs local logits: remote answers decode plainly")
        return self.engine.submit(params, reserved)


class RemoteSlot:
    """``server.engine.Slot`` for a remote runtime: a reserved place in the endpoint pool's
    bound, freed when its owner releases it (a submitted job counts on its own until it ends)."""

    def __init__(self, rt: RemoteRuntime):
        self.rt = rt
        self.job = None
        self.released = False

    def submit(self, params: GenParams):
        self.job = self.rt.submit(params, reserved=True)
        return self.job

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.rt.engine.unreserve()

    def __enter__(self) -> RemoteSlot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
