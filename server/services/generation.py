"""Turn OpenAI chat/completion requests into engine jobs, and engine events into OpenAI
objects. A request is prepared once; only the writer differs for streamed vs whole output."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from docqa.settings import ServerSettings
from retrieval.answers import grounding_score
from server import metrics, tools
from server.engine import Job, PromptTooLong, QueueFull, Slot, retry_after
from server.errors import APIError, bad_request
from server.generation import Delta, Finish, GenParams, TokenLogprob
from server.grammar import GrammarError, GrammarLimits, check_gbnf, json_schema_grammar
from server.schemas import ResponseFormat, _Sampling


@lru_cache(maxsize=64)
def _schema_grammar(schema: str, limits: GrammarLimits) -> LlamaGrammar:
    return LlamaGrammar.from_string(json_schema_grammar(json.loads(schema), limits))


@lru_cache(maxsize=64)
def _gbnf(text: str, limits: GrammarLimits) -> LlamaGrammar:
    check_gbnf(text, limits)  # llama.cpp crashes on what this refuses
    return LlamaGrammar.from_string(text, verbose=False)


def grammar_for(
    rf: ResponseFormat | None, gbnf: str | None = None, limits: GrammarLimits | None = None
) -> LlamaGrammar | None:
    """The checked grammar of a request (``grammar`` or ``response_format``), or None; a
    grammar llama.cpp could not use is a 400 naming the field."""
    limits = limits or GrammarLimits.default()
    if gbnf:  # "" = no grammar, as before
        if rf is not None and rf.type != "text":
            raise bad_request("give either grammar or response_format, not both", "grammar")
        try:
            return _gbnf(gbnf, limits)
        except GrammarError as exc:
            raise bad_request(f"invalid GBNF grammar: {exc}", "grammar", "invalid_grammar") from exc
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object" and rf.schema_ is None:
        return _gbnf(JSON_GBNF, limits)
    spec = rf.schema_
    if rf.type == "json_schema":
        spec = rf.json_schema.schema_ if rf.json_schema else rf.schema_
        if spec is None:
            raise bad_request(
                "response_format.json_schema.schema is required", "response_format.json_schema"
            )
    try:
        return _schema_grammar(json.dumps(spec, sort_keys=True), limits)
    except GrammarError as exc:
        raise bad_request(str(exc), "response_format", "invalid_schema") from exc


@dataclass
class Prepared:
    kind: str  # "chat" | "text"
    model: str
    params: GenParams
    include_usage: bool = False
    echo: str | None = None
    grounding: Any = None  # rag.Grounding: adds "sources" once the text is known
    canned: str | None = None  # answer without running the model (abstain)
    tools: Any = None  # server.tools.ToolPlan when the answer may be tool calls
    # more answers to the same prompt (retrieval.answer_candidates): run beside the first in
    # spare queue places; the one best grounded in ``evidence`` is returned (BestOfJob)
    alternatives: list[GenParams] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    id: str = ""
    created: int = 0

    def __post_init__(self):
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())


def sampling_params(req: _Sampling, defaults, prompt_tokens: list[int], max_tokens: int | None):
    if req.n != 1:
        raise bad_request("only n=1 is supported", "n", "unsupported_value")
    return GenParams(
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens or defaults.default_max_tokens,
        temperature=0.7 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )


def request_bias(req: _Sampling, n_vocab: int | None) -> dict[int, float] | None:
    """The request's OpenAI ``logit_bias`` as {token id: bias}; 400 for an id outside the
    vocabulary (the schema checked the keys' form and the values' range). ``n_vocab`` None: the
    vocabulary is not known here (a remote model): the endpoint checks the ids."""
    if not req.logit_bias:
        return None
    out = {int(k): float(b) for k, b in req.logit_bias.items()}
    bad = [t for t in out if n_vocab is not None and t >= n_vocab]
    if bad:
        raise bad_request(
            f"logit_bias token ids must be in [0, {n_vocab}), got {bad[0]}", "logit_bias"
        )
    return out


def with_cad(rt, params: GenParams, context_free: list[dict[str, str]], alpha: float) -> None:
    """Turn on context-aware decoding for ``params`` (a grounded prompt) when ``alpha`` > 0:
    the context-free prompt is ``context_free`` (the messages without the retrieved excerpts)
    formatted by the runtime ``rt``. ``alpha`` 0 leaves ``params`` as they are (plain)."""
    if alpha > 0:
        params.cad_alpha = float(alpha)
        params.cad_prompt_tokens = rt.prompt_tokens(rt.format_chat(context_free))


@dataclass
class Peer:
    """What the writers need of the HTTP exchange (the router makes it from the request):
    whether the client went away, and where to record usage for the access log."""

    disconnected: Callable[[], Awaitable[bool]]
    record: Callable[[dict, str], None]


class CannedJob:
    """A fixed answer with the same interface as an engine ``Job``."""

    def __init__(self, text: str, rt, n_prompt: int):
        self.text, self.n_prompt = text, n_prompt
        self.n_out = len(rt.tokenize(text))

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        yield Delta(self.text, [])
        yield Finish("stop", self.n_prompt, self.n_out)


def extra_fields(prep: Prepared, text: str) -> dict:
    return prep.grounding.finalize(text) if prep.grounding is not None else {}


def busy(exc: QueueFull, server: ServerSettings) -> APIError:
    """The 503 a full queue answers; ``Retry-After`` says when to try again: between
    ``server.retry_after_s`` and ``server.retry_after_max_s``, from how fast the queue drains
    (``server.engine.retry_after``)."""
    wait = retry_after(exc, server.retry_after_s, server.retry_after_max_s)
    return APIError(
        503,
        f"{exc}; retry later",
        code="server_busy",
        headers={"Retry-After": str(wait)},
    )


def reserve(rt, server: ServerSettings) -> Slot:
    """A place in the admission queue of the runtime ``rt``, taken before the request does any
    work; 503 + ``Retry-After`` when the queue is full. Use it as a context manager around the
    preparation and ``submit``: it is released on any error, and a submitted job keeps it until
    the job ends."""
    try:
        return rt.reserve()
    except QueueFull as exc:
        raise busy(exc, server) from exc


def submit(slot: Slot, rt, prep: Prepared, server: ServerSettings) -> Job | CannedJob:
    """Turn the reserved ``slot`` into the job of ``prep`` on the runtime ``rt`` (a
    ``server.runtime.ModelRuntime``); a canned answer needs no job (the slot is freed when its
    owner releases it). A runtime stopped since the place was reserved (a reload that
    outlasted its drain) is a 503 with ``Retry-After``, like a full queue."""
    if prep.canned is not None:
        return _stamp(CannedJob(prep.canned, rt, len(prep.params.prompt_tokens)))
    try:
        rt.check_fits(prep.params.n_prompt_max, "messages" if prep.kind == "chat" else "prompt")
    except PromptTooLong as exc:
        raise APIError(
            400,
            str(exc),
            param="messages" if prep.kind == "chat" else "prompt",
            code="context_length_exceeded",
        ) from exc
    try:
        job = slot.submit(prep.params)
    except QueueFull as exc:  # EngineStopped
        raise busy(exc, server) from exc
    if prep.alternatives:
        evidence = prep.evidence
        job = with_candidates(rt, job, prep.alternatives, lambda t: grounding_score(t, evidence))
    return _stamp(job)


def alternatives(params: GenParams, n: int, temperature: float) -> list[GenParams]:
    """``n`` sampled variants of a grounded answer's ``params`` (retrieval.answer_candidates) at
    ``temperature``, seeds following the answer's when it has one. Plain prefill: a chunk KV
    plan stays the first answer's."""
    return [
        dataclasses.replace(
            params,
            temperature=temperature,
            seed=None if params.seed is None else params.seed + i,
            kv_plan=None,
        )
        for i in range(1, n + 1)
    ]


def with_candidates(rt, job, more: list[GenParams], score: Callable[[str], Any]):
    """``job``, or a ``BestOfJob`` of it and the ``more`` alternatives submitted to ``rt``,
    each in a spare place of its queue (its lower half: fewer candidates, or none, when the
    queue is busy; never a 503, never a place a request needs), choosing by ``score`` (text
    -> a comparable, higher is better). A remote runtime has no spare places: none run."""
    extra = []
    for params in more:
        try:
            slot = rt.reserve_spare()
        except QueueFull:
            break
        try:
            extra.append(slot.submit(params))
        except QueueFull:  # the engine is stopping (a model reload): the first answer only
            break
        finally:
            slot.release()  # the place is freed when its job ends
    return BestOfJob([job, *extra], score) if extra else job


class BestOfJob:
    """Several answers to one grounded prompt, run side by side, with the interface of an
    engine ``Job``: yields the answer with the highest ``score`` (chat: how well it keeps to
    its evidence lines, ``retrieval.answers.grounding_score``; tickets: whether it passes the
    automatic-reply checks; the first, the usual answer, on a tie), whole,
    and its ``Finish`` with every candidate's completion tokens counted. Answers that did not
    end normally (cancelled, error) are not chosen; if the first did not, its events are
    passed on as they are."""

    def __init__(self, jobs: list, score: Callable[[str], Any]):
        self.jobs, self.score = jobs, score
        self.chosen: int | None = None  # index of the answer returned
        self.scores: list = []

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def __aiter__(self):
        runs = await asyncio.gather(*(_drain(job) for job in self.jobs), return_exceptions=True)
        if isinstance(runs[0], BaseException):
            self.cancel()
            raise runs[0]
        runs = [[] if isinstance(r, BaseException) else r for r in runs]  # failed: not chosen
        texts, fins = [], []
        for events in runs:
            texts.append("".join(ev.text for ev in events if isinstance(ev, Delta)))
            fins.append(next((ev for ev in events if isinstance(ev, Finish)), None))
        ok = [i for i, f in enumerate(fins) if f is not None and f.reason in ("stop", "length")]
        if 0 not in ok:
            self.cancel()
            for ev in runs[0]:
                yield ev
            return
        self.scores = [self.score(t) for t in texts]
        self.chosen = max(ok, key=lambda i: self.scores[i])  # the first of equals: the usual
        fin = fins[self.chosen]
        spent = sum(f.completion_tokens for f in fins if f is not None)
        yield Delta(texts[self.chosen], [])
        yield Finish(fin.reason, fin.prompt_tokens, spent, fin.error)


def _stamp(job):
    """Note when ``job`` was submitted, and when its first text came (for /metrics)."""
    job.t_submit = time.perf_counter()
    job.t_first = None
    return job


def _first_text(job, ev) -> None:
    if getattr(job, "t_first", 1) is None and isinstance(ev, Delta) and ev.text:
        job.t_first = time.perf_counter()


def _observe(prep: Prepared, job, fin: Finish) -> None:
    t0, t1 = getattr(job, "t_submit", None), getattr(job, "t_first", None)
    ttft = decode = None
    if t0 is not None and t1 is not None:
        ttft = t1 - t0
        # (candidates arrive whole, their tokens summed: no per-token decode time)
        if fin.completion_tokens > 1 and not isinstance(job, BestOfJob):
            decode = (time.perf_counter() - t1) / (fin.completion_tokens - 1)
    metrics.observe_generation(prep.kind, fin.prompt_tokens, fin.completion_tokens, ttft, decode)


# -- OpenAI object builders ------------------------------------------------------------
def _chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries],
        "text_offset": offsets,
    }


def usage(fin: Finish) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def _base(prep: Prepared, obj: str) -> dict:
    return {
        "id": prep.id,
        "object": obj,
        "created": prep.created,
        "model": prep.model,
        "system_fingerprint": "docqa",
    }


async def until_disconnected(disconnected: Callable[[], Awaitable[bool]], coro) -> Any:
    """``await coro``, checking every 0.25 s whether the client went away (uvicorn does not
    cancel a handler whose client left): then the work is cancelled (its jobs with it) and a
    499 ``client_closed`` raised (``whole`` waits on its job's events this way)."""
    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await disconnected():
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # it failed while the check ran: its error stands
                raise APIError(499, "client disconnected", code="client_closed")
        return task.result()
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()


async def whole(peer: Peer, prep: Prepared, job: Job) -> dict:
    text, lps, fin = [], [], None
    try:
        events = await until_disconnected(peer.disconnected, _drain(job, prep.tools is not None))
    except BaseException:  # the client left, the job failed, or this handler was cancelled
        job.cancel()
        raise
    for ev in events:
        if isinstance(ev, Delta):
            text.append(ev.text)
            lps.extend(ev.logprobs)
        else:
            fin = ev
    assert fin is not None
    out_text = "".join(text)
    reason, calls = _tool_finish(prep, out_text, fin.reason)
    _observe(prep, job, fin)
    peer.record(usage(fin), reason)
    if prep.kind == "chat":
        message = {"role": "assistant", "content": out_text, "refusal": None}
        if calls:
            message.update(content=None, tool_calls=calls)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(lps) if prep.params.logprobs else None,
            "finish_reason": reason,
        }
        body = _base(prep, "chat.completion")
    else:
        echo = prep.echo or ""
        choice = {
            "index": 0,
            "text": echo + out_text,
            "logprobs": _text_logprobs(lps, len(echo)) if prep.params.logprobs else None,
            "finish_reason": fin.reason,
        }
        body = _base(prep, "text_completion")
    body.update(choices=[choice], usage=usage(fin), **extra_fields(prep, out_text))
    if isinstance(job, BestOfJob) and job.chosen is not None:
        body["answer_candidates"] = {
            "n": len(job.jobs),
            "chosen": job.chosen,
            "scores": job.scores,
        }
    return body


async def _drain(job: Job, watch_calls: bool = False) -> list:
    out, text = [], ""
    async for ev in job:
        _first_text(job, ev)
        out.append(ev)
        if watch_calls and isinstance(ev, Delta):
            text += ev.text
            if tools.repeated(text):  # a small model loops on its calls: stop there
                job.cancel()
    return out


def _tool_finish(prep: Prepared, text: str, reason: str) -> tuple[str, list[dict] | None]:
    """(finish_reason, tool_calls): an answer of complete tool calls ends with "tool_calls"
    (also when it was stopped at a repeated call, or ran on into ``max_tokens`` after one
    before the stop took effect). One cut by max_tokens keeps "length" and the calls it
    completed (the unfinished one dropped: before, the client got the raw call markup as
    text). A reason OpenAI's API does not have (an answer the server ended) is "stop"."""
    if reason not in ("stop", "length"):
        reason = "stop"  # e.g. "cancelled": tools' loop guard ended a plain answer
    if prep.tools is None or prep.kind != "chat":
        return reason, None
    calls = tools.parse_calls(text)
    if calls and (reason == "stop" or tools.looped(text)):
        return "tool_calls", calls
    if calls:
        return "length", calls
    return reason, None


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def stream(
    peer: Peer, prep: Prepared, job: Job, on_close: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """SSE chunks of ``job``; ``on_close`` runs when the stream ends, however it ends."""
    chat = prep.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    use = {"usage": None} if prep.include_usage else {}

    def chunk(delta_or_text, lps=None, finish=None, extra=None):
        c = _base(prep, obj)
        if chat:
            ch = {"index": 0, "delta": delta_or_text, "logprobs": lps, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": delta_or_text, "logprobs": lps, "finish_reason": finish}
        c.update(choices=[ch], **use, **(extra or {}))
        return _sse(c)

    offset = len(prep.echo or "")  # text_offset of the next token (completions' logprobs)
    produced: list[str] = []
    held: list[TokenLogprob] = []  # logprobs of text held back until call-or-text is known
    # with tools, the first character tells a call ("<", held back until the end) from text
    calling: bool | None = None if (chat and prep.tools is not None) else False
    try:
        if chat:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
        elif prep.echo:
            yield chunk(prep.echo)
        fin = None
        try:
            async for ev in job:
                if isinstance(ev, Finish):
                    fin = ev
                    break
                _first_text(job, ev)
                entries = ev.logprobs or []
                produced.append(ev.text)
                if calling is None:
                    held.extend(entries)
                    head = "".join(produced).lstrip()
                    if not head:
                        continue
                    calling = head.startswith("<")
                    if not calling:  # plain text: what was held back goes out now
                        lp = _chat_logprobs(held) if prep.params.logprobs else None
                        yield chunk({"content": "".join(produced)}, lp)
                        continue
                lp = None
                if prep.params.logprobs:
                    # offsets count the tokens' own text, as the whole answer's do: a token
                    # held back for a possible stop string still moves them
                    lp = _chat_logprobs(entries) if chat else _text_logprobs(entries, offset)
                    offset += sum(len(e.token) for e in entries)
                if calling:
                    if tools.repeated("".join(produced)):
                        job.cancel()
                    continue
                yield chunk({"content": ev.text} if chat else ev.text, lp)
        except Exception as exc:  # noqa: BLE001 - report in-band, the headers are sent
            yield _sse(
                {
                    "error": {
                        "message": str(exc),
                        "type": "server_error",
                        "param": None,
                        "code": "generation_failed",
                    }
                }
            )
            return
        assert fin is not None
        reason, calls = _tool_finish(prep, "".join(produced), fin.reason)
        _observe(prep, job, fin)
        peer.record(usage(fin), reason)
        if calls:
            for i, c in enumerate(calls):
                fn = c["function"]
                head = {"index": i, "id": c["id"], "type": "function"}
                yield chunk(
                    {"tool_calls": [head | {"function": {"name": fn["name"], "arguments": ""}}]}
                )
                yield chunk(
                    {"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}
                )
        elif calling is not False and produced and "".join(produced):
            yield chunk({"content": "".join(produced)})  # held back, not calls after all
        yield chunk({} if chat else "", None, reason, extra_fields(prep, "".join(produced)))
        if prep.include_usage:
            final = _base(prep, obj)
            final.update(choices=[], usage=usage(fin))
            yield _sse(final)
        yield _sse("[DONE]")
    finally:
        job.cancel()  # no-op when finished; stops generation when the client went away
        if on_close is not None:
            on_close()


def merge_bias(a: dict[int, float] | None, b: dict[int, float] | None):
    """Two logit biases summed per token (either may be None), within OpenAI's [-100, 100]; a
    token either bans (-100) stays banned."""
    if not a or not b:
        return a or b
    out = dict(a)
    for t, v in b.items():
        if out.get(t, 0.0) <= -100 or v <= -100:
            out[t] = -100.0
        else:
            out[t] = max(-100.0, min(100.0, out.get(t, 0.0) + v))
    return out
