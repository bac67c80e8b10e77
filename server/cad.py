"""Context-aware decoding (CAD; Shi et al. 2023, arXiv 2305.14739).

The next token is sampled from ``(1 + a) * logit(y | context, question) - a * logit(y | question)``:
the same request is decoded twice, once with its context (the retrieved excerpts) and once
without, and the difference pushes the answer towards what the context says rather than what
the model believes anyway. Both engines keep the two prompts as two sequences of one llama.cpp
context and decode each generated token for both in the same ``llama_batch``; the request's
sampler chain (penalties, grammar, top-k/top-p/min-p, temperature, seed) then runs on the
combined logits (``TokenData``), and logprobs are computed from them.

- batch engine (``server.batch_engine``): a CAD request takes two sequence slots;
- single engine (``server.engine``): ``CadRunner``, a small two-sequence context created on the
  first CAD request (plain requests keep running on the model's own context, unchanged).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator

import llama_cpp
import numpy as np

from server.generation import (
    BatchContext,
    Delta,
    Finish,
    GenParams,
    logits_at,
    sampler_chain,
    token_loop,
)

log = logging.getLogger(__name__)

ALPHA_MAX = 5.0

# numpy view of llama_token_data {int32 id; float logit; float p}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


def combine(
    with_ctx: np.ndarray, without_ctx: np.ndarray, alpha: float, out: np.ndarray | None = None
) -> np.ndarray:
    """``(1 + alpha) * with_ctx - alpha * without_ctx`` in float32; ``alpha`` 0 gives
    ``with_ctx`` bit for bit."""
    out = np.multiply(with_ctx, np.float32(1.0 + alpha), out=out, dtype=np.float32)
    out -= np.float32(alpha) * without_ctx
    return out


class TokenData:
    """A ``llama_token_data_array`` over a numpy buffer: samples a token from given logits with
    a llama.cpp sampler chain exactly as ``llama_sampler_sample`` does from a context's logits
    (apply the chain, take the selected token, accept it). One per worker thread."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.buf = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.combined = np.empty(n_vocab, dtype=np.float32)
        self._ptr = self.buf.ctypes.data_as(llama_cpp.llama_token_data_p)
        self.arr = llama_cpp.llama_token_data_array()

    def sample(self, chain, logits: np.ndarray) -> int:
        buf = self.buf
        buf["id"] = self.ids
        buf["logit"] = logits
        buf["p"] = 0.0
        arr = self.arr
        arr.data = self._ptr
        arr.size = self.n_vocab
        arr.selected = -1
        arr.sorted = False
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError(f"the sampler chain selected no token ({arr.selected})")
        tok = int(arr.data[arr.selected].id)
        llama_cpp.llama_sampler_accept(chain, tok)
        return tok

    def sample_cad(self, chain, with_ctx: np.ndarray, without_ctx: np.ndarray, alpha: float):
        """-> (token, the combined logits it was sampled from: valid until the next call)."""
        comb = combine(with_ctx, without_ctx, alpha, out=self.combined)
        return self.sample(chain, comb), comb


class CadRunner:
    """The single engine's CAD path: a context with two sequences (0: the prompt with its
    context, 1: the context-free prompt), each ``n_ctx`` cells, created on the first CAD request
    and kept until ``close``. Runs in the engine's worker thread, one request at a time."""

    MAIN, FREE = 0, 1

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        self.bctx: BatchContext | None = None
        self.td = TokenData(llm.n_vocab())
        self._rng = np.random.default_rng()

    def _context(self) -> BatchContext:
        if self.bctx is None:
            self.bctx = BatchContext(self.llm, 1, self.llm.n_batch, self.llm.n_threads)
            log.info("CAD context created: 2 sequences of %d tokens", self.bctx.per_seq_ctx)
        return self.bctx

    def _feed(self, bctx: BatchContext, seq: int, tokens: list[int]) -> None:
        """Evaluate ``tokens`` on ``seq`` in ``n_batch`` chunks; logits at the last one."""
        n_batch = self.llm.n_batch
        for start in range(0, len(tokens), n_batch):
            part = tokens[start : start + n_batch]
            last = start + len(part) == len(tokens)
            for i, t in enumerate(part):
                bctx.add(i, t, start + i, seq, last and i == len(part) - 1)
            bctx.batch.n_tokens = len(part)
            _decode(bctx)

    def generate(
        self, p: GenParams, cancel: threading.Event | None = None
    ) -> Iterator[Delta | Finish]:
        """CAD generation of ``p`` (``p.cad``); the caller has checked both prompts fit."""
        bctx = self._context()
        max_tokens = min(p.max_tokens, bctx.per_seq_ctx - p.n_prompt_max)
        if not p.cad_prompt_tokens:
            raise ValueError("context-aware decoding needs a non-empty context-free prompt")
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        return token_loop(self.llm, p, self._tokens(bctx, p, seed), max_tokens, cancel)

    def _tokens(self, bctx: BatchContext, p: GenParams, seed: int):
        """Sampled ``(token, combined logits)`` pairs, until closed."""
        n_vocab = self.td.n_vocab
        free_prompt = list(p.cad_prompt_tokens or [])
        chain = sampler_chain(bctx.vocab, p, seed)
        try:
            for seq in (self.MAIN, self.FREE):
                llama_cpp.llama_memory_seq_rm(bctx.mem, seq, -1, -1)
            self._feed(bctx, self.FREE, free_prompt)
            without = logits_at(bctx.ctx, -1, n_vocab).copy()  # the next decode overwrites it
            self._feed(bctx, self.MAIN, list(p.prompt_tokens))
            with_ctx = logits_at(bctx.ctx, -1, n_vocab)
            pos = [len(p.prompt_tokens), len(free_prompt)]
            while True:
                tok, comb = self.td.sample_cad(chain, with_ctx, without, p.cad_alpha)
                yield tok, comb
                for i, seq in enumerate((self.MAIN, self.FREE)):
                    bctx.add(i, tok, pos[i], seq, True)
                    pos[i] += 1
                bctx.batch.n_tokens = 2
                _decode(bctx)
                with_ctx = logits_at(bctx.ctx, 0, n_vocab)
                without = logits_at(bctx.ctx, 1, n_vocab)
        finally:
            llama_cpp.llama_sampler_free(chain)
            for seq in (self.MAIN, self.FREE):
                llama_cpp.llama_memory_seq_rm(bctx.mem, seq, -1, -1)

    def close(self) -> None:
        if self.bctx is not None:
            self.bctx.close()
            self.bctx = None


def _decode(bctx: BatchContext) -> None:
    rc = llama_cpp.llama_decode(bctx.ctx, bctx.batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed ({rc})")
