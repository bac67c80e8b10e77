"""Continuous batching on one llama.cpp context with several sequences (unified KV cache).

A scheduler thread decodes all active requests together with ``llama_batch``: one token per
generating sequence per step, plus prompt chunks of newly admitted requests, so requests join
and leave the running batch at any step. Each request has its own llama.cpp sampler chain
(temperature, top_p, top_k, min_p, seed, grammar); stop strings, UTF-8 and logprobs go through
the same ``TextStream`` as the single-sequence engine. Finished or cancelled sequences free their
KV cells at once. A request waits in the bounded queue until a sequence slot is free, and every
slot owns ``n_ctx`` cells of the unified cache, so KV exhaustion is impossible by construction.
A context-aware decoding request (``server.cad``) takes two slots: its context-free prompt runs
as a second sequence, fed the same generated tokens in the same ``llama_batch``, and its sampler
chain runs on the combined logits. Requests are admitted in FIFO order: a CAD request at the
head of the queue waits for two free slots. Same interface as ``Engine``: the routers don't
change.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

import llama_cpp
import numpy as np

from server import kvcache
from server.cad import TokenData
from server.engine import Job, Worker
from server.generation import (
    BatchContext,
    Finish,
    TextStream,
    _logprob_entry,
    _token_piece,
    logits_at,
    sampler_chain,
)
from server.kvcache import KVStore

__all__ = ["BatchContext", "BatchEngine"]

log = logging.getLogger(__name__)


@dataclass
class _Free:
    """The context-free side of a CAD request: its own sequence, fed the same tokens."""

    seq: int
    pending: list[int]
    n_past: int = 0
    batch_idx: int = -1
    logits: np.ndarray | None = None  # its prompt's last logits, kept until the first sample


@dataclass
class _Slot:
    seq: int
    job: Job
    pending: list[int]
    sampler: object
    text: TextStream
    n_past: int = 0
    n_out: int = 0
    last: int = -1
    batch_idx: int = -1
    max_tokens: int = 0
    remember: bool = False
    cad: _Free | None = None
    stitched: bool = False  # prompt from chunk KV caches (server.kvcache): only its prefix is plain

    @property
    def feeding(self) -> bool:
        """Some prompt (the context-free one of a CAD request included) is not fed yet."""
        return bool(self.pending) or (self.cad is not None and bool(self.cad.pending))

    @property
    def seqs(self) -> list[int]:
        return [self.seq] if self.cad is None else [self.seq, self.cad.seq]


class BatchEngine(Worker):
    """Continuous batching over a ``BatchContext``; same interface as ``server.engine.Engine``.
    It owns its context, not the model (``server.runtime.ModelRuntime`` does)."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        max_queue: int,
        n_seq: int = 8,
        n_batch: int = 512,
        n_threads: int | None = None,
        chunk: int = 64,
        prefix_cache: bool = True,
        kv: KVStore | None = None,
        max_wait_s: float | None = None,
        wait_bound: bool = False,
    ):
        self.llm = llm
        self.n_seq = n_seq
        # Prompts are evaluated in chunks aligned to multiples of ``chunk`` positions, so the KV
        # of a chunk depends only on the tokens up to its end: whole chunks can be copied from
        # another sequence (llama_memory_seq_cp) with bit-identical results.
        self.chunk = max(1, min(chunk, n_batch))
        self.prefix_cache = prefix_cache
        self.cache_seq = n_seq  # an extra sequence keeps the last prompt's aligned prefix
        self.cache_tokens: list[int] = []
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        self.n_batch = n_batch
        self.kv = kv
        # stitched prompts are put together in a small context of their own, then copied in
        self.assembler = kvcache.Assembler(llm, kv) if kv is not None else None
        self.bctx = BatchContext(llm, n_seq, n_batch, n_threads)
        self.per_seq_ctx = self.bctx.per_seq_ctx
        self.ctx, self.mem = self.bctx.ctx, self.bctx.mem
        self.batch, self.vocab = self.bctx.batch, self.bctx.vocab
        self._rng = np.random.default_rng()
        self.td = TokenData(llm.n_vocab())
        self._start_worker(max_queue, "docqa-batch", max_wait_s, wait_bound, n_seq)

    @property
    def n_ctx(self) -> int:
        return self.per_seq_ctx

    # -- scheduler -------------------------------------------------------------------
    def _admit(self, job: Job, seqs: list[int]) -> _Slot:
        """Start ``job`` on ``seqs`` (two for a CAD request: with and without its context)."""
        p = job.params
        if p.cad and not p.cad_prompt_tokens:
            raise ValueError("context-aware decoding needs a non-empty context-free prompt")
        job._mark_started()
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        for seq in seqs:
            llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self._trim_prefix(p.prompt_tokens, p.cad_prompt_tokens or [])
        slot = _Slot(
            seqs[0],
            job,
            list(p.prompt_tokens),
            sampler_chain(self.vocab, p, seed),
            TextStream(p),
            max_tokens=min(p.max_tokens, self.per_seq_ctx - p.n_prompt_max),
        )
        if p.kv_plan is not None and self.kv is not None and not p.cad:
            try:
                n_past = self._stitch(slot.seq, p.kv_plan)
            except BaseException:  # the caller fails the job: its sampler is not kept
                llama_cpp.llama_sampler_free(slot.sampler)
                raise
            if n_past is not None:
                rest = p.kv_plan.tokens[n_past:]  # the suffix (and a last recomputed run)
                slot.n_past, slot.pending, slot.stitched = n_past, rest, True
                return slot
        slot.n_past = self._reuse_prefix(slot.seq, slot.pending)
        slot.pending = slot.pending[slot.n_past :]
        if p.cad:
            free = _Free(seqs[1], list(p.cad_prompt_tokens or []))
            free.n_past = self._reuse_prefix(free.seq, free.pending)
            free.pending = free.pending[free.n_past :]
            slot.cad = free
        return slot

    def _stitch(self, seq: int, plan) -> int | None:
        """Put ``plan``'s prefix, labels and cached spans into ``seq`` (stitched in the
        assembler's context, then copied) -> cells filled, or None for plain prefill."""
        return self.assembler.install(plan, self.ctx, seq)

    def _shared(self, toks: list[int]) -> int:
        """Tokens of ``toks`` the prefix cache holds, cut to a chunk boundary (at most all but
        the last token: a prompt needs >= 1 token evaluated to get logits)."""
        n, limit = 0, min(len(self.cache_tokens), len(toks) - 1)
        while n < limit and toks[n] == self.cache_tokens[n]:
            n += 1
        return n - n % self.chunk

    def _trim_prefix(self, *prompts: list[int]) -> None:
        """Drop the prefix-cache cells that none of ``prompts`` (a request being admitted)
        shares, before its own cells are placed. Kept cells occupy the unified cache, and every
        sequence's attention spans the highest used cell: a stale ~900-token prefix nearly
        doubled it for the next unrelated request and slowed its decode ~10% (docs/benchmarks.md,
        session 24). The request's own aligned prefix replaces the cache once it is evaluated
        (not a stitched one's, nor one shorter than a chunk: the cache then stays trimmed)."""
        keep = max(self._shared(toks) for toks in prompts)
        if keep < len(self.cache_tokens):
            llama_cpp.llama_memory_seq_rm(self.mem, self.cache_seq, keep, -1)
            self.cache_tokens = self.cache_tokens[:keep]

    def _reuse_prefix(self, seq: int, toks: list[int]) -> int:
        """Copy the longest chunk-aligned shared prefix (e.g. the system prompt and the RAG
        template) of ``toks`` from the prefix-cache sequence to ``seq`` instead of recomputing
        it; the number of tokens copied."""
        if not self.prefix_cache:
            return 0
        n = self._shared(toks)
        if n <= 0:
            return 0
        llama_cpp.llama_memory_seq_cp(self.mem, self.cache_seq, seq, 0, n)
        self.prefix_hits += 1
        self.prefix_tokens_reused += n
        return n

    def _remember_prefix(self, s: _Slot) -> None:
        """Keep the aligned prompt prefix of a sequence whose prompt is fully evaluated."""
        if not self.prefix_cache:
            return
        prompt = s.job.params.prompt_tokens
        if s.stitched:  # cells made elsewhere (server.kvcache.Assembler), not aligned: keep none
            return
        n = (len(prompt) - 1) - (len(prompt) - 1) % self.chunk
        if n <= 0 or self.cache_tokens[:n] == list(prompt[:n]):
            return
        llama_cpp.llama_memory_seq_rm(self.mem, self.cache_seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, s.seq, self.cache_seq, 0, n)
        self.cache_tokens = list(prompt[:n])

    def _end(self, job: Job) -> None:
        self.admission.release(job)

    def _drop(self, s: _Slot) -> None:
        """Free the KV cells of the request's sequences, and its sampler chain (once)."""
        for seq in s.seqs:
            llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
        if s.sampler is not None:
            sampler, s.sampler = s.sampler, None
            llama_cpp.llama_sampler_free(sampler)

    def _finish(self, s: _Slot, reason: str) -> None:
        if reason != "cancelled":
            d = s.text.flush()
            if d is not None:
                s.job._put(d)
        s.job._put(Finish(reason, len(s.job.params.prompt_tokens), s.n_out))
        self._drop(s)
        self._end(s.job)

    def _fill_generating(self, slots: list[_Slot]) -> int:
        """One token per generating sequence (two for a CAD request: the same token on the
        sequence without its context)."""
        n = 0
        for s in slots:
            s.batch_idx = -1
            if not s.feeding:
                self.bctx.add(n, s.last, s.n_past, s.seq, True)
                s.batch_idx = n
                s.n_past += 1
                n += 1
                if s.cad is not None:
                    self.bctx.add(n, s.last, s.cad.n_past, s.cad.seq, True)
                    s.cad.batch_idx = n
                    s.cad.n_past += 1
                    n += 1
        self.batch.n_tokens = n
        return n

    def _fill_prompt(self, s: _Slot) -> int:
        """The next prompt chunk of one sequence, alone in its batch: a prompt is evaluated
        exactly as it would be with no other request running (llama.cpp's numerics depend on
        the batch a token is evaluated in), so batching never changes a greedy answer. A CAD
        request feeds its context-free prompt first."""
        if s.cad is not None and s.cad.pending:
            return self._fill_free_prompt(s)
        s.pending, n, s.batch_idx = self._fill_chunk(s.pending, s.n_past, s.seq)
        s.n_past += n
        if not s.pending:
            s.remember = True
        return n

    def _fill_free_prompt(self, s: _Slot) -> int:
        f = s.cad
        assert f is not None
        s.batch_idx = -1
        f.pending, n, f.batch_idx = self._fill_chunk(f.pending, f.n_past, f.seq)
        f.n_past += n
        return n

    def _fill_chunk(self, pending: list[int], n_past: int, seq: int) -> tuple[list[int], int, int]:
        """The next part of ``pending`` up to the next ``chunk``-aligned position, alone in the
        batch -> (what is left, tokens put in, batch index of the logits token or -1)."""
        take = pending[: self.chunk - n_past % self.chunk]  # stop at the next aligned boundary
        rest = pending[len(take) :]
        idx = -1
        for i, t in enumerate(take):
            last = not rest and i == len(take) - 1
            self.bctx.add(i, t, n_past + i, seq, last)
            if last:
                idx = i
        self.batch.n_tokens = len(take)
        return rest, len(take), idx

    def _step_slot(self, s: _Slot) -> bool:
        """Sample the next token of ``s``; True when the sequence is finished."""
        if s.job.cancelled.is_set():
            self._finish(s, "cancelled")
            return True
        p = s.job.params
        logits = None  # plain: the context's own row s.batch_idx
        if s.cad is None:
            tok = llama_cpp.llama_sampler_sample(s.sampler, self.ctx, s.batch_idx)
        else:
            n_vocab = self.td.n_vocab
            without = s.cad.logits
            if without is None:
                without = logits_at(self.ctx, s.cad.batch_idx, n_vocab)
            s.cad.logits = None
            with_ctx = logits_at(self.ctx, s.batch_idx, n_vocab)
            tok, logits = self.td.sample_cad(s.sampler, with_ctx, without, p.cad_alpha)
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(s, "stop")
            return True
        lp = (
            _logprob_entry(self.llm, tok, p.top_logprobs, self.ctx, s.batch_idx, logits)
            if p.logprobs
            else None
        )
        s.n_out += 1
        d = s.text.push(_token_piece(self.llm, tok), lp)
        if d is not None:
            s.job._put(d)
        if s.text.stop_hit:
            self._finish(s, "stop")
            return True
        if s.n_out >= s.max_tokens:
            self._finish(s, "length")
            return True
        s.last = tok
        return False

    def _run(self) -> None:
        active: dict[int, _Slot] = {}
        free = list(range(self.n_seq))
        held: Job | None = None  # the head of the queue: a CAD request waiting for two slots
        while True:
            while free:
                if held is not None:
                    job, held = held, None
                else:
                    try:
                        job = self.admission.jobs.get(block=not active, timeout=None)
                    except queue.Empty:
                        break
                    if job is not None and not self.admission.take(job):
                        continue  # withdrawn while it waited: already ended
                if job is None:
                    self._stopped(active)
                    return
                if job.cancelled.is_set():
                    self._cancelled(job)
                    continue
                need = 2 if job.params.cad else 1
                if need > self.n_seq:
                    job._put(ValueError("context-aware decoding needs n_parallel >= 2"))
                    self._end(job)
                    continue
                if need > len(free):
                    held = job
                    break
                seqs, free[:need] = free[:need], []
                try:
                    slot = self._admit(job, seqs)
                except Exception as exc:  # noqa: BLE001
                    free.extend(seqs)
                    job._put(exc)
                    self._end(job)
                    continue
                active[slot.seq] = slot
            if held is not None and held.cancelled.is_set():
                self._cancelled(held)
                held = None
            if not active:
                continue
            for s in list(active.values()):  # cancelled since the last step: free now
                if s.job.cancelled.is_set():
                    self._finish(s, "cancelled")
                    self._release(s, active, free)
            if not active:
                continue
            gen = [s for s in active.values() if not s.feeding]
            if gen:
                self._fill_generating(gen)
                self._decode_and_sample(gen, active, free)
            budget = self.n_batch  # prompt tokens evaluated per scheduler step
            for s in [s for s in active.values() if s.feeding]:
                while s.feeding and budget > 0 and s.seq in active:
                    budget -= self._fill_prompt(s)
                    self._decode_and_sample([s], active, free)
                if budget <= 0:
                    break

    def _cancelled(self, job: Job) -> None:
        job._put(Finish("cancelled", len(job.params.prompt_tokens), 0))
        self._end(job)

    @staticmethod
    def _release(s: _Slot, active: dict, free: list) -> None:
        del active[s.seq]
        free.extend(s.seqs)

    def _decode_and_sample(self, slots: list[_Slot], active: dict, free: list) -> None:
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            log.error("llama_decode failed (%d); failing %d requests", rc, len(slots))
            for s in slots:
                s.job._put(RuntimeError(f"llama_decode failed ({rc})"))
                self._drop(s)
                self._end(s.job)
                self._release(s, active, free)
            return
        for s in slots:
            if s.remember:  # prompt fully in the KV cache: keep its prefix for later requests
                s.remember = False
                self._remember_prefix(s)
            if s.cad is not None and s.cad.batch_idx >= 0 and s.pending:
                # the context-free prompt is in; keep its logits until the main one is
                s.cad.logits = logits_at(self.ctx, s.cad.batch_idx, self.td.n_vocab).copy()
                s.cad.batch_idx = -1
            if s.batch_idx < 0:  # prompt not fully fed yet
                continue
            try:
                finished = self._step_slot(s)
            except Exception as exc:  # noqa: BLE001
                log.exception("sampling failed")
                s.job._put(exc)
                self._drop(s)
                self._end(s.job)
                finished = True
            if finished:
                self._release(s, active, free)

    def _stopped(self, active: dict) -> None:
        """Stop requested: end the running sequences as cancelled (close() cancels first)."""
        for s in list(active.values()):
            self._finish(s, "cancelled")
        active.clear()

    def close(self) -> bool:
        """Stop the scheduler, then free the context (the model is the runtime's). False when
        the scheduler did not stop: it may still be decoding, so nothing is freed."""
        if not self._stop_worker():
            log.error("batch scheduler did not stop; leaking its context rather than freeing it")
            return False
        if self.assembler is not None:
            self.assembler.close()
        self.bctx.close()
        return True
