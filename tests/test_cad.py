"""Context-aware decoding (issue 16): both engines on the embedded model's real logits, the
ticket path, and the ``cad_alpha`` field on a real server."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import pytest

from docqa.settings import load_settings
from models.store import ModelStore
from server.batch_engine import BatchEngine
from server.cad import combine
from server.generation import Delta, Finish, GenParams
from server.runtime import ModelRuntime
from server.services.generation import grammar_for
from server.services.tickets import _generate

from .conftest import FIXTURES

SYSTEM = "Answer the question using only the documentation excerpts."
QUESTION = "Which setting sets the port of the Zephyrd admin console?"
EXCERPTS = (
    "Documentation excerpts:\n[1] Admin console\nThe Zephyrd admin console listens on the port "
    "given by the zorblax_port setting (default 7311).\n\nQuestion: " + QUESTION
)
LEAD = "The admin console port is set by the"  # the next token starts the made-up name


@pytest.fixture(scope="module")
def rt():
    """The embedded model as the server loads it (single engine, its tokenizer and template)."""
    ms = load_settings(model={"n_ctx": 512, "n_threads": 1, "n_parallel": 1}).model
    runtime = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 16)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def engines(rt):
    """Both engines on the same model: the runtime's single engine and a two-slot batch one."""
    be = BatchEngine(rt.llm, 16, n_seq=2)
    yield {"single": rt.engine, "batch": be}
    be.close()


def _prompts(rt, lead: str = "") -> tuple[list[int], list[int]]:
    """(with the excerpt, without it): the grounded chat and the user's question alone."""
    grounded = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EXCERPTS}]
    plain = [{"role": "user", "content": QUESTION}]
    return (
        rt.prompt_tokens(rt.format_chat(grounded) + lead),
        rt.prompt_tokens(rt.format_chat(plain) + lead),
    )


async def _collect(engine, params: GenParams):
    text, lps, fin = [], [], None
    async for ev in engine.submit(params):
        if isinstance(ev, Delta):
            text.append(ev.text)
            lps.extend(ev.logprobs)
        else:
            fin = ev
    assert isinstance(fin, Finish)
    return "".join(text), lps, fin


def _run(engine, prompt, free=None, alpha=0.0, **kw):
    kw = {"max_tokens": 24, "temperature": 0.0, **kw}
    p = GenParams(prompt_tokens=prompt, cad_alpha=alpha, cad_prompt_tokens=free, **kw)
    return asyncio.run(_collect(engine, p))


def test_combine_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1000)).astype(np.float32)
    assert np.array_equal(combine(a, b, 0.0), a)  # bit for bit
    np.testing.assert_allclose(combine(a, b, 0.5), 1.5 * a - 0.5 * b, rtol=1e-6)


@pytest.mark.parametrize("name", ["single", "batch"])
def test_alpha_zero_is_plain_decoding(rt, engines, name):
    """The CAD path with alpha 0 (both sequences decoded, combined logits sampled) gives the
    plain greedy answer."""
    engine = engines[name]
    full, free = _prompts(rt)
    plain, plain_lp, plain_fin = _run(engine, full, logprobs=True)
    cad, cad_lp, cad_fin = _run(engine, full, free, 0.0, logprobs=True)
    assert plain and cad == plain
    assert cad_fin.completion_tokens == plain_fin.completion_tokens
    assert cad_fin.prompt_tokens == plain_fin.prompt_tokens == len(full)
    if name == "batch":  # same context, same chunking: the first logits are the same floats
        assert cad_lp[0].logprob == plain_lp[0].logprob


@pytest.mark.parametrize("name", ["single", "batch"])
def test_alpha_raises_the_excerpt_token(rt, engines, name):
    """A name found only in the excerpts (``zorblax_port``) gets more probability with alpha >
    0: logprobs come from the combined logits the engine samples from."""
    engine = engines[name]
    full, free = _prompts(rt, LEAD)
    target = rt.detokenize(rt.tokenize(" zorblax_port")[:1])  # " z"

    def p_target(alpha: float, free_prompt) -> float:
        _, lps, _ = _run(
            engine, full, free_prompt, alpha, max_tokens=1, logprobs=True, top_logprobs=20
        )
        top = dict((t, lp) for t, lp, _ in lps[0].top)
        assert target in top, (alpha, top)
        return float(np.exp(top[target]))

    p_plain = p_target(0.0, None)
    p0, p1, p2 = (p_target(a, free) for a in (0.0, 1.0, 2.0))
    assert p0 == pytest.approx(p_plain, abs=0.1)
    assert p0 < p1 < p2, (p0, p1, p2)
    assert p1 > p0 + 0.2, (p0, p1)


def test_grammar_and_two_slot_admission(rt, engines):
    """The sampler chain (here a grammar) applies to the combined logits in both engines; a
    CAD request takes two slots of a two-slot batch engine, so requests queue behind it in
    FIFO order and all finish."""
    full, free = _prompts(rt)
    grammar = grammar_for(None, 'root ::= "yes" | "no"')
    for engine in engines.values():
        text, _, fin = _run(engine, full, free, 1.0, grammar=grammar, max_tokens=4)
        assert text in ("yes", "no") and fin.reason == "stop", text

    async def together():
        be = engines["batch"]
        jobs = [
            GenParams(full, 12, temperature=0.0, cad_alpha=1.0, cad_prompt_tokens=free),
            GenParams(full, 12, temperature=0.0),
            GenParams(full, 12, temperature=0.7, seed=3, cad_alpha=0.5, cad_prompt_tokens=free),
        ]
        return await asyncio.gather(*(_collect(be, p) for p in jobs))

    results = asyncio.run(together())
    assert all(text and fin.reason in ("stop", "length") for text, _, fin in results), results
    assert engines["batch"].busy == 0


def test_a_batch_smaller_than_the_sequences_does_not_abort(rt):
    """``model.n_batch`` may be smaller than the sequences a context holds (1 for the single
    engine's CAD context, 2 for four batched sequences plus CAD's second ones): llama.cpp
    aborted the whole process then (GGML_ASSERT on n_outputs_max), and a step of one token
    per sequence overran the batch. Now the answers are the same as with a large batch."""
    ms = load_settings(model={"n_ctx": 512, "n_threads": 1, "n_parallel": 1, "n_batch": 1}).model
    small = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 16)
    full, free = _prompts(rt)
    try:
        want = _run(rt.engine, full, free, 0.5)[0]
        assert want and _run(small.engine, full, free, 0.5)[0] == want
    finally:
        small.close()
    be = BatchEngine(rt.llm, 16, n_seq=4, n_batch=2)

    async def together():
        jobs = [GenParams(full, 12, temperature=0.0) for _ in range(3)]
        jobs.append(GenParams(full, 12, temperature=0.0, cad_alpha=0.5, cad_prompt_tokens=free))
        return await asyncio.gather(*(_collect(be, p) for p in jobs))

    try:
        results = asyncio.run(together())
        assert all(text and fin.reason in ("stop", "length") for text, _, fin in results)
        assert len({text for text, _, _ in results[:3]}) == 1
    finally:
        be.close()


def test_one_slot_batch_engine_refuses_cad(rt):
    full, free = _prompts(rt)
    be = BatchEngine(rt.llm, 4, n_seq=1)
    try:
        with pytest.raises(ValueError, match="n_parallel >= 2"):
            _run(be, full, free, 1.0)
        assert _run(be, full, max_tokens=4)[0]  # the engine goes on serving
    finally:
        be.close()


def test_ticket_answer_uses_cad(rt):
    """The ticket path's generation with cad_alpha > 0 contrasts the grounded question with the
    bare one; at 0 it is the plain answer (the services leave plain requests untouched)."""
    grounded = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EXCERPTS}]
    bare = [{"role": "user", "content": QUESTION}]

    r = load_settings(retrieval={"stop": [], "loop_repeats": 0}).retrieval

    def answer(alpha: float, context_free=bare) -> str:
        return asyncio.run(_generate(rt, grounded, 24, r, context_free, alpha))[0]

    plain = answer(0.0, None)
    assert answer(0.0) == plain
    # the plain answer gives the port; with CAD the answer names the setting of the excerpt
    assert "zorblax" in answer(1.0) and "zorblax" not in plain, plain


# -- the HTTP field --------------------------------------------------------------------
@pytest.fixture(scope="module")
def cad_server(server_factory, tmp_path_factory, fixture_index):
    """Fixture docs plus a page with a made-up setting; two batched sequences; CAD on by
    default (retrieval.cad_alpha 0.5, contrasted with the template without excerpts) so ticket
    replies use it."""
    docs = tmp_path_factory.mktemp("cad-docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    (docs / "guide" / "admin.md").write_text(
        "# Admin console\n\nThe Zephyrd admin console listens on the port given by the "
        "`zorblax_port` setting (default 7311).\n"
    )
    return server_factory(
        {
            "model": {"n_ctx": 1024, "n_parallel": 2, "n_threads": 1},
            "retrieval": {
                "index_dir": str(fixture_index(docs, 120, 20)),  # built in this process
                "chunk_tokens": 120,
                "chunk_overlap": 20,
                "answer_reserve": 256,
                "cad_alpha": 0.5,
                "cad_context_free": "template",
            },
        },
        "cad",
    )


def _chat(server, **body) -> httpx.Response:
    body = {
        "model": "docqa",
        "temperature": 0,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": QUESTION}],
        **body,
    }
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_server_grounded_chat_with_cad_alpha(cad_server):
    answers = {}
    for alpha in (0.0, 0.5):
        r = _chat(cad_server, cad_alpha=alpha, logprobs=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"], (alpha, body["choices"])
        assert body["sources"], body  # grounded
        answers[alpha] = body["choices"][0]["logprobs"]["content"][0]
    # the field reaches the engine: the first token's distribution is not the plain one
    assert answers[0.0]["logprob"] != answers[0.5]["logprob"], answers


@pytest.mark.parametrize("bad", [-0.5, 5.5, "strong"])
def test_server_rejects_cad_alpha_out_of_range(cad_server, bad):
    r = _chat(cad_server, cad_alpha=bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "cad_alpha" and err["type"] == "invalid_request_error", err
    assert "cad_alpha" in err["message"]


def test_server_ticket_reply_with_cad(cad_server):
    r = httpx.post(
        cad_server.url + "/v1/tickets/reply",
        json={"id": 7, "subject": "Admin console", "body": QUESTION},
        timeout=120,
    )
    rec = r.json()
    assert r.status_code == 200 and rec["reply"] and rec["sources"], rec
