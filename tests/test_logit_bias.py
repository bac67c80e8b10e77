"""Logit bias: OpenAI's ``logit_bias`` and the reader's ``evidence_bias`` (issue 16) in every
sampling path (single engine, batch engine, chunk KV path through the server), on the embedded
model's real logits, and their bad input on a real server."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest

from docqa.settings import load_settings
from models.store import ModelStore
from retrieval.evidence import Evidence
from server.batch_engine import BatchEngine
from server.generation import Delta, Finish, GenParams
from server.runtime import ModelRuntime
from server.services.generation import grammar_for
from server.services.generation import merge_bias as _merge_bias
from server.services.rag import Grounding, RagService

from .conftest import FIXTURES, SERVED

QUESTION = "Which setting sets the port of the Zephyrd admin console?"
LINE = "The Zephyrd admin console listens on the port given by the zorblax_port setting."


@pytest.fixture(scope="module")
def rt():
    ms = load_settings(model={"n_ctx": 512, "n_threads": 1, "n_parallel": 1}).model
    runtime = ModelRuntime(ModelStore(ms.store_dir).resolve(ms.model), ms, 16)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def engines(rt):
    be = BatchEngine(rt.llm, 16, n_seq=2)
    yield {"single": rt.engine, "batch": be}
    be.close()


async def _collect(engine, params: GenParams) -> list[int]:
    text, fin = [], None
    async for ev in engine.submit(params):
        if isinstance(ev, Delta):
            text.append(ev.text)
        else:
            fin = ev
    assert isinstance(fin, Finish)
    return "".join(text)


def _answer(rt, engine, bias=None, max_tokens=8) -> str:
    prompt = rt.prompt_tokens(rt.format_chat([{"role": "user", "content": QUESTION}]))
    p = GenParams(prompt_tokens=prompt, max_tokens=max_tokens, temperature=0.0, logit_bias=bias)
    return asyncio.run(_collect(engine, p))


@pytest.mark.parametrize("name", ["single", "batch"])
def test_logit_bias_bans_and_forces_tokens(rt, engines, name):
    """-100 bans the greedy answer's first token; +100 on a token makes it the first one; no
    bias is plain greedy decoding."""
    engine = engines[name]
    plain = _answer(rt, engine)
    assert plain and _answer(rt, engine, {}) == plain
    first = rt.tokenize(plain, add_bos=False)[0]
    banned = _answer(rt, engine, {first: -100})
    assert banned and rt.tokenize(banned, add_bos=False)[0] != first, (plain, banned)
    forced_tok = rt.tokenize(" zorblax", add_bos=False)[0]
    forced = _answer(rt, engine, {forced_tok: 100}, max_tokens=1)
    assert forced == rt.detokenize([forced_tok]), forced


@pytest.mark.parametrize("name", ["single", "batch"])
def test_a_grammar_still_wins_over_a_ban(rt, engines, name):
    """Banning the only token a grammar allows leaves it the only choice (the ban is a finite
    -100): the engine answers, it does not abort in llama.cpp's grammar."""
    a = rt.tokenize("a", add_bos=False)
    assert len(a) == 1
    prompt = rt.prompt_tokens(rt.format_chat([{"role": "user", "content": "Say a."}]))
    for temperature in (0.0, 0.8):
        p = GenParams(
            prompt_tokens=prompt,
            max_tokens=2,
            temperature=temperature,
            grammar=grammar_for(None, 'root ::= "a"'),
            logit_bias={a[0]: -100},
        )
        assert asyncio.run(_collect(engines[name], p)) == "a"


@pytest.mark.parametrize("name", ["single", "batch"])
def test_engines_leave_out_empty_code_blocks(rt, engines, name):
    """``drop_scaffolding`` (grounded answers, ``retrieval.drop_scaffolding``) in both engines,
    on the real model's generation (a grammar makes it write an empty block and a real one):
    the empty block is left out of the text, streamed or whole; the real one is kept."""
    text = "Load it:\\n```bash [1]\\n```\\nThen run:\\n```bash\\ncurl -d x\\n```"
    prompt = rt.prompt_tokens(rt.format_chat([{"role": "user", "content": "How to load?"}]))
    out = {}
    for drop in (False, True):
        p = GenParams(
            prompt_tokens=prompt,
            max_tokens=64,
            temperature=0.0,
            grammar=grammar_for(None, f'root ::= "{text}"'),
            drop_scaffolding=drop,
        )
        out[drop] = asyncio.run(_collect(engines[name], p))
    assert out[False] == "Load it:\n```bash [1]\n```\nThen run:\n```bash\ncurl -d x\n```"
    assert out[True] == "Load it:\nThen run:\n```bash\ncurl -d x\n```"


def test_merged_biases_stay_in_range_and_keep_bans():
    """The request's bias and the evidence bias add up within [-100, 100]; a ban from either
    stays a ban."""
    merged = _merge_bias({1: -100, 2: 99, 3: 1}, {1: 4, 2: 4, 3: 4, 4: 2, 5: -100})
    assert merged == {1: -100, 2: 100, 3: 5, 4: 2, 5: -100}
    assert _merge_bias(None, {7: 1.0}) == {7: 1.0} and _merge_bias({7: 1.0}, None) == {7: 1.0}


def test_evidence_bias_targets_the_lines_own_tokens(rt):
    """The biased tokens are the evidence line's tokens that the prompt without the line does
    not hold: the made-up setting's pieces, not the question's words, nor the scaffolding."""
    r = load_settings(retrieval={"evidence_bias": 2.0}).retrieval
    rag = RagService(r, index=None)  # build_messages needs no index when given no hits
    g = Grounding([], None, 1.0, [Evidence(0, 0, len(LINE), LINE, 1.0, "sentence")])
    messages = [{"role": "user", "content": QUESTION}]
    bias = rag.evidence_bias(rt, g, messages)
    assert bias and set(bias.values()) == {2.0}
    bare = set(rt.prompt_tokens(rt.format_chat(rag.build_messages(rt, messages, [], [])[0])))
    assert not bare & set(bias)
    assert rt.tokenize(" zorblax", add_bos=False)[0] in bias
    assert rt.tokenize(" Zephyr", add_bos=False)[0] not in bias  # the question has it
    assert rag.evidence_bias(rt, g, messages, 0.0) is None  # a request turns it off
    assert rag.evidence_bias(rt, Grounding([], None), messages) is None  # no evidence


def test_a_worked_examples_names_are_barred_unless_the_evidence_holds_them(rt, engines):
    """``retrieval.examples[].names``: the example's made-up names and values are banned from
    a real answer (the 135M model copies a worked example otherwise), except those the real
    evidence or question holds; the example's form stays free."""
    from docqa.settings import BUILTIN_EXAMPLES

    r = load_settings(retrieval={"examples": BUILTIN_EXAMPLES}).retrieval
    rag = RagService(r, index=None)
    g = Grounding([], None, 1.0, [Evidence(0, 0, len(LINE), LINE, 1.0, "sentence")])
    messages = [{"role": "user", "content": QUESTION}]
    bias = rag.example_bias(rt, g, messages)
    assert bias and set(bias.values()) == {-100.0}
    banned_text = {rt.detokenize([t]).strip().lower() for t in bias}
    assert {"4", "8"} <= banned_text and any("orbit" in t for t in banned_text)
    assert "the" not in banned_text and "option" not in banned_text
    # a line that holds a value of the example keeps it free
    line = "The default port is 8080 and it uses 4 workers."
    g4 = Grounding([], None, 1.0, [Evidence(0, 0, len(line), line, 1.0, "sentence")])
    four = rt.tokenize("4", add_bos=False, special=False)[0]
    assert four in bias and four not in (rag.example_bias(rt, g4, messages) or {})
    assert rag.example_bias(rt, Grounding([], None), messages) is None  # no evidence
    no_examples = RagService(load_settings().retrieval, index=None)
    assert no_examples.example_bias(rt, g, messages) is None
    # on the real model, the banned tokens never come out
    prompt = rt.prompt_tokens(rt.format_chat([{"role": "user", "content": "What is 2 + 2?"}]))
    free = GenParams(prompt_tokens=prompt, max_tokens=12, temperature=0.0)
    assert "4" in asyncio.run(_collect(engines["batch"], free))
    p = GenParams(prompt_tokens=prompt, max_tokens=12, temperature=0.0, logit_bias=bias)
    out = asyncio.run(_collect(engines["batch"], p))
    assert "4" not in out and "8" not in out, out


# -- the HTTP fields ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bias_server(server_factory, tmp_path_factory, fixture_index):
    """Fixture docs plus a page with a made-up setting; chunk KV caches on, so grounded
    answers take the stitched path."""
    docs = tmp_path_factory.mktemp("bias-docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    (docs / "guide" / "admin.md").write_text(f"# Admin console\n\n{LINE}\n")
    return server_factory(
        {
            "model": {"n_ctx": 1024, "n_threads": 1},
            "retrieval": {
                "index_dir": str(fixture_index(docs, 120, 20)),
                "chunk_tokens": 120,
                "chunk_overlap": 20,
                "answer_reserve": 256,
                "kv_cache": True,
            },
        },
        "bias",
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


def test_server_logit_bias_forces_a_token(bias_server, rt):
    r = _chat(bias_server, model=SERVED, max_tokens=1)
    assert r.status_code == 200, r.text
    plain = r.json()["choices"][0]["message"]["content"]
    tok = rt.tokenize(" zorblax", add_bos=False)[0]  # the same GGUF's vocabulary
    r = _chat(bias_server, model=SERVED, max_tokens=1, logit_bias={tok: 100})
    assert r.status_code == 200, r.text
    forced = r.json()["choices"][0]["message"]["content"]
    assert forced.strip() == rt.detokenize([tok]).strip(), forced
    assert forced != plain


def test_server_evidence_bias_changes_the_grounded_answer(bias_server):
    """On the stitched (chunk KV) path: a strong evidence bias makes the answer name the
    line's made-up setting."""
    answers = {}
    for b in (0.0, 4.0):
        r = _chat(bias_server, evidence_bias=b)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sources"], body
        answers[b] = body["choices"][0]["message"]["content"]
    assert "zorblax" in answers[4.0], answers
    assert answers[0.0] != answers[4.0], answers


@pytest.mark.parametrize(
    "field,bad",
    [
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"²": 1}),  # a digit to str.isdigit, not a token id
        ("logit_bias", {"５": 1}),
        ("logit_bias", {" 5": 1}),
        ("logit_bias", {"5": 1, "05": -100}),  # one token twice
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"99999999": 1}),
        ("logit_bias", "strong"),
        ("evidence_bias", -1),
        ("evidence_bias", 11),
    ],
)
def test_server_rejects_bad_bias(bias_server, field, bad):
    r = _chat(bias_server, **{field: bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
