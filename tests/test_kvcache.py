"""Chunk KV caches (issue 19): grounded prompts with precomputed excerpt KV stitched in, on the
embedded model's real logits, in both engines; bad cache files are detected and ignored."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct

import llama_cpp
import pytest

from docqa.settings import EXCERPTS_TEMPLATE, load_settings
from models.store import ModelStore
from retrieval.chunking import Chunk, chunk_id
from retrieval.search import Hit
from server import kvcache
from server.batch_engine import BatchEngine
from server.generation import Delta, Finish, GenParams
from server.runtime import ModelRuntime
from server.services.rag import Grounding, RagService

DOCS = [
    (
        "Ports",
        "By default Zephyrd listens on port 7431 for its HTTP API and on port 7432 for metrics. "
        "Change them with the `api_port` and `metrics_port` settings.",
    ),
    (
        "Queue settings",
        "The `max_parallel_jobs` setting limits how many jobs run at once; its default value is "
        "4. The `retry_backoff_seconds` setting is the wait between two attempts of a failed job.",
    ),
    (
        "Logging",
        'Set `log_format = "json"` to write structured logs. Log files rotate every 24 hours.',
    ),
]
QUESTIONS = [
    "Which port does the Zephyrd HTTP API listen on?",
    "What is the default value of max_parallel_jobs?",
]


def _chunk(i: int, heading: str, text: str) -> Chunk:
    return Chunk(chunk_id(f"guide/{i}.md", heading, text), f"guide/{i}.md", heading, text, 40, 0)


CHUNKS = [_chunk(i, h, t) for i, (h, t) in enumerate(DOCS)]


@pytest.fixture(scope="module")
def kvdir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def settings(kvdir):
    return load_settings(
        model={"n_ctx": 1024, "n_threads": 1, "n_parallel": 1},
        retrieval={
            "kv_cache": True,
            "kv_cache_dir": str(kvdir),
            "user_template": EXCERPTS_TEMPLATE,  # excerpts in the prompt: what the cache holds
        },
    )


@pytest.fixture(scope="module")
def rt(settings, kvdir):
    """The embedded model as the server loads it, with a chunk KV store (single engine)."""
    ms = settings.model
    runtime = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 16, kvdir)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def batch(rt):
    be = BatchEngine(rt.llm, 16, n_seq=4, kv=rt.kv)
    yield be
    be.close()


@pytest.fixture(scope="module")
def rag(settings):
    return RagService(settings.retrieval, index=None)


def _params(rt, rag, question: str, order: list[int], plan: bool = True) -> GenParams:
    hits = [Hit(CHUNKS[i], 1.0) for i in order]
    messages, used, _ = rag.build_messages(rt, [{"role": "user", "content": question}], hits, [])
    assert len(used) == len(order)
    prompt = rt.format_chat(messages)
    tokens = rt.prompt_tokens(prompt)
    p = GenParams(tokens, 24, temperature=0.0)
    if plan:
        p.kv_plan = rag.kv_plan(rt, prompt, tokens, Grounding(used, None))
        assert p.kv_plan is not None and p.kv_plan.tokens == tokens
    return p


async def _collect(engine, params: GenParams):
    text, fin = [], None
    async for ev in engine.submit(params):
        if isinstance(ev, Delta):
            text.append(ev.text)
        else:
            fin = ev
    assert isinstance(fin, Finish)
    return "".join(text), fin


def _run(engine, params):
    return asyncio.run(_collect(engine, params))


def _files(rt, p):
    return [rt.kv.path(p.kv_plan.prefix_hash, it.chunk_id) for it in p.kv_plan.items]


def test_plan_cuts_the_grounded_prompt(rt, rag):
    """The prompt is prefix | "[1]" span | "\\n\\n[2]" span | ... | suffix, the pieces tokenize
    to exactly the plain prompt's tokens, and the excerpt number is outside the cached span."""
    p = _params(rt, rag, QUESTIONS[0], [0, 1, 2])
    plan = p.kv_plan
    assert [it.chunk_id for it in plan.items] == [c.id for c in CHUNKS]
    assert rt.detokenize(plan.items[1].label) == "\n\n[2]"
    assert rt.detokenize(plan.items[0].span).startswith(" Ports\nBy default")
    assert "Question: " + QUESTIONS[0] in rt.detokenize(plan.suffix)
    assert rt.detokenize(plan.prefix).endswith("Documentation excerpts:\n")
    # an extra system message changes the prefix: no plan (plain prefill)
    hits = [Hit(c, 1.0) for c in CHUNKS]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ports?"}]
    messages, used, _ = rag.build_messages(rt, msgs, hits, [])
    prompt = rt.format_chat(messages)
    assert rag.kv_plan(rt, prompt, rt.prompt_tokens(prompt), Grounding(used, None)) is None


@pytest.mark.parametrize("name", ["single", "batch"])
def test_cold_then_warm_answers_match_plain(rt, batch, rag, name):
    """First use computes and saves each excerpt's KV (cold), the next loads it (warm): same
    answer both times, and at temperature 0 it states what the plain-prefill answer states."""
    engine = rt.engine if name == "single" else batch
    for q, order in ((QUESTIONS[0], [0, 1, 2]), (QUESTIONS[1], [1, 0])):
        plain, _ = _run(engine, _params(rt, rag, q, order, plan=False))
        p = _params(rt, rag, q, order)
        computed, loaded = rt.kv.computed, rt.kv.loaded
        cold, fin = _run(engine, p)
        warm, _ = _run(engine, _params(rt, rag, q, order))
        assert all(f.is_file() for f in _files(rt, p))
        assert rt.kv.loaded - loaded >= len(order)  # the warm request loaded every excerpt
        assert rt.kv.computed - computed <= len(order)
        assert fin.prompt_tokens == len(p.prompt_tokens)
        assert cold == warm
        fact = "7431" if "port" in q else "4"
        assert fact in plain and fact in warm, (plain, warm)
    assert (next(iter(rt.kv.root.iterdir())) / "manifest.json").is_file()


def test_both_engines_and_concurrent_requests_agree(rt, batch, rag):
    """The batch engine, with four stitched requests in flight together, gives each the answer
    the single engine gives it alone (no cross-talk between stitched sequences)."""
    cases = [(QUESTIONS[i % 2], order) for i, order in enumerate([[0, 1, 2], [1, 0], [2, 0], [1]])]
    alone = [_run(rt.engine, _params(rt, rag, q, o))[0] for q, o in cases]

    async def together():
        return await asyncio.gather(*(_collect(batch, _params(rt, rag, q, o)) for q, o in cases))

    got = [t for t, _ in asyncio.run(together())]
    # llama.cpp rounds differently for different batch compositions (docs/benchmarks.md,
    # continuous batching), so a long greedy answer may drift late: compare the starts
    assert all(g and g[:40] == a[:40] for g, a in zip(got, alone)), (got, alone)


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-1000])
    elif how == "corrupt":
        b = bytearray(data)
        b[-500] ^= 0xFF
        path.write_bytes(bytes(b))
    else:  # made by another model: a valid file whose header names another fingerprint
        n0 = len(kvcache.MAGIC) + 4
        (n,) = struct.unpack("<I", data[len(kvcache.MAGIC) : n0])
        hdr = json.loads(data[n0 : n0 + n])
        hdr["fingerprint"] = "f" * 64
        if how == "not-an-object":  # valid JSON, but a list (read() raised AttributeError)
            hdr = list(hdr)
        raw = json.dumps(hdr).encode()
        path.write_bytes(kvcache.MAGIC + struct.pack("<I", len(raw)) + raw + data[n0 + n :])


@pytest.mark.parametrize("how", ["truncated", "corrupt", "other-model", "not-an-object"])
@pytest.mark.parametrize("name", ["single", "batch"])
def test_bad_cache_file_falls_back_to_plain_prefill(rt, batch, rag, caplog, how, name):
    """A truncated, corrupt or other-model cache file is detected, logged and never loaded:
    the request is answered by plain prefill, exactly as with no cache at all."""
    engine = rt.engine if name == "single" else batch
    q, order = QUESTIONS[0], [0, 1, 2]
    plain, _ = _run(engine, _params(rt, rag, q, order, plan=False))
    p = _params(rt, rag, q, order)
    _run(engine, p)  # the entries exist
    target = _files(rt, p)[1]
    saved = target.read_bytes()
    try:
        _corrupt(target, how)
        with pytest.raises(kvcache.BadEntry):
            rt.kv.read(p.kv_plan, p.kv_plan.items[1])
        rejected, loaded = rt.kv.rejected, rt.kv.loaded
        with caplog.at_level(logging.WARNING, logger="server.kvcache"):
            text, _ = _run(engine, _params(rt, rag, q, order))
        assert rt.kv.rejected == rejected + 1
        assert rt.kv.loaded == loaded  # nothing was loaded into a sequence
        assert any("ignored" in r.getMessage() for r in caplog.records)
        assert text == plain
    finally:
        target.write_bytes(saved)
    assert rt.kv.read(p.kv_plan, p.kv_plan.items[1]) is not None


def test_a_generation_context_that_cannot_be_made_means_plain_prefill(rt, rag, monkeypatch):
    """The single engine makes its chunk-KV generation context on first use; when that fails
    (out of memory on a GPU, say), the request is answered by plain prefill (before: the error
    failed every grounded request)."""
    import server.generation as generation

    q, order = QUESTIONS[1], [0, 1, 2]
    plain, _ = _run(rt.engine, _params(rt, rag, q, order, plan=False))
    runner = rt.engine.kv
    kept, runner.bctx = runner.bctx, None

    def no_memory(*a, **k):
        raise RuntimeError("could not create the batched llama.cpp context")

    monkeypatch.setattr(generation.BatchContext, "__init__", no_memory)
    try:
        text, fin = _run(rt.engine, _params(rt, rag, q, order))
        assert fin.reason in ("stop", "length") and text == plain
    finally:
        monkeypatch.undo()
        runner.bctx = kept


def test_real_server_writes_and_reuses_chunk_caches(server_factory, fixture_index):
    """``docqa serve`` with ``retrieval.kv_cache`` and continuous batching: the first grounded
    answer saves its excerpts' caches beside the index (with a manifest), the second loads
    them and answers the same; a corrupt file there does not break the answer."""
    from openai import OpenAI

    index_dir = fixture_index()  # the fixture docs at the default chunking, built once
    s = server_factory(
        {
            "model": {"n_ctx": 1024, "n_parallel": 2, "n_threads": 1},
            "retrieval": {
                "index_dir": str(index_dir),
                "kv_cache": True,
                "user_template": EXCERPTS_TEMPLATE,
            },
        },
        "kvserver",
    )
    c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def ask() -> str:
        r = c.chat.completions.create(
            model="docqa",
            max_tokens=32,
            temperature=0,
            messages=[{"role": "user", "content": QUESTIONS[0]}],
        )
        return r.choices[0].message.content

    first = ask()
    kv_root = index_dir.parent / f"{index_dir.name}.kv"
    files = sorted(kv_root.glob("*/*.kv"))
    assert files and all((f.parent / "manifest.json").is_file() for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert ask() == first
    assert [f.stat().st_mtime_ns for f in files] == stamps  # loaded, not rewritten
    files[0].write_bytes(files[0].read_bytes()[:-10])  # truncated: plain prefill, still 200
    assert ask()
    assert "ignored" in s.log_tail(20000)


# -- the evidence layout (the default template): evidence units are the cached spans ----------
@pytest.fixture(scope="module")
def ev_rag(kvdir):
    s = load_settings(
        model={"n_ctx": 1024, "n_threads": 1},
        retrieval={"kv_cache": True, "kv_cache_dir": str(kvdir), "evidence_units": 3},
    )
    assert not s.retrieval.shows_excerpts and kvcache.kv_root(s.retrieval) is not None
    return RagService(s.retrieval, index=None)


def _ev_params(rt, rag, question: str, order: list[int], plan: bool = True) -> GenParams:
    from retrieval.evidence import for_reader

    hits = [Hit(CHUNKS[i], 1.0) for i in order]
    ev = for_reader(question, [h.chunk.text for h in hits], lambda w: 1.0, 3)
    assert ev
    messages, used, ev = rag.build_messages(rt, [{"role": "user", "content": question}], hits, ev)
    prompt = rt.format_chat(messages)
    tokens = rt.prompt_tokens(prompt)
    p = GenParams(tokens, 24, temperature=0.0)
    if plan:
        p.kv_plan = rag.kv_plan(rt, prompt, tokens, Grounding(used, None, 1.0, ev))
        assert p.kv_plan is not None and p.kv_plan.tokens == tokens
    return p


def test_unit_plan_cuts_the_evidence_prompt(rt, ev_rag):
    """In the evidence layout the cached spans are the evidence units, each with its tail: the
    prompt is prefix | unit " [n]\n" | unit " [n]\n" | ... | question, and the pieces tokenize
    to the plain prompt's tokens; no label is left to evaluate per request. A unit's cache key
    is its text, whatever excerpt number it gets; its tail's key is the unit's and the tag's."""
    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [0, 1, 2])
    plan = p.kv_plan
    assert rt.detokenize(plan.prefix).endswith("Documentation excerpts:\n")
    assert all(it.label == [] for it in plan.items)
    spans = [rt.detokenize(it.span) for it in plan.items]
    assert any("7431" in t for t in spans) and any("max_parallel_jobs" in t for t in spans)
    assert not any("[1]" in t or "[2]" in t for t in spans)
    assert len(plan.items) >= 2
    tails = [rt.detokenize(it.tail) for it in plan.items]
    assert all(re.fullmatch(r" \[[123]\]\n", t) for t in tails), tails
    assert rt.detokenize(plan.suffix).startswith("\nQuestion: " + both)
    q = _ev_params(rt, ev_rag, both, [1, 0, 2])  # the same unit under another number
    by_id = {it.chunk_id: it for it in plan.items}
    same = [it for it in q.kv_plan.items if it.chunk_id in by_id]
    assert same and all(i.startswith("u-") for i in by_id)
    moved = [it for it in same if it.tail != by_id[it.chunk_id].tail]
    assert moved and all(it.key(True) != by_id[it.chunk_id].key(True) for it in moved)


def test_stitched_unit_cells_match_a_plain_prefill(rt, ev_rag):
    """The first token's distribution after a stitched prompt (units and tails loaded, placed
    and shifted in the assembler, copied into another context) is close to a plain prefill of
    the same tokens: the lines (units and their tags) only lose their attention to the lines
    before them."""
    import numpy as np

    from server.generation import BatchContext, logits_at

    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [1, 0, 2])
    assert len(p.kv_plan.items) >= 2 and all(it.tail for it in p.kv_plan.items)
    n_vocab = rt.llm.n_vocab()

    def first_logprobs(stitched: bool):
        ctx = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
        asm = kvcache.Assembler(rt.llm, rt.kv)
        try:
            if stitched:
                n = asm.install(p.kv_plan, ctx.ctx, 0)
                assert n > len(p.kv_plan.prefix) and n <= len(p.prompt_tokens) - len(
                    p.kv_plan.suffix
                )
                kvcache._decode(ctx, p.kv_plan.tokens[n:], n, 0, True, 512)
            else:
                kvcache._decode(ctx, p.prompt_tokens, 0, 0, True, 512)
            x = logits_at(ctx.ctx, -1, n_vocab).astype(np.float64)
        finally:
            asm.close()
            ctx.close()
        x -= x.max()
        return x - np.log(np.exp(x).sum())

    plain = first_logprobs(False)
    cold = first_logprobs(True)  # units and tails computed and saved
    warm = first_logprobs(True)  # loaded
    assert np.allclose(cold, warm, atol=1e-3)
    kl = float((np.exp(plain) * (plain - warm)).sum())
    assert kl < 0.5 and plain.argmax() == warm.argmax(), kl
    files = [rt.kv.path(p.kv_plan.prefix_hash, it.key(t)) for it in p.kv_plan.items for t in (0, 1)]
    assert all(f.is_file() for f in files)


class _Decodes(list):
    """The batch size of every ``llama_decode`` while in the ``with`` block."""

    def __enter__(self):
        self.real = llama_cpp.llama_decode
        llama_cpp.llama_decode = lambda c, b: self.append(b.n_tokens) or self.real(c, b)
        return self

    def __exit__(self, *exc):
        llama_cpp.llama_decode = self.real


def _next_logprobs(rt, p, recompute: int | None, labels: int = kvcache.Assembler.LABELS):
    """The next-token log-probabilities after ``p``'s prompt: prefilled plainly (``recompute``
    None) or stitched by an assembler with ``recompute`` and ``labels`` label sequences (the
    default: recomputed runs in one decode; 1: one run per decode) -> (log-probabilities,
    the assembler's decode sizes, (cells installed, their state size))."""
    import numpy as np

    from server.generation import BatchContext, logits_at

    plan = p.kv_plan
    plan.recompute = recompute or 0
    ctx = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
    asm = kvcache.Assembler(rt.llm, rt.kv)
    asm.LABELS = labels
    decodes, cells = _Decodes(), None
    try:
        if recompute is None:
            kvcache._decode(ctx, p.prompt_tokens, 0, 0, True, 512)
        else:
            with decodes:
                n = asm.install(plan, ctx.ctx, 0)
            # a last recomputed run (the last line's tag) is left to go with the suffix
            end = len(p.prompt_tokens) - len(plan.suffix)
            rs = kvcache.recompute_runs(plan)
            assert n == (rs[-1][1] if rs and rs[-1][1] + len(rs[-1][0]) == end else end)
            cells = (n, llama_cpp.llama_state_seq_get_size(ctx.ctx, 0))
            kvcache._decode(ctx, plan.tokens[n:], n, 0, True, 512)
        x = logits_at(ctx.ctx, -1, rt.llm.n_vocab()).astype(np.float64)
    finally:
        asm.close()
        ctx.close()
    x -= x.max()
    return x - np.log(np.exp(x).sum()), list(decodes), cells


def _kl(a, b) -> float:
    import numpy as np

    return float((np.exp(a) * (a - b)).sum())


def test_recomputed_lines_bring_the_stitched_prompt_back_to_plain_prefill(rt, ev_rag):
    """``retrieval.kv_recompute``: the recomputed tokens are the heads and tags of the lines
    after the first, at their places; recomputing whole lines gives a plain prefill's
    next-token distribution (each line then attends to the lines before it), while the plain
    stitched prompt does not; a cache read for a plan with recompute is the same entry."""
    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [1, 0, 2])
    plan = p.kv_plan
    assert len(plan.items) >= 2 and plan.recompute == 2  # the default
    plan.recompute = 2
    runs = kvcache.recompute_runs(plan)
    # a line's tag and the next line's head are one run: one decode for each
    assert len(runs) == len(plan.items) - 1 + (1 if plan.items[-1].tail else 0)
    toks = plan.tokens
    for run, at in runs:
        assert toks[at : at + len(run)] == run
    second = len(plan.prefix) + len(plan.items[0].span) + len(plan.items[0].tail)
    assert runs[0] == (plan.items[1].span[:2], second)
    after = plan.items[2].span[:2] if len(plan.items) > 2 else []
    assert runs[1][0] == plan.items[1].tail + after

    def logprobs(recompute: int | None, labels: int = kvcache.Assembler.LABELS):
        return _next_logprobs(rt, p, recompute, labels)[0]

    plain = logprobs(None)
    stitched = logprobs(0)
    whole = logprobs(max(len(it.span) for it in plan.items))
    heads = logprobs(2)
    one_by_one = logprobs(2, labels=1)  # each run sees the runs before it recomputed
    # measured: 0.005 (whole lines: the numeric noise of other batch splits), 0.13
    # (stitched), 0.010 (two tokens and the tag of each line)
    assert _kl(plain, whole) < 0.02 and plain.argmax() == whole.argmax()
    assert _kl(plain, stitched) > 10 * _kl(plain, whole)
    assert _kl(plain, heads) < _kl(plain, stitched)
    assert _kl(plain, one_by_one) < _kl(plain, stitched)


def test_recomputed_runs_share_one_decode(rt, ev_rag):
    """Three lines give two recomputed runs before the suffix; the assembler evaluates them in
    one decode, each on a sequence of its own, seeing the other's cached cells instead of its
    recomputed ones: close to evaluating them one after the other (each seeing the runs before
    it recomputed), and as close to plain prefill."""
    from server.generation import BatchContext

    three = (
        "Which port does the Zephyrd HTTP API use, which setting limits parallel jobs, "
        "and how do I write json logs?"
    )
    p = _ev_params(rt, ev_rag, three, [0, 1, 2])
    plan = p.kv_plan
    plan.recompute = 2
    runs = kvcache.recompute_runs(plan)
    assert len(plan.items) == 3 and len(runs) == 3  # the last goes with the suffix
    _run(rt.engine, p)  # the entries exist
    plain, _, _ = _next_logprobs(rt, p, None)
    stitched, _, _ = _next_logprobs(rt, p, 0)
    together, d_together, cells = _next_logprobs(rt, p, 2)
    one_by_one, d_one, cells_one = _next_logprobs(rt, p, 2, labels=1)
    n_runs = sum(len(t) for t, _ in runs[:-1])
    assert d_together[-1] == n_runs  # both runs, one decode
    assert d_one[-2:] == [len(runs[0][0]), len(runs[1][0])]
    assert _kl(plain, together) < _kl(plain, stitched)
    assert _kl(plain, one_by_one) < _kl(plain, stitched)
    # a small change against what recomputing does at all
    assert _kl(one_by_one, together) < 0.25 * (_kl(plain, stitched) - _kl(plain, one_by_one))
    # one cell per position, nothing left of the cached runs: the state of a plain prefill
    n = cells[0]
    ref = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
    try:
        kvcache._decode(ref, plan.tokens[:n], 0, 0, False, 512)
        size = llama_cpp.llama_state_seq_get_size(ref.ctx, 0)
    finally:
        ref.close()
    assert cells == cells_one == (n, size)

    # runs that do not fit one batch together are split: here 7 tokens a batch for 2 + 6
    plan.recompute = 2
    asm = BatchContext(rt.llm, 1, 512, 1, extra_seqs=8, n_cells=1024)
    try:
        payloads = kvcache.check(rt.kv, plan)
        with _Decodes() as decodes:
            got = kvcache.stitch(asm, 0, 1, 2, plan, rt.kv, payloads, 0, 7, n_labels=8)
        assert got == n and decodes[-2:] == [len(runs[0][0]), len(runs[1][0])]
        assert llama_cpp.llama_state_seq_get_size(asm.ctx, 0) == size
    finally:
        asm.close()


def test_copied_cells_hold_the_applied_shifts(rt, ev_rag):
    """The cells the assembler hands over (``llama_state_seq_get_data``) hold the shifted
    units' keys re-rotated: the next token's logits after the suffix are the same in the
    assembling context (where a decode applies any pending shift itself) and in a context
    that received the copied cells. A missing shift-applying decode fails this."""
    import numpy as np

    from server.generation import BatchContext, logits_at

    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    plan = _ev_params(rt, ev_rag, both, [1, 0, 2]).kv_plan
    assert len(plan.items) >= 2  # a second unit is shifted
    _run(rt.engine, _ev_params(rt, ev_rag, both, [1, 0, 2]))  # the entries exist
    payloads = kvcache.check(rt.kv, plan)
    assert payloads and all(p is not None and t is not None for p, t in payloads)
    n_vocab = rt.llm.n_vocab()
    asm = BatchContext(rt.llm, 1, 512, 1, extra_seqs=1, n_cells=1024)
    gen = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
    try:
        n = kvcache.stitch(asm, 0, 1, 2, plan, rt.kv, payloads, 0, 512)
        state = np.frombuffer(kvcache._state(asm, 0), dtype=np.uint8)
        assert (
            llama_cpp.llama_state_seq_set_data(
                gen.ctx, state.ctypes.data_as(kvcache._U8P), state.size, 0
            )
            == state.size
        )
        logits = []
        for bctx in (asm, gen):
            kvcache._decode(bctx, plan.tokens[n:], n, 0, True, 512)
            logits.append(logits_at(bctx.ctx, -1, n_vocab).copy())
    finally:
        asm.close()
        gen.close()
    assert np.allclose(logits[0], logits[1], atol=1e-3), np.abs(logits[0] - logits[1]).max()


def test_moved_keys_are_llama_cpps_shift_without_its_pass(rt, ev_rag, caplog):
    """``kvcache.moved`` puts a cached entry at another position in Python (cell positions
    moved, keys rotated): the cells equal llama.cpp's own K-shift of the same entry to within
    f16 rounding, and a stitched prompt built that way gives the same next token as one
    llama.cpp shifted. The assembler checks the rotation once against llama.cpp and turns it
    off when it does not match (a wrong rope here)."""
    import dataclasses

    import numpy as np

    from server.generation import BatchContext, logits_at

    rope = kvcache.Rope.of(rt.llm)
    assert rope is not None and not rope.neox and rope.n_rot == rope.head_dim == 64
    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    plan = _ev_params(rt, ev_rag, both, [1, 0, 2]).kv_plan
    _run(rt.engine, _ev_params(rt, ev_rag, both, [1, 0, 2]))  # the entries exist
    payloads = kvcache.check(rt.kv, plan)
    span, tail = payloads[1]
    assert kvcache._layout(np.zeros(64, np.uint8)) is None  # not a state blob: no move
    asm = BatchContext(rt.llm, 1, 512, 1, extra_seqs=1, n_cells=1024)
    try:

        def shifted(payload, delta):  # llama.cpp's shift, applied by a decode
            assert kvcache._load_span(asm, 1, payload)
            llama_cpp.llama_memory_seq_add(asm.mem, 1, 0, -1, delta)
            kvcache._decode(asm, [0], 0, 2, False, 1)
            llama_cpp.llama_memory_seq_rm(asm.mem, 2, -1, -1)
            out = np.frombuffer(kvcache._state(asm, 1), dtype=np.uint8).copy()
            llama_cpp.llama_memory_seq_rm(asm.mem, 1, -1, -1)
            return out

        for payload, delta in ((span, 5), (span, 61), (tail, 23)):
            ref = kvcache._layout(shifted(payload, delta))
            for r, want in ((rope, True), (dataclasses.replace(rope, neox=True), False)):
                got = kvcache._layout(kvcache.moved(payload, delta, r))
                assert (got[0][:, 0] == ref[0][:, 0]).all()  # the positions
                k_ref, k_got = (x[1].astype(np.float32) for x in (ref, got))
                err = float(np.abs(k_ref - k_got).max())
                assert (err < 1e-3 * float(np.abs(k_ref).max()) + 1e-3) == want, (delta, err)
        moved_bytes = kvcache.moved(span, 5, rope)
        assert moved_bytes is not None and not np.array_equal(moved_bytes, np.asarray(span))
    finally:
        asm.close()

    n_vocab = rt.llm.n_vocab()

    def next_token(use: kvcache.Rope | None):
        gen = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
        a = kvcache.Assembler(rt.llm, rt.kv)
        a.rope = use
        try:
            n = a.install(plan, gen.ctx, 0)
            assert n is not None
            kvcache._decode(gen, plan.tokens[n:], n, 0, True, 512)
            x = logits_at(gen.ctx, -1, n_vocab).astype(np.float64).copy()
            return x, a.rope
        finally:
            a.close()
            gen.close()

    by_llama, _ = next_token(None)
    with caplog.at_level(logging.INFO, logger="server.kvcache"):
        in_python, kept = next_token(rope)
        assert kept == rope  # the check passed: entries were moved in Python
        wrong, dropped = next_token(dataclasses.replace(rope, neox=True))
    assert dropped is None  # a rotation unlike llama.cpp's is never used
    assert any("cannot be moved in Python" in r.getMessage() for r in caplog.records)

    def kl(a, b):
        a, b = a - a.max(), b - b.max()
        a, b = a - np.log(np.exp(a).sum()), b - np.log(np.exp(b).sum())
        return float((np.exp(a) * (a - b)).sum())

    print("KL", kl(by_llama, in_python), kl(by_llama, wrong))
    assert by_llama.argmax() == in_python.argmax() == wrong.argmax()
    assert kl(by_llama, in_python) < 0.01
    assert np.array_equal(by_llama, wrong)  # after the failed check: llama.cpp's shift


def test_a_tail_is_never_read_for_another_tag(rt, ev_rag):
    """A tail entry copied to another tag's place is refused (its header names its key)."""
    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [0, 1, 2])
    _run(rt.engine, p)
    a, b = p.kv_plan.items[0], p.kv_plan.items[1]
    assert a.tail != b.tail
    other = kvcache.KVItem(a.chunk_id, [], a.span, b.tail)  # a's unit under b's tag
    src = rt.kv.path(p.kv_plan.prefix_hash, a.key(True))
    dst = rt.kv.path(p.kv_plan.prefix_hash, other.key(True))
    saved = dst.read_bytes() if dst.exists() else None
    try:
        dst.write_bytes(src.read_bytes())
        with pytest.raises(kvcache.BadEntry):
            rt.kv.read(p.kv_plan, other, True)
    finally:
        if saved is None:
            dst.unlink()
        else:
            dst.write_bytes(saved)


@pytest.mark.parametrize("name", ["single", "batch"])
def test_unit_caches_cold_then_warm_state_the_fact(rt, batch, ev_rag, name):
    """Evidence units computed and saved on first use (cold), loaded on the next (warm): the
    same answer both times, and it states the fact the plain-prefill answer states."""
    engine = rt.engine if name == "single" else batch
    for q, order, fact in ((QUESTIONS[0], [0, 1, 2], "7431"), (QUESTIONS[1], [1, 0], "4")):
        plain, _ = _run(engine, _ev_params(rt, ev_rag, q, order, plan=False))
        p = _ev_params(rt, ev_rag, q, order)
        cold, fin = _run(engine, p)
        loaded, computed = rt.kv.loaded, rt.kv.computed
        warm, _ = _run(engine, _ev_params(rt, ev_rag, q, order))
        assert all(f.is_file() for f in _files(rt, p))
        # warm: every unit and every tail loaded, nothing computed
        assert rt.kv.computed == computed
        assert rt.kv.loaded - loaded == sum(1 + bool(it.tail) for it in p.kv_plan.items)
        assert fin.prompt_tokens == len(p.prompt_tokens)
        assert cold == warm
        assert fact in plain and fact in warm, (plain, warm)


@pytest.mark.parametrize("how", ["truncated", "corrupt", "other-model"])
def test_bad_tail_file_falls_back_to_plain_prefill(rt, ev_rag, caplog, how):
    """A unit's cached tail (its " [n]\n") that is truncated, corrupt or from another model is
    detected and never loaded: the answer is the plain-prefill one."""
    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [0, 1, 2])
    _run(rt.engine, p)  # the entries exist
    it = p.kv_plan.items[-1]
    target = rt.kv.path(p.kv_plan.prefix_hash, it.key(True))
    saved = target.read_bytes()
    try:
        _corrupt(target, how)
        with pytest.raises(kvcache.BadEntry):
            rt.kv.read(p.kv_plan, it, True)
        rejected, loaded = rt.kv.rejected, rt.kv.loaded
        # each compared run starts from the same prompt cache (a prompt evaluated from another
        # cached start rounds differently, and a greedy answer may drift late)
        other = _ev_params(rt, ev_rag, QUESTIONS[1], [1, 0], plan=False)
        _run(rt.engine, other)
        with caplog.at_level(logging.WARNING, logger="server.kvcache"):
            text, _ = _run(rt.engine, _ev_params(rt, ev_rag, both, [0, 1, 2]))
        assert rt.kv.rejected == rejected + 1 and rt.kv.loaded == loaded
        assert any("ignored" in r.getMessage() for r in caplog.records)
        _run(rt.engine, other)
        plain, _ = _run(rt.engine, _ev_params(rt, ev_rag, both, [0, 1, 2], plan=False))
        assert text == plain
    finally:
        target.write_bytes(saved)
    assert rt.kv.read(p.kv_plan, it, True) is not None


def test_index_kv_computes_every_unit(rt, ev_rag, tmp_path):
    """``docqa index kv`` in the evidence layout saves one entry per evidence unit of every
    chunk (units shared by two chunks once); a second run writes nothing."""
    store, rt.kv = rt.kv, kvcache.KVStore(tmp_path, rt.kv.fingerprint, rt.id)
    try:
        n_units = len({it.chunk_id for c in CHUNKS for it in kvcache.unit_items(rt, c)})
        first = kvcache.build_cache(rt, ev_rag.settings, CHUNKS, progress=False)
        assert first["spans"] == n_units and first["written"] == n_units > len(CHUNKS)
        k = ev_rag.settings.top_k  # a tail per unit and tag [1] .. [top_k]
        assert first["tails_written"] == n_units * k
        assert len(list(tmp_path.glob("*/u-*.t*.kv"))) == n_units * k
        assert len(list(tmp_path.glob("*/u-*.kv"))) == n_units * (1 + k)
        again = kvcache.build_cache(rt, ev_rag.settings, CHUNKS, progress=False)
        assert again["written"] == again["tails_written"] == 0
        p = _ev_params(rt, ev_rag, QUESTIONS[1], [1, 0])
        assert all(rt.kv.read(p.kv_plan, it) is not None for it in p.kv_plan.items)
        assert all(rt.kv.read(p.kv_plan, it, True) is not None for it in p.kv_plan.items)
        # a document deleted from the index: its units' entries (and their tails) go
        kept = {it.chunk_id for it in kvcache.unit_items(rt, CHUNKS[0])}
        d = next(tmp_path.glob("*/manifest.json")).parent
        (d / "0123456789abcdef.kv").write_bytes(b"an excerpts-layout entry")  # not a unit: kept
        before = {f.name for f in d.glob("u-*.kv")}
        fewer = kvcache.build_cache(rt, ev_rag.settings, CHUNKS[:1], progress=False)
        assert fewer["written"] == 0 and fewer["pruned"] == (n_units - len(kept)) * (1 + k) > 0
        after = {f.name for f in d.glob("u-*.kv")}
        assert after == {n for n in before if n.split(".")[0] in kept}
        assert len(after) == len(kept) * (1 + k)
        assert (d / "0123456789abcdef.kv").is_file()
        # top_k lowered: the tails of the tags no longer used go, the units stay
        s2 = ev_rag.settings.model_copy(update={"top_k": k - 1})
        lower = kvcache.build_cache(rt, s2, CHUNKS[:1], progress=False)
        assert lower["written"] == lower["tails_written"] == 0 and lower["pruned"] == len(kept)
        assert len(list(d.glob("u-*.kv"))) == len(kept) * k
    finally:
        rt.kv = store


def test_stitched_training_forward_is_the_served_computation(rt, ev_rag):
    """training.blocks trains on what the unit caches compute. On the embedded model (its GGUF
    weights in torch), the first token's distribution of ``stitched_forward`` matches
    llama.cpp's stitched prompt to within the torch-vs-llama.cpp noise (a plain forward of the
    same tokens in torch vs llama.cpp's plain prefill), and is closer to it than a plain
    forward pass is."""
    import numpy as np
    import torch

    from server.generation import BatchContext, logits_at
    from training.blocks import plan_segments, stitched_forward
    from training.hf import load_causal_lm

    both = "Which port does the Zephyrd HTTP API use, and which setting limits parallel jobs?"
    p = _ev_params(rt, ev_rag, both, [1, 0, 2])
    p.kv_plan.recompute = 0  # the stitched computation itself (kv_recompute redoes some of it)
    ids, segments = plan_segments(p.kv_plan)
    assert ids == p.prompt_tokens and max(segments) >= 2

    def norm(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    def served(stitched: bool):
        ctx = BatchContext(rt.llm, 1, 512, 1, n_cells=1024)
        asm = kvcache.Assembler(rt.llm, rt.kv)
        try:
            if stitched:
                n = asm.install(p.kv_plan, ctx.ctx, 0)
                kvcache._decode(ctx, p.kv_plan.suffix, n, 0, True, 512)
            else:
                kvcache._decode(ctx, ids, 0, 0, True, 512)
            return norm(logits_at(ctx.ctx, -1, rt.llm.n_vocab()))
        finally:
            asm.close()
            ctx.close()

    model, _ = load_causal_lm(rt.path)
    x = torch.tensor(ids)
    with torch.no_grad():
        plain = norm(model(input_ids=x[None]).logits[0, -1].numpy())
        ours = norm(stitched_forward(model, x, torch.tensor(segments)).logits[0, -1].numpy())

    def kl(a, b):
        return float((np.exp(a) * (a - b)).sum())

    stitched, noise = served(True), kl(served(False), plain)
    assert kl(stitched, ours) < max(3 * noise, 0.02), (kl(stitched, ours), noise)
    assert kl(stitched, ours) < kl(stitched, plain) / 3, (kl(stitched, ours), kl(stitched, plain))


def test_a_model_fingerprint_covers_the_end_of_a_small_file(tmp_path):
    """Files of 4-8 MiB: the fingerprint covers their last bytes too (before: only the first
    4 MiB, so two such files that differ at the end shared their cache entries)."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytearray(6 << 20)
    a.write_bytes(bytes(data))
    data[-1] = 1
    b.write_bytes(bytes(data))
    assert kvcache.model_fingerprint(a) != kvcache.model_fingerprint(b)
    assert kvcache.model_fingerprint(a) == kvcache.model_fingerprint(a)


def test_a_model_fingerprint_covers_every_byte_of_the_weights(tmp_path):
    """A change in the middle of a large file (a finetune of middle layers) is another model:
    before session 24 only the size and the first and last 4 MiB were hashed. The store's
    sha256 (provenance) stands for reading the file and gives the same key."""
    import hashlib

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytearray(20 << 20)
    a.write_bytes(bytes(data))
    data[10 << 20] = 1
    b.write_bytes(bytes(data))
    fa, fb = kvcache.model_fingerprint(a), kvcache.model_fingerprint(b)
    assert fa != fb
    sha = hashlib.sha256(a.read_bytes()).hexdigest()
    assert kvcache.model_fingerprint(a, None, sha) == fa
    assert kvcache.model_fingerprint(a, {"flash_attn": 0}) != fa
    b.write_bytes(a.read_bytes())  # rewritten in place: read again, not the kept digest
    assert kvcache.model_fingerprint(b) == fa


def test_prune_removes_the_temporary_files_of_killed_writers(tmp_path):
    """Found by a review: a writer killed mid-write left ``.<key>.kv.tmp-*`` for ever (never
    loaded, never pruned). Stale ones go; a recent one (a write in progress) stays."""
    import os
    import time

    from server.kvcache import _TMP_STALE_S, prune

    (tmp_path / "c-abc.kv").write_bytes(b"x")
    stale = tmp_path / ".c-abc.kv.tmp-1234"
    fresh = tmp_path / ".c-def.kv.tmp-5678"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - _TMP_STALE_S - 10
    os.utime(stale, (old, old))
    assert prune(tmp_path, {"c-abc"}, False) == 1
    assert not stale.exists() and fresh.exists() and (tmp_path / "c-abc.kv").exists()


def test_a_conversation_leaving_no_room_for_excerpts_is_a_400(rt, settings):
    """Found by a review: with excerpts in the prompt, a conversation filling the budget got
    an answer from no excerpts at all, neither grounded nor an abstain, nothing flagged."""
    from retrieval.search import SearchResult
    from server.errors import APIError

    history = " ".join(["The quick brown fox jumps over the lazy dog."] * 90)  # ~900 tokens
    msgs = [
        {"role": "user", "content": history},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": QUESTIONS[0]},
    ]
    res = SearchResult([Hit(c, 1.0) for c in CHUNKS], 0.9)
    rag = RagService(settings.retrieval.model_copy(update={"evidence_units": 0}), index=None)
    with pytest.raises(APIError) as e:
        rag.ground(rt, msgs, res, QUESTIONS[0])
    assert (e.value.status, e.value.code) == (400, "context_length_exceeded")
    _, g = rag.ground(rt, msgs[-1:], res, QUESTIONS[0])  # room enough: grounded as before
    assert g.hits and g.abstain is None
