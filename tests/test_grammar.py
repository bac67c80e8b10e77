"""Grammars and JSON schemas are checked in-process before llama.cpp sees them (issue 17).

Unit level: known crashers are refused with a message; a fuzzer (hypothesis) feeds random and
malformed grammars and schemas to the checker, which only ever accepts or raises
``GrammarError``, and everything it accepts llama.cpp's own parser accepts too. Real server: a
batch of malformed grammars and schemas gets 400s naming the field, and the server stays up.
"""

from __future__ import annotations

import json

import httpx
import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import JSON_GBNF, LIST_GBNF

from server.grammar import GrammarError, GrammarLimits, check_gbnf, json_schema_grammar

# Each of these crashed or hung llama.cpp (probed one per subprocess): NULL sampler (segfault
# when used), an abort on the first token, or an endless loop.
CRASHERS = [
    "root ::= foo",  # undefined rule
    "root ::= (",  # syntax
    'x ::= "a"',  # no root
    "",  # no root
    'root ::= \nspace ::= " "?',  # what {"enum": []} converts to
    'root ::= root "a"',  # left recursion
    'root ::= ("")*',  # left recursion through an empty repetition
    'root ::= b "x"\nb ::= c?\nc ::= root',  # left recursion through a nullable rule
    "root ::= [^\\x00-\\U0010FFFF]",  # class matching nothing: abort
    "root ::= [z-a]",  # reversed range: abort
    'root ::= "\\x00"',  # NUL: abort
    'root ::= "a"{3,1}',  # min > max: endless loop
    'root ::= "a"{99999999}',
    'root ::= "\\q"',
    "root ::= *",
    "root ::= <[1000]>",
    'root ::= "a" # \x00 llama.cpp reads up to the NUL',
    "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000,  # stack overflow
]
GOOD = [
    JSON_GBNF,
    LIST_GBNF,
    'root ::= "yes" | "no"',
    'root ::= ("a" | "b")+ "."? # comment',
    "root ::= item{2,4}\nitem ::= [a-z] [0-9]*\n",
    'root ::= "a" |',
    'root ::= "🙂" [^\\x01-\\uD7FF]',
]


@pytest.fixture(scope="module")
def vocab():
    from models.store import ModelStore

    path = ModelStore("/nonexistent").resolve("smollm2-135m-instruct").path
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield llm._model.vocab  # noqa: SLF001
    llm.close()


def llama_accepts(vocab, text: str) -> bool:
    s = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not s:
        return False
    llama_cpp.llama_sampler_free(s)
    return True


@pytest.mark.parametrize("text", CRASHERS)
def test_crashers_are_refused(text):
    with pytest.raises(GrammarError):
        check_gbnf(text)


@pytest.mark.parametrize("text", GOOD)
def test_good_grammars_pass_and_llama_agrees(text, vocab):
    check_gbnf(text)
    assert llama_accepts(vocab, text)


def test_messages_and_limits():
    with pytest.raises(GrammarError, match="undefined rule 'foo' at line 1, column 10"):
        check_gbnf("root ::= foo")
    with pytest.raises(GrammarError, match="left recursion: root -> b -> c -> root"):
        check_gbnf('root ::= b "x"\nb ::= c?\nc ::= root')
    with pytest.raises(GrammarError, match="longer than 64 bytes"):
        check_gbnf('root ::= "' + "a" * 80 + '"', GrammarLimits.default().but(max_bytes=64))
    with pytest.raises(GrammarError, match="more than 3 rules"):
        check_gbnf(
            'root ::= a\na ::= b\nb ::= c\nc ::= "x"', GrammarLimits.default().but(max_rules=3)
        )
    with pytest.raises(GrammarError, match="more than 100 symbols"):
        check_gbnf('root ::= "ab"{60}', GrammarLimits.default().but(max_symbols=100))
    deep = "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000  # segfaulted llama.cpp
    with pytest.raises(GrammarError, match="nested more than 1000 deep"):
        check_gbnf(deep, GrammarLimits.default().but(max_bytes=100_000))


def test_json_schemas():
    assert "root ::=" in json_schema_grammar({"type": "object", "properties": {"a": {}}})
    for bad, what in (
        ({"enum": []}, "matches no value"),
        ({"anyOf": []}, "matches no value"),
        ({"type": "array", "items": {"enum": []}}, "matches no value"),
        ({"not": {}}, "unsupported JSON schema"),
        ({"oneOf": []}, "unsupported JSON schema"),
        ({"type": "string", "maxLength": 100000}, "longer than"),
        ({"$ref": "#/$defs/a"}, "unsupported JSON schema"),
    ):
        with pytest.raises(GrammarError, match=what):
            json_schema_grammar(bad)


# -- fuzzing ----------------------------------------------------------------------------
_PIECES = [
    "root",
    " ::= ",
    "::=",
    "a",
    "b",
    "x-1",
    '"',
    '"a"',
    '""',
    "[",
    "]",
    "[a-z]",
    "[^a]",
    "[z-a]",
    "(",
    ")",
    "|",
    "*",
    "+",
    "?",
    "{",
    "}",
    "{2}",
    "{0,3}",
    "{3,1}",
    ",",
    ".",
    "\\",
    "\\x00",
    "\\x41",
    "\\u00e9",
    "\\uD800",
    "\\n",
    "\\q",
    "#c",
    " ",
    "\n",
    "\t",
    "\r\n",
    "<",
    "é",
    "🙂",
    "\x00",
]
_grammars = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=30).map("".join),
    st.lists(st.sampled_from(_PIECES), max_size=20).map(lambda p: "root ::= " + "".join(p)),
    st.text(max_size=60),
)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(text=_grammars)
def test_fuzz_checker_never_crashes_and_never_lets_a_bad_grammar_through(text, vocab):
    try:
        check_gbnf(text)
    except GrammarError:
        return
    # accepted: llama.cpp's own parser must accept it too (else the engine gets a NULL sampler)
    assert "\x00" not in text
    assert llama_accepts(vocab, text), text


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_keywords = st.sampled_from(
    [
        "type",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "items",
        "properties",
        "required",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "$ref",
        "not",
        "format",
    ]
)
_types = st.sampled_from(["string", "integer", "number", "boolean", "object", "array", "null", "x"])
_schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": _types, "enum": st.lists(_json, max_size=3)}),
    lambda inner: st.dictionaries(
        _keywords, inner | _json | st.lists(inner, max_size=3), max_size=4
    ),
    max_leaves=10,
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(schema=_schemas)
def test_fuzz_schemas_convert_to_grammars_llama_accepts(schema, vocab):
    try:
        gbnf = json_schema_grammar(schema)
    except GrammarError:
        return
    assert llama_accepts(vocab, gbnf), (json.dumps(schema), gbnf)


# -- the real server ----------------------------------------------------------------------
def test_real_server_refuses_malformed_grammars_and_stays_up(server, model_id):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Say yes or no."}]
    with httpx.Client(timeout=120) as c:
        for g in CRASHERS[:-3] + ['root ::= "a"\nroot ::= "b"', "root ::= " + '"a"{2000}' * 20]:
            if not g:
                continue  # "" means no grammar, as before
            r = c.post(
                url, json={"model": model_id, "messages": msgs, "grammar": g, "max_tokens": 4}
            )
            assert r.status_code == 400, (g, r.text)
            err = r.json()["error"]
            assert err["param"] == "grammar" and err["code"] == "invalid_grammar", err
        for schema in (
            {"enum": []},
            {"anyOf": []},
            {"type": "array", "items": {"enum": []}},
            {"not": {}},
            {"type": "string", "maxLength": 100000},
        ):
            for rf in (
                {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                {"type": "json_object", "schema": schema},
            ):
                r = c.post(
                    url,
                    json={
                        "model": model_id,
                        "messages": msgs,
                        "response_format": rf,
                        "max_tokens": 4,
                    },
                )
                assert r.status_code == 400, (schema, r.text)
                assert r.json()["error"]["param"] == "response_format", r.text
        r = c.post(
            server.url + "/v1/completions",
            json={
                "model": model_id,
                "prompt": "Q: yes?\nA:",
                "grammar": "root ::= foo",
                "max_tokens": 3,
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
        assert server.proc.poll() is None, server.log_tail()
        # a good grammar still constrains the answer
        r = c.post(
            url,
            json={
                "model": model_id,
                "messages": msgs,
                "grammar": 'root ::= "yes" | "no"',
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")
