"""The token loop: sampling through llama.cpp, UTF-8 safe text deltas, stop strings, logprobs.

Runs in the engine's worker thread. Yields ``Delta`` events and ends with one ``Finish``.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import re
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from retrieval.answers import drop_echo, drop_empty_code


@dataclass
class GenParams:
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: Any = None  # llama_cpp.LlamaGrammar
    logprobs: bool = False
    top_logprobs: int = 0
    # Context-aware decoding (server.cad): sample from (1+a)*logit(y | prompt_tokens) -
    # a*logit(y | cad_prompt_tokens), the same request without its context (excerpts). The
    # engines run it whenever cad_prompt_tokens is set (a=0 then gives plain decoding's
    # logits through the CAD path); the services set it only for a > 0.
    cad_alpha: float = 0.0
    cad_prompt_tokens: list[int] | None = None
    # Added to the logits before any other sampler ({token id: bias}): the request's OpenAI
    # ``logit_bias`` and, for grounded answers, retrieval.evidence_bias on the evidence lines'
    # own tokens. -100 bans the token (finite: a grammar still wins).
    logit_bias: dict[int, float] | None = None
    # Loop guard (grounded answers, retrieval.loop_repeats): the answer stops where its text
    # turns into one piece repeated this many times, or a run of citations; 0 = off.
    loop_repeats: int = 0
    # Grounded answers (retrieval.drop_scaffolding): fenced code blocks that stay empty (or
    # hold only comments, such as an echoed excerpt header) are left out of the text, a
    # block held back until it has a line of code; so is a first line echoing the prompt's
    # question line (a stop string's text after its line break, "Question:").
    drop_scaffolding: bool = False
    # Chunk KV cache (server.kvcache): the grounded prompt cut into prefix, excerpts and
    # suffix (``prompt_tokens`` is its concatenation); engines with a store stitch it.
    kv_plan: Any = None
    # What a remote engine (server.remote) sends instead of the tokens: the chat's messages,
    # or the prompt's text; local engines use prompt_tokens only.
    messages: list[dict[str, str]] | None = None
    prompt_text: str | None = None

    @property
    def cad(self) -> bool:
        return self.cad_prompt_tokens is not None

    @property
    def n_prompt_max(self) -> int:
        """Context cells the longest of the request's prompts takes (both for CAD)."""
        n = len(self.prompt_tokens)
        return max(n, len(self.cad_prompt_tokens)) if self.cad_prompt_tokens is not None else n


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


# token bytes per loaded model; weak keys: a closed and collected model takes its cache along
# (an id()-keyed cache could hand a reloaded model the old vocabulary's pieces)
_PIECES: weakref.WeakKeyDictionary[Any, dict[int, bytes]] = weakref.WeakKeyDictionary()


def _token_piece(llm: llama_cpp.Llama, tok: int) -> bytes:
    """Bytes of one token (no special-token text), cached per model."""
    vocab = llm._model.vocab  # noqa: SLF001
    cache = _PIECES.setdefault(llm._model, {})  # noqa: SLF001
    piece = cache.get(tok)
    if piece is None:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, tok, buf, size, 0, False)
            if n < 0:
                size = -n
                continue
            piece = buf.raw[:n]
            break
        cache[tok] = piece
    return piece


def logits_at(ctx, idx: int, n_vocab: int) -> np.ndarray:
    """The logits row ``idx`` of the last decode of ``ctx`` (a view: valid until the next
    decode)."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def _logprob_entry(
    llm: llama_cpp.Llama, tok: int, top_n: int, ctx=None, idx: int = -1, logits=None
):
    """Log-probability of ``tok`` (and the ``top_n`` best) under ``logits``, by default the
    row ``idx`` of ``ctx``'s last decode."""
    if logits is None:
        ctx = ctx if ctx is not None else llm._ctx.ctx  # noqa: SLF001
        logits = logits_at(ctx, idx, llm.n_vocab())
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max()
    lse = m + math.log(np.exp(logits - m).sum())

    def info(t: int) -> tuple[str, float, list[int]]:
        b = _token_piece(llm, t)
        return b.decode("utf-8", errors="replace"), float(logits[t] - lse), list(b)

    top: list[tuple[str, float, list[int]]] = []
    if top_n > 0:
        idx = np.argpartition(-logits, top_n)[:top_n]
        idx = idx[np.argsort(-logits[idx])]
        top = [info(int(t)) for t in idx]
    text, lp, b = info(tok)
    return TokenLogprob(text, lp, b, top)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


LOOP_MAX_PERIOD = 48  # longest repeated piece (characters) the loop guard looks for
_CITE_RUN = re.compile(r"\[\d{1,3}\](?:\s*\[\d{1,3}\]){3,}\s*$")


def loop_cut(text: str, repeats: int, max_period: int = LOOP_MAX_PERIOD) -> int | None:
    """Where ``text`` should end if it ends in a loop: one piece of three or more characters,
    a letter among them (so "1000000" and "0.0.0.0" are not loops), repeated ``repeats`` times
    in a row ("/v1/v1/v1", "The answer is: The answer is: ..."), cut
    after its first copy; or a run of four or more citations ("[4] [1] [5] [2]"), cut after
    the first. None when it does not."""
    m = _CITE_RUN.search(text)
    if m:
        first = re.match(r"\[\d{1,3}\]", text[m.start() :])
        return m.start() + first.end()
    n = len(text)
    for p in range(3, max_period + 1):
        if p * repeats > n:
            break
        piece = text[n - p :]
        if not any(c.isalpha() for c in piece):
            continue
        if all(text[n - (k + 1) * p : n - k * p] == piece for k in range(1, repeats)):
            i = n - repeats * p
            while i >= p and text[i - p : i] == piece:
                i -= p
            return i + p
    return None


_CITE_TAIL = re.compile(r"\[\d{1,3}\]((?:\s*\[\d{1,3}\])*\s*(?:\[\d{0,3})?)$")


def loop_hold(text: str, max_period: int = LOOP_MAX_PERIOD) -> int:
    """How many trailing characters of ``text`` a loop found later could cut (``loop_cut``
    keeps the first copy of a repeated piece and the first of a citation run): the copies
    after the first of any periodic tail, the citations after the first of a trailing run.
    Ordinary text holds back a few characters, not a fixed window: a streamed answer's first
    words are not delayed by the guard."""
    n, hold = len(text), 0
    m = _CITE_TAIL.search(text)
    if m:
        hold = len(m.group(1))
    for p in range(3, max_period + 1):
        k = n
        while k - 1 - p >= 0 and text[k - 1] == text[k - 1 - p]:
            k -= 1
        hold = max(hold, n - k)
    return hold


class TextStream:
    """Turns sampled tokens into text deltas: UTF-8 safe, holds back a possible stop-string
    prefix, cuts at a stop string. Shared by the single and the batched engine."""

    def __init__(self, p: GenParams):
        self.p = p
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.full = ""
        self.sent = 0
        self.pending_lp: list[TokenLogprob] = []
        self.stop_hit = False
        # empty code blocks left out one after another (drop_scaffolding): where the last
        # went, how many in a row, and where a run of loop_repeats of them ends the answer
        self._drop_at: int | None = None
        self._drop_run = 0
        self._drop_loop: int | None = None

    def push(self, piece: bytes, lp: TokenLogprob | None) -> Delta | None:
        p = self.p
        if lp is not None:
            self.pending_lp.append(lp)
        self.full += self.decoder.decode(piece)
        if p.loop_repeats:
            cut = loop_cut(self.full, p.loop_repeats)
            if self._drop_loop is not None:  # empty blocks in a loop: the answer ends there
                cut = self._drop_loop if cut is None else min(cut, self._drop_loop)
            if cut is not None:  # a loop: the answer ends after its first copy
                self.full = self.full[: max(cut, self.sent)].rstrip() or self.full[: self.sent]
                if p.drop_scaffolding:
                    self._clean(True)
                self.stop_hit = True
                d = Delta(self.full[self.sent :], self.pending_lp)
                self.pending_lp, self.sent = [], max(self.sent, len(self.full))
                return d if (d.text or d.logprobs) else None
        if p.stop:
            window = max(0, self.sent - max(len(s) for s in p.stop))
            hits = [i for i in (self.full.find(s, window) for s in p.stop) if i >= 0]
            if hits:
                hit = min(hits)
                if p.drop_scaffolding:  # the answer ends at the stop string
                    self.full, rest = self.full[:hit], self.full[hit:]
                    self._clean(True)
                    self.full, hit = self.full + rest, len(self.full)
                self.stop_hit = True
                if hit > self.sent or self.pending_lp:
                    d = Delta(self.full[self.sent : hit], self.pending_lp)
                    self.pending_lp, self.sent = [], hit
                    return d
                return None
        # after the loop guard and the stop strings, which see the text as generated
        hold = self._clean(False) if p.drop_scaffolding else None
        end = len(self.full) - _held_back(self.full, p.stop) if p.stop else len(self.full)
        if p.loop_repeats:  # hold back what a loop found later may cut
            end = max(self.sent, min(end, len(self.full) - loop_hold(self.full)))
        if hold is not None:  # a code block with nothing in it yet
            end = max(self.sent, min(end, hold))
        if end > self.sent or self.pending_lp:
            d = Delta(self.full[self.sent : end], self.pending_lp)
            self.pending_lp, self.sent = [], end
            return d
        return None

    def _echo_labels(self) -> list[str]:
        """The prompt's line labels an answer may echo first: the stop strings that start a
        line ("\\nQuestion:" -> "Question:")."""
        return [s[1:] for s in self.p.stop if s.startswith("\n") and s.endswith(":")]

    def _clean(self, final: bool) -> int:
        """Drop the unsent empty code blocks (``final``: also an open one at the end) and,
        before anything is sent, a first line echoing the question line -> where the text
        to hold back starts."""
        hold = len(self.full)
        if self.sent == 0 and not final and _held_back(self.full, self.p.stop):
            hold = 0  # a stop string may be starting: the echo line waits for it
        elif self.sent == 0:
            self.full, hold = drop_echo(self.full, self._echo_labels(), final)
        pending = () if final else tuple(self.p.stop)
        self.full, code, cuts = drop_empty_code(self.full, final, self.sent, pending)
        for at in cuts:  # blocks with nothing but blank lines between them: one run
            gap = self.full[self._drop_at : at] if self._drop_at is not None else "x"
            self._drop_run = self._drop_run + 1 if not gap.strip() else 1
            self._drop_at = at
            if self.p.loop_repeats and self._drop_run >= self.p.loop_repeats:
                self._drop_loop = at if self._drop_loop is None else self._drop_loop
        return min(hold, code)

    def flush(self) -> Delta | None:
        if self.p.drop_scaffolding and not self.stop_hit:
            self._clean(True)
        if not self.stop_hit and self.sent < len(self.full):
            d = Delta(self.full[self.sent :], [])
            self.sent = len(self.full)
            return d
        return None


def sampler_chain(vocab, p: GenParams, seed: int):
    """A llama.cpp sampler chain for ``p`` (penalties, grammar, then greedy or top-k/top-p/
    min-p/temperature/seed); the caller frees it with ``llama_sampler_free``."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if p.logit_bias:
        n = len(p.logit_bias)
        # finite: -100 bans a token against any real logit, and a grammar that allows only
        # banned tokens still has one to pick (all -inf would abort llama.cpp's grammar)
        arr = (llama_cpp.llama_logit_bias * n)(
            *(llama_cpp.llama_logit_bias(t, b) for t, b in p.logit_bias.items())
        )
        # llama.cpp copies the array; n_vocab bounds-checks the ids
        add(
            chain,
            llama_cpp.llama_sampler_init_logit_bias(llama_cpp.llama_vocab_n_tokens(vocab), n, arr),
        )
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
            llama_cpp.llama_sampler_free(chain)  # and the samplers added so far
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
    """A llama.cpp context with ``n_seq`` sequences (plus one more: the batch engine's prefix
    cache, the single engine's context-free CAD sequence) on a unified KV cache, created from a
    loaded model; owns and frees the context and its batch."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        n_seq: int,
        n_batch: int,
        n_threads: int | None,
        extra_seqs: int = 0,
        n_cells: int | None = None,
    ):
        self.per_seq_ctx = llm.n_ctx()
        cp = llama_cpp.llama_context_default_params()
        # extra_seqs: more sequences, sharing the others' cells (server.kvcache.stitch's label
        # sequence); n_cells: the KV cache size when the caller knows better (a shift of
        # cached cells costs a pass over every cell: server.kvcache.Assembler keeps it small)
        cp.n_ctx = n_cells or self.per_seq_ctx * (n_seq + 1)
        cp.n_seq_max = n_seq + 1 + extra_seqs
        # a step holds a token of every sequence, and llama.cpp aborts the process when a
        # context's batch is smaller than its sequence count: model.n_batch 1..n_seq_max
        # must not (it only sets how many prompt tokens callers put in one decode)
        self.capacity = max(n_batch, cp.n_seq_max)
        cp.n_batch = self.capacity
        cp.n_ubatch = min(self.capacity, 512)
        cp.kv_unified = True
        nt = n_threads or llm.n_threads
        if nt:
            cp.n_threads = cp.n_threads_batch = int(nt)
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, cp)  # noqa: SLF001
        if not self.ctx:
            raise RuntimeError("could not create the batched llama.cpp context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self.vocab = llm._model.vocab  # noqa: SLF001

    def add(self, i: int, tok: int, pos: int, seq: int, logits: bool) -> None:
        """Put ``tok`` at ``pos`` of sequence ``seq`` into slot ``i`` of the batch."""
        b = self.batch
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


def generate(
    llm: llama_cpp.Llama, p: GenParams, cancel: threading.Event | None = None
) -> Iterator[Delta | Finish]:
    """Generate from ``p.prompt_tokens``; the caller has checked the prompt fits the context."""
    n_ctx = llm.n_ctx()
    max_tokens = min(p.max_tokens, n_ctx - len(p.prompt_tokens))
    if p.seed is not None:
        llm.set_seed(p.seed & 0xFFFFFFFF)
        # A seeded request starts from an empty KV cache: reusing the previous request's
        # prefix re-evaluates its last token alone and lays the new cells out differently,
        # which shifts the logits slightly, enough to change a sampled token at temperature
        # > 0. A fresh evaluation gives the same text for the same seed and prompt.
        llm._ctx.kv_cache_clear()  # noqa: SLF001
        llm.reset()
    else:
        llm.set_seed(int(np.random.randint(0, 2**31 - 1)))
    gen = llm.generate(
        p.prompt_tokens,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        temp=p.temperature,
        repeat_penalty=p.repeat_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        grammar=p.grammar,
        logits_processor=_bias_processor(p.logit_bias),
    )
    return token_loop(llm, p, _no_logits(gen), max_tokens, cancel)


def _bias_processor(bias: dict[int, float] | None):
    """``bias`` as llama-cpp-python logits processors (its sampler runs them first, on the
    logits in vocabulary order), or None."""
    if not bias:
        return None
    ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
    vals = np.array(list(bias.values()), dtype=np.float32)  # finite, as in sampler_chain

    def add(_input_ids, scores: np.ndarray) -> np.ndarray:
        scores[ids] += vals
        return scores

    return llama_cpp.LogitsProcessorList([add])


def _no_logits(gen: Iterator[int]) -> Iterator[tuple[int, None]]:
    try:
        for tok in gen:
            yield tok, None
    finally:
        gen.close()


def token_loop(
    llm: llama_cpp.Llama,
    p: GenParams,
    tokens: Iterator[tuple[int, np.ndarray | None]],
    max_tokens: int,
    cancel: threading.Event | None = None,
) -> Iterator[Delta | Finish]:
    """Text deltas and the ``Finish`` of sampled ``(token, logits)`` pairs: the logits the token
    was sampled from (for logprobs; None: the last decode of ``llm``'s own context). Closes
    ``tokens`` when it stops."""
    ts = TextStream(p)
    n_out = 0
    reason = "length"
    try:
        for tok, logits in tokens if max_tokens > 0 else ():
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):  # noqa: SLF001
                reason = "stop"
                break
            n_out += 1
            lp = _logprob_entry(llm, tok, p.top_logprobs, logits=logits) if p.logprobs else None
            d = ts.push(_token_piece(llm, tok), lp)
            if d is not None:
                yield d
            if ts.stop_hit:
                reason = "stop"
                break
            if n_out >= max_tokens:
                break
        if reason != "cancelled":
            d = ts.flush()
            if d is not None:
                yield d
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    yield Finish(reason, len(p.prompt_tokens), n_out)
