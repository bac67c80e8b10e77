"""Continuous batching on one llama.cpp context with several sequences (unified KV cache).

A scheduler thread decodes all active requests together with ``llama_batch``: one token per
generating sequence per step, plus prompt chunks of newly admitted requests, so requests join
and leave the running batch at any step. Each request has its own llama.cpp sampler chain
(temperature, top_p, top_k, min_p, seed, grammar); stop strings, UTF-8 and logprobs go through
the same ``TextStream`` as the single-sequence engine. Finished or cancelled sequences free their
KV cells at once. A request waits in the bounded queue until a sequence slot is free, and every
slot owns ``n_ctx`` cells of the unified cache, so KV exhaustion is impossible by construction.
Same interface as ``Engine``: the routers don't change.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

import llama_cpp
import numpy as np

from server.engine import Job, Worker
from server.generation import Finish, GenParams, TextStream, _logprob_entry, _token_piece

log = logging.getLogger(__name__)


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


def _sampler(vocab, p: GenParams, seed: int):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            ),
        )
    if p.grammar is not None:
        g = llama_cpp.llama_sampler_init_grammar(
            vocab,
            p.grammar._grammar.encode(),  # noqa: SLF001
            p.grammar._root.encode(),
        )  # noqa: SLF001
        if not g:
            raise ValueError("invalid grammar")
        add(chain, g)
    if p.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        if p.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
        add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class BatchContext:
    """A llama.cpp context with ``n_seq`` sequences (plus one for the prefix cache) on a unified
    KV cache, created from a loaded model; owns and frees the context and its batch."""

    def __init__(self, llm: llama_cpp.Llama, n_seq: int, n_batch: int, n_threads: int | None):
        self.per_seq_ctx = llm.n_ctx()
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.per_seq_ctx * (n_seq + 1)
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)
        cp.n_seq_max = n_seq + 1
        cp.kv_unified = True
        nt = n_threads or llm.n_threads
        if nt:
            cp.n_threads = cp.n_threads_batch = int(nt)
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, cp)  # noqa: SLF001
        if not self.ctx:
            raise RuntimeError("could not create the batched llama.cpp context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.vocab = llm._model.vocab  # noqa: SLF001

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


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
        self.bctx = BatchContext(llm, n_seq, n_batch, n_threads)
        self.per_seq_ctx = self.bctx.per_seq_ctx
        self.ctx, self.mem = self.bctx.ctx, self.bctx.mem
        self.batch, self.vocab = self.bctx.batch, self.bctx.vocab
        self._rng = np.random.default_rng()
        self._start_worker(max_queue, "docqa-batch")

    @property
    def n_ctx(self) -> int:
        return self.per_seq_ctx

    # -- scheduler -------------------------------------------------------------------
    def _admit(self, job: Job, seq: int) -> _Slot | None:
        p = job.params
        if job.cancelled.is_set():
            job._put(Finish("cancelled", len(p.prompt_tokens), 0))
            self._end(job)
            return None
        job._mark_started()
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
        slot = _Slot(
            seq,
            job,
            list(p.prompt_tokens),
            _sampler(self.vocab, p, seed),
            TextStream(p),
            max_tokens=min(p.max_tokens, self.per_seq_ctx - len(p.prompt_tokens)),
        )
        self._reuse_prefix(slot)
        return slot

    def _reuse_prefix(self, s: _Slot) -> None:
        """Copy the longest chunk-aligned shared prefix (e.g. the system prompt and the RAG
        template) from the prefix-cache sequence instead of recomputing it."""
        if not self.prefix_cache or not self.cache_tokens:
            return
        toks = s.pending
        n = 0
        limit = min(len(self.cache_tokens), len(toks) - 1)  # keep >= 1 token to get logits
        while n < limit and toks[n] == self.cache_tokens[n]:
            n += 1
        n -= n % self.chunk
        if n <= 0:
            return
        llama_cpp.llama_memory_seq_cp(self.mem, self.cache_seq, s.seq, 0, n)
        s.pending = toks[n:]
        s.n_past = n
        self.prefix_hits += 1
        self.prefix_tokens_reused += n

    def _remember_prefix(self, s: _Slot) -> None:
        """Keep the aligned prompt prefix of a sequence whose prompt is fully evaluated."""
        if not self.prefix_cache:
            return
        prompt = s.job.params.prompt_tokens
        n = (len(prompt) - 1) - (len(prompt) - 1) % self.chunk
        if n <= 0 or self.cache_tokens[:n] == list(prompt[:n]):
            return
        llama_cpp.llama_memory_seq_rm(self.mem, self.cache_seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, s.seq, self.cache_seq, 0, n)
        self.cache_tokens = list(prompt[:n])

    def _end(self, job: Job) -> None:
        self.admission.release(job)

    def _finish(self, s: _Slot, reason: str) -> None:
        if reason != "cancelled":
            d = s.text.flush()
            if d is not None:
                s.job._put(d)
        s.job._put(Finish(reason, len(s.job.params.prompt_tokens), s.n_out))
        llama_cpp.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
        llama_cpp.llama_sampler_free(s.sampler)
        self._end(s.job)

    def _fill_generating(self, slots: list[_Slot]) -> int:
        """One token per generating sequence."""
        n = 0
        for s in slots:
            s.batch_idx = -1
            if not s.pending:
                self._add(n, s.last, s.n_past, s.seq, True)
                s.batch_idx = n
                s.n_past += 1
                n += 1
        self.batch.n_tokens = n
        return n

    def _fill_prompt(self, s: _Slot) -> int:
        """The next prompt chunk of one sequence, alone in its batch: a prompt is evaluated
        exactly as it would be with no other request running (llama.cpp's numerics depend on
        the batch a token is evaluated in), so batching never changes a greedy answer."""
        room = self.chunk - s.n_past % self.chunk  # stop at the next aligned boundary
        take = s.pending[:room]
        s.pending = s.pending[len(take) :]
        s.batch_idx = -1
        for i, t in enumerate(take):
            last = not s.pending and i == len(take) - 1
            self._add(i, t, s.n_past, s.seq, last)
            if last:
                s.batch_idx = i
            s.n_past += 1
        self.batch.n_tokens = len(take)
        if not s.pending:
            s.remember = True
        return len(take)

    def _add(self, i: int, tok: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _step_slot(self, s: _Slot) -> bool:
        """Sample the next token of ``s``; True when the sequence is finished."""
        if s.job.cancelled.is_set():
            self._finish(s, "cancelled")
            return True
        p = s.job.params
        tok = llama_cpp.llama_sampler_sample(s.sampler, self.ctx, s.batch_idx)
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(s, "stop")
            return True
        lp = (
            _logprob_entry(self.llm, tok, p.top_logprobs, self.ctx, s.batch_idx)
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
        while True:
            while free:
                try:
                    job = self.admission.jobs.get(block=not active, timeout=None)
                except queue.Empty:
                    break
                if job is None:
                    self._stopped(active)
                    return
                try:
                    slot = self._admit(job, free[0])
                except Exception as exc:  # noqa: BLE001
                    job._put(exc)
                    self._end(job)
                    continue
                if slot is not None:
                    active[free.pop(0)] = slot
            if not active:
                continue
            for seq, s in list(active.items()):  # cancelled since the last step: free now
                if s.job.cancelled.is_set():
                    self._finish(s, "cancelled")
                    del active[seq]
                    free.append(seq)
            if not active:
                continue
            gen = [s for s in active.values() if not s.pending]
            if gen:
                self._fill_generating(gen)
                self._decode_and_sample(gen, active, free)
            budget = self.n_batch  # prompt tokens evaluated per scheduler step
            for s in [s for s in active.values() if s.pending]:
                while s.pending and budget > 0 and s.seq in active:
                    budget -= self._fill_prompt(s)
                    self._decode_and_sample([s], active, free)
                if budget <= 0:
                    break

    def _decode_and_sample(self, slots: list[_Slot], active: dict, free: list) -> None:
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            log.error("llama_decode failed (%d); failing %d requests", rc, len(slots))
            for s in slots:
                s.job._put(RuntimeError(f"llama_decode failed ({rc})"))
                llama_cpp.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
                llama_cpp.llama_sampler_free(s.sampler)
                self._end(s.job)
                del active[s.seq]
                free.append(s.seq)
            return
        for s in slots:
            if s.remember:  # prompt fully in the KV cache: keep its prefix for later requests
                s.remember = False
                self._remember_prefix(s)
            if s.batch_idx < 0:  # prompt not fully fed yet
                continue
            try:
                finished = self._step_slot(s)
            except Exception as exc:  # noqa: BLE001
                log.exception("sampling failed")
                s.job._put(exc)
                llama_cpp.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
                self._end(s.job)
                finished = True
            if finished:
                del active[s.seq]
                free.append(s.seq)

    def _stopped(self, active: dict) -> None:
        """Stop requested: end the running sequences as cancelled (close() cancels first)."""
        for s in list(active.values()):
            self._finish(s, "cancelled")
        active.clear()

    def close(self) -> None:
        """Stop the scheduler, then free the context (the model is the runtime's)."""
        if not self._stop_worker():
            log.error("batch scheduler did not stop; leaking its context rather than freeing it")
            return
        self.bctx.close()
