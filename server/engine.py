"""The engine owns the llama.cpp context. One request uses it at a time (a worker thread),
others wait in a bounded queue; a full queue is refused at once (503 + Retry-After).

Interface used by the services (kept when continuous batching replaces the worker):
``submit(params) -> Job`` (raises ``QueueFull``), ``Job`` is an async iterator of
``Delta``/``Finish`` events with ``cancel()``; plus tokenization and chat formatting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from server.generation import Delta, Finish, GenParams, generate

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


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

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    def _mark_started(self) -> None:
        self._loop.call_soon_threadsafe(self.started.set)

    async def __aiter__(self) -> AsyncIterator[Delta | Finish]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class LoadedModel:
    id: str
    path: Path
    llm: llama_cpp.Llama
    formatter: Jinja2ChatFormatter | None
    provenance: dict | None = None


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


def chat_formatter(llm: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
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


class Engine:
    """Single-context engine: a worker thread serves jobs one at a time, FIFO."""

    def __init__(self, model: LoadedModel, max_queue: int):
        self.model = model
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="docqa-engine", daemon=True)
        self._thread.start()

    # -- properties used by services -------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.model.llm.n_ctx()

    @property
    def busy(self) -> int:
        return self._admitted

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.model.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        fmt = self.model.formatter
        if fmt is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant: "
        return fmt(messages=messages).prompt

    def prompt_tokens(self, prompt: str) -> list[int]:
        llm = self.model.llm
        add_bos = bool(llm._model.add_bos_token())  # noqa: SLF001
        bos_text = llm._model.token_get_text(llm.token_bos()) if add_bos else ""  # noqa: SLF001
        if bos_text and prompt.startswith(bos_text):
            add_bos = False
        return self.tokenize(prompt, add_bos=add_bos, special=True)

    def check_fits(self, n_prompt: int, param: str) -> None:
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(
                f"This model's maximum context length is {self.n_ctx} tokens, but the prompt "
                f"is {n_prompt} tokens. Shorten the {param} (docqa never truncates it silently)."
            )

    # -- submission ------------------------------------------------------------------
    def submit(self, params: GenParams) -> Job:
        with self._lock:
            if self._admitted >= self.max_queue:
                raise QueueFull(f"server busy: {self._admitted} requests admitted")
            self._admitted += 1
        job = Job(params, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _Exclusive):
                job.task()
                continue
            try:
                if job.cancelled.is_set():
                    job._put(Finish("cancelled", len(job.params.prompt_tokens), 0))
                    continue
                job._mark_started()
                for ev in generate(self.model.llm, job.params, job.cancelled):
                    job._put(ev)
            except Exception as exc:  # a failing request must not kill the worker
                log.exception("generation failed")
                job._put(exc)
            finally:
                self._release()
                job._put(_END)

    def run_exclusive(self, fn, *args):
        """Run ``fn`` on the worker thread between requests (e.g. a model swap); blocking."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def task():
            try:
                box["value"] = fn(*args)
            except Exception as exc:  # noqa: BLE001
                box["error"] = exc
            finally:
                done.set()

        self._jobs.put(_Exclusive(task))  # type: ignore[arg-type]
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        try:
            self.model.llm.close()
        except Exception:  # noqa: BLE001
            pass


class _Exclusive:
    def __init__(self, task):
        self.task = task
