"""The model runtime: one object owns a loaded model and everything derived from it.

``ModelRuntime`` holds the llama model, its engine (single or batched), the chat formatter,
the context size and the tokenizer methods. Nothing else keeps a llama object: services ask
the ``ModelManager`` for a *lease* on the current runtime, use it for one request (prompt
building, tokenization, generation, streaming), then release it.

A reload builds the new runtime beside the old one, swaps it in atomically (new requests get
it at once), lets requests still holding the old one finish (``server.reload_drain_s``), then
cancels what is left and closes it. The old model is freed only when its last lease is
released, so no request ever touches freed memory.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from docqa.settings import ModelSettings, Settings
from models.store import ModelStore, ResolvedModel
from server.engine import Engine, PromptTooLong, chat_formatter, load_llama
from server.generation import GenParams

log = logging.getLogger(__name__)


class RuntimeClosed(RuntimeError):
    pass


AUTO_SLOTS = 8  # n_parallel 0 (auto): P2 >= 1.6 at 8 clients needs 8 slots (docs/benchmarks.md)


def kv_cell_bytes(llm) -> int:
    """Bytes of one KV cell of ``llm``'s model (f16 K and V over every layer)."""
    import llama_cpp

    m = llm._model.model  # noqa: SLF001
    n_head = max(1, llama_cpp.llama_model_n_head(m))
    gqa = llama_cpp.llama_model_n_embd(m) // n_head * llama_cpp.llama_model_n_head_kv(m)
    return 2 * 2 * llama_cpp.llama_model_n_layer(m) * gqa


def parallel_slots(llm, ms: ModelSettings, memory: int | None = None) -> int:
    """The batch slots to serve with: ``model.n_parallel``, or for 0 (auto) ``AUTO_SLOTS``
    lowered until the batch engine's (slots + 2) x n_ctx KV cells take at most a quarter of
    ``memory`` (the machine's RAM); 1 = the single-request engine."""
    if ms.n_parallel:
        return ms.n_parallel
    if memory is None:
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_slot = kv_cell_bytes(llm) * llm.n_ctx()
    n = AUTO_SLOTS
    while n > 1 and (n + 2) * per_slot > memory // 4:
        n -= 1
    log.info("model.n_parallel auto: %d slots (%.0f MiB of KV cache each)", n, per_slot / 2**20)
    return n


def fold_roles(messages: list[dict]) -> list[dict]:
    """``messages`` for a chat template that takes no system role and wants user and
    assistant turns to alternate: system text goes first in the first user turn, and turns of
    one role in a row are joined (a blank line between)."""
    system = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    out: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            continue
        role = "assistant" if m["role"] == "assistant" else "user"
        if out and out[-1]["role"] == role:
            prev, text = out[-1].get("content") or "", m.get("content") or ""
            out[-1] = {**out[-1], "content": f"{prev}\n\n{text}" if prev and text else prev + text}
        else:
            out.append({**m, "role": role})
    if system:
        if not out or out[0]["role"] != "user":
            out.insert(0, {"role": "user", "content": ""})
        head = "\n\n".join(system)
        body = out[0].get("content") or ""
        out[0] = {**out[0], "content": f"{head}\n\n{body}" if body else head}
    return out


class ModelRuntime:
    """A loaded model with its engine. Created by ``ModelManager``; closed by it."""

    # whether token ids this runtime makes are the served model's (a remote runtime counting
    # with another model's vocabulary: False)
    same_vocab = True

    def __init__(
        self,
        resolved: ResolvedModel,
        ms: ModelSettings,
        max_queue: int,
        kv_root: Path | None = None,
        max_wait_s: float | None = None,
        wait_bound: bool = False,
    ):
        t0 = time.perf_counter()
        self.id = resolved.id
        self.path: Path = resolved.path
        self.provenance = resolved.provenance
        self.llm = load_llama(
            resolved.path,
            n_ctx=ms.n_ctx,
            n_batch=ms.n_batch,
            n_threads=ms.n_threads,
            n_gpu_layers=ms.n_gpu_layers,
        )
        try:
            self.kv = None  # chunk KV caches (server.kvcache), when retrieval.kv_cache is on
            if kv_root is not None:
                from server import kvcache

                fp = kvcache.model_fingerprint(
                    resolved.path,
                    kvcache.context_params(),
                    (resolved.provenance or {}).get("sha256"),
                )
                self.kv = kvcache.KVStore(kv_root, fp, resolved.id)
            self._read_vocab(ms.chat_format)
            self.n_parallel = parallel_slots(self.llm, ms)
            if self.n_parallel > 1:
                from server.batch_engine import BatchEngine

                self.engine = BatchEngine(
                    self.llm,
                    max_queue,
                    n_seq=self.n_parallel,
                    n_batch=ms.n_batch,
                    n_threads=ms.n_threads,
                    kv=self.kv,
                    max_wait_s=max_wait_s,
                    wait_bound=wait_bound,
                )
            else:
                self.engine = Engine(
                    self.llm, max_queue, kv=self.kv, max_wait_s=max_wait_s, wait_bound=wait_bound
                )
        except BaseException:
            self.llm.close()
            raise
        self.n_ctx: int = self.engine.n_ctx
        self.loaded_at = time.time()
        self.load_seconds = time.perf_counter() - t0
        self._cond = threading.Condition()
        self._users = 0
        self._retired = False
        self._closed = False
        log.info("model %s loaded from %s in %.2fs", self.id, self.path, self.load_seconds)

    # -- tokens and prompts -----------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template over ``messages``. A template that refuses some turns
        (Mistral's: no system role, user and assistant strictly alternating; tool results
        are user turns here) gets them folded: system text into the first user turn, turns
        of one role in a row joined. Still refused: a 400 naming the template's reason."""
        if self.formatter is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant: "
        try:
            return self.formatter(messages=messages).prompt
        except Exception as exc:  # noqa: BLE001 - jinja2's raise_exception, TemplateError
            first = exc
        try:
            return self.formatter(messages=fold_roles(messages)).prompt
        except Exception:  # noqa: BLE001 - reported with the first refusal
            from server.errors import bad_request

            raise bad_request(
                f"the model's chat template refuses these messages: {first}",
                "messages",
                "unsupported_messages",
            ) from first

    def prompt_tokens(self, prompt: str) -> list[int]:
        add_bos = self._add_bos and not (self._bos_text and prompt.startswith(self._bos_text))
        return self.tokenize(prompt, add_bos=add_bos, special=True)

    def check_fits(self, n_prompt: int, param: str) -> None:
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(
                f"This model's maximum context length is {self.n_ctx} tokens, but the prompt "
                f"is {n_prompt} tokens. Shorten the {param} (docqa never truncates it silently)."
            )

    def chunk_tokenizer(self):
        """The model's vocabulary as ``retrieval.builder.Tokenizer`` (chunk sizes, budgets)."""
        from retrieval.builder import Tokenizer

        return Tokenizer.from_llama(self.llm, self.id)

    def _read_vocab(self, chat_format: str | None) -> None:
        """Chat formatter (``model.chat_format``, or the GGUF's template), vocabulary size and
        BOS handling of ``self.llm`` (a full model, or a vocabulary-only one for a remote
        runtime)."""
        self.formatter = chat_formatter(self.llm, chat_format)
        self.n_vocab = self.llm.n_vocab()
        self._add_bos = bool(self.llm._model.add_bos_token())  # noqa: SLF001
        self._bos_text = (
            self.llm._model.token_get_text(self.llm.token_bos())  # noqa: SLF001
            if self._add_bos
            else ""
        )

    # -- generation -------------------------------------------------------------------
    def reserve(self):
        """A place in the engine's admission queue (``server.engine.Slot``), taken before the
        request prepares its prompt; ``QueueFull`` when there is none."""
        return self.engine.reserve()

    def reserve_spare(self):
        """A place for an extra answer candidate (``server.engine.Admission.reserve_spare``):
        only while the queue is less than half full; ``QueueFull`` otherwise."""
        return self.engine.reserve_spare()

    def submit(self, params: GenParams):
        return self.engine.submit(params)

    @property
    def busy(self) -> int:
        return self.engine.busy

    # -- lifetime (called by ModelManager) --------------------------------------------
    def _acquire(self) -> None:
        with self._cond:
            if self._retired:
                raise RuntimeClosed(f"model {self.id} is being replaced")
            self._users += 1

    def _release(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()
            last = self._retired and self._users == 0 and not self._closed
        if last:  # the drain timed out earlier; the last request out closes the model
            threading.Thread(target=self._close_now, name="docqa-close", daemon=True).start()

    def retire(self, drain_s: float) -> None:
        """No new leases; wait up to ``drain_s`` for running requests, cancel the rest, and
        close once none holds the runtime. Blocking."""
        with self._cond:
            self._retired = True
            idle = self._cond.wait_for(lambda: self._users == 0, timeout=drain_s)
        if not idle:
            n = self.engine.cancel_all()
            log.warning(
                "model %s: %d requests still running after %.0fs: cancelled", self.id, n, drain_s
            )
            with self._cond:
                idle = self._cond.wait_for(lambda: self._users == 0, timeout=10)
        if idle:
            self._close_now()
        else:
            log.warning("model %s: closing when its last request ends", self.id)

    def _close_now(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.engine.cancel_all()
        if not self.engine.close():  # its worker may still be in the model: leak, not crash
            log.error("model %s: its engine did not stop; leaking the model", self.id)
            return
        self.llm.close()
        log.info("model %s closed", self.id)

    def close(self) -> None:
        """Shutdown: cancel everything and free the model now."""
        with self._cond:
            self._retired = True
        self._close_now()


class Lease:
    """One request's hold on a runtime; release it once (idempotent)."""

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.runtime._release()  # noqa: SLF001


class ModelManager:
    """Owner of the served model: loads it, hands out leases on the current runtime, swaps it
    on reload, closes it at shutdown."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._current: ModelRuntime | None = None
        self._lock = threading.Lock()  # guards _current
        self._reload_lock = threading.Lock()  # one reload at a time

    def _load(self, name: str | None) -> ModelRuntime:
        """The configured model (a name or a path), or ``name``: a store id or the embedded
        default only (a reload request never names a file)."""
        ms = self.settings.model
        store = ModelStore(ms.store_dir)
        if name:
            ms = ms.model_copy(update={"model": name})
        if ms.endpoints:  # generation on remote OpenAI-compatible servers
            from server.remote import RemoteRuntime

            return RemoteRuntime(ms, self.settings.server.max_queue)
        if name:
            resolved = store.resolve_id(name)  # ModelNotFound: nothing changes
        else:
            resolved = store.resolve(ms.model)
        from server.kvcache import kv_root

        server = self.settings.server
        return ModelRuntime(
            resolved,
            ms,
            server.max_queue,
            kv_root(self.settings.retrieval),
            max_wait_s=server.max_wait_s,
            wait_bound=server.wait_bound == "queue",
        )

    def start(self) -> ModelRuntime:
        """Load the configured model (blocking)."""
        rt = self._load(None)
        with self._lock:
            self._current = rt
        return rt

    def current(self) -> ModelRuntime:
        """The runtime serving now: for reading its id or sizes. To tokenize or generate,
        take a ``lease()`` (the runtime may be replaced and closed at any time otherwise)."""
        rt = self._current
        if rt is None:
            raise RuntimeClosed("no model is loaded")
        return rt

    def acquire(self) -> Lease:
        with self._lock:
            rt = self.current()
            rt._acquire()  # noqa: SLF001 - under the swap lock: never a retired runtime
        return Lease(rt)

    @contextmanager
    def lease(self):
        held = self.acquire()
        try:
            yield held.runtime
        finally:
            held.release()

    def reload(self, name: str | None = None) -> ModelRuntime:
        """Load ``name`` (None: the configured model) beside the running one, swap it in, then
        retire the old one. Blocking; raises ``ModelNotFound`` with the old model serving."""
        with self._reload_lock:
            new = self._load(name)
            with self._lock:
                old, self._current = self._current, new
            if name:
                self.settings = self.settings.model_copy(
                    update={"model": self.settings.model.model_copy(update={"model": name})}
                )
            log.info("model swapped: %s -> %s", old.id if old else None, new.id)
            if old is not None:
                old.retire(self.settings.server.reload_drain_s)
            return new

    def close(self) -> None:
        with self._lock:
            rt, self._current = self._current, None
        if rt is not None:
            rt.close()
