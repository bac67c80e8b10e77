"""The reader: evidence lines with offsets into the chunk text, and the clean-answer check."""

from __future__ import annotations

import pytest

from eval.metrics import has_facts, scaffolding
from retrieval.evidence import for_reader, select, terms, units
from server.generation import GenParams, TextStream, loop_cut

CHUNK = """## Load model

The `loadmodel` endpoint loads a local model into the server.

To check that the server is running:

```bash
curl http://localhost:3928/healthz
```

| Parameter | Type | Description |
|-----------|------|-------------|
| `ctx_len` | Integer | The context length for the model operations. |
| `ngl` | Integer | The number of GPU layers to use. |

- **port:** The port number where the server listens. Logs rotate daily.
"""


def _idf(w: str) -> float:
    return 1.0


def test_units_cover_sentences_rows_items_and_code_with_its_intro():
    us = units(CHUNK)
    kinds = [u.kind for u in us]
    assert "row" in kinds and "code" in kinds and "item" in kinds and "sentence" in kinds
    code = next(u for u in us if u.kind == "code")
    # the sentence introducing the code block reads with it
    assert CHUNK[code.start : code.end].startswith("To check that the server is running:")
    assert CHUNK[code.start : code.end].rstrip().endswith("```")
    rows = [u for u in us if u.kind == "row"]
    assert len(rows) == 2 and all("| Parameter |" in u.context for u in rows)  # header kept
    for u in us:  # offsets are exact and trimmed
        text = CHUNK[u.start : u.end]
        assert text == text.strip() and text


def test_evidence_points_at_the_answering_line():
    ev = select("Which parameter sets the context length?", [CHUNK, "Nothing relevant."], _idf)
    assert ev and "ctx_len" in ev[0].text and ev[0].chunk == 0
    assert CHUNK[ev[0].start : ev[0].end] == ev[0].text
    ev = select("How do I check that the server is running?", ["Unrelated text.", CHUNK], _idf)
    assert "/healthz" in ev[0].text and ev[0].chunk == 1
    assert select("?", [CHUNK], _idf) == []  # no content words: no evidence


def test_identifier_parts_match_question_words():
    assert {"llama", "log", "folder"} <= set(terms("`llama_log_folder`"))
    assert set(terms("model status")) <= set(terms("modelStatus"))  # same stems both sides


def test_scaffolding_check_flags_echoes_and_keeps_clean_answers():
    echoed = (
        "1. Load it:\n```bash\n# (features/load-unload.md > Load model)\n```\n"
        "Documentation excerpts: [1] (features/embed.md > Embedding)\nQuestion: what"
    )
    kinds = {k for k, _ in scaffolding(echoed)}
    assert {"excerpt header", "template title", "question template", "empty code block"} <= kinds
    assert scaffolding("[2] Load model\nThe port is 3928 [1].")[0][0] == "excerpt label line"
    clean = "Set `ctx_len` when loading the model [1]. Example:\n```bash\ncurl -d x\n```"
    assert scaffolding(clean) == []
    # a fact found only inside echoed scaffolding does not count
    assert not has_facts("(features/load-unload.md > Load model)", ["load-unload"])
    assert has_facts("Use `ctx_len` [1].", ["ctx_len"])


@pytest.mark.parametrize(
    ("text", "empty"),
    [
        ("- Run:\n\n    ```bash [1]\n```\n\nDone", ["    ```bash [1]\n```\n"]),
        ("It is:\n```\n# On MacOS:\n#   cmd: x\n```\nok", ["```\n# On MacOS:\n#   cmd: x\n```\n"]),
        # the closing fence of one block and the opening fence of the next are not a block
        ("```python\ndef f():\n    pass\n```\n\n```python\nprint(1)\n```", []),
        ("Use ```curl``` here.\n```bash\ncurl -d x\n```", []),
    ],
)
def test_empty_code_blocks_are_paired_in_order(text, empty):
    from retrieval.answers import code_blocks

    assert [text[a:b] for a, b in code_blocks(text)[0]] == empty
    assert [t for k, t in scaffolding(text) if k == "empty code block"] == empty


def _code_stream(pieces: list[str], drop: bool = True, stop=()) -> list[str]:
    ts = TextStream(GenParams([1], 64, drop_scaffolding=drop, stop=list(stop)))
    out = []
    for piece in pieces:
        d = ts.push(piece.encode(), None)
        out.append(d.text if d is not None else "")
        if ts.stop_hit:
            break
    d = ts.flush()
    out.append(d.text if d is not None else "")
    return out


def test_streamed_answers_leave_out_empty_code_blocks():
    """``retrieval.drop_scaffolding``: a block that closes (or the answer ends) with nothing in
    it but comments is never sent; a block with code is sent whole, held back only until its
    first line of code; the text around both is sent as generated."""
    pieces = ["Load", " it:", "\n\n", "```", "bash", " [1]", "\n", "```", "\n", "Then", " call"]
    # the model's own tokens, an indented block: its indentation streamed before the fence
    indented = [":**", "\n\n   ", " ```", "bash", " [", "1", "]", "\n", "```", "\n"]
    indented += ["\n", "-", " x"]
    assert "".join(_code_stream(indented)) == ":**\n\n   \n-" + " x"
    out = _code_stream(pieces)
    assert "".join(out) == "Load it:\n\nThen call"
    assert out[1] == " it:"  # text before a block is not delayed
    assert "".join(_code_stream(pieces, drop=False)) == "".join(pieces)  # off: as generated
    code = ["Run", ":\n", "```", "bash", "\n", "#", " start", "\n", "curl", " -d", " x", "\n"]
    code += ["```", "\n", "Done"]
    out = _code_stream(code)
    assert "".join(out) == "".join(code)
    at = code.index("curl")
    assert "".join(out[:at]) == "Run:\n"  # held while the block held only a comment
    assert "".join(out[: at + 2]).endswith("```bash\n# start\ncurl -d")  # then released
    # an answer ending (a stop string, or the last token) inside an empty block drops it
    assert (
        "".join(
            _code_stream(["A", ":", "\n```", "bash", "\n", "\nQuestion:"], stop=["\nQuestion:"])
        )
        == "A:\n"
    )
    assert "".join(_code_stream(["A", ":", "\n```", "bash", "\n", "#", " (x.md > y)"])) == "A:\n"


def test_streamed_answers_leave_out_a_first_line_echoing_the_question():
    """An answer that starts by echoing the prompt's question line ("Question: ...", the
    text of the stop string "\\nQuestion:") is sent without that line; an answer that only
    mentions a question is sent as generated."""
    stop = ["\nQuestion:", "Documentation excerpts:"]
    echo = ["Question", ":", " Which", " port", "?", "\n", "\n"]
    echo += ["The", " port", " is", " 3928", "."]
    out = _code_stream(echo, stop=stop)
    assert "".join(out) == "The port is 3928."
    assert "".join(_code_stream(echo, drop=False, stop=stop)) == "".join(echo)
    plain = ["Questions", " about", " ports", ":", " use", " 3928", "."]
    assert "".join(_code_stream(plain, stop=stop)) == "".join(plain)
    only = ["Question", ":", " Which", " port", "?"]  # one line in all: only the label goes
    assert "".join(_code_stream(only, stop=stop)) == "Which port?"
    # the echo, then the prompt again: the stop string ends the answer after the echo
    again = ["Question", ":", " Which", "?", "\nQuestion", ":", " x"]
    assert "".join(_code_stream(again, stop=stop)) == "Which?"


def test_scaffolding_guard_edge_cases():
    """A held block is not released by the start of a stop string; empty blocks repeated end
    the answer like any loop (``loop_repeats``); a client's stop string is no echo label; a
    one-line echo keeps what follows its label; the check strips a block that ends the
    answer without a line end."""
    from retrieval.answers import strip_scaffolding

    stop = ["\nQuestion:", "Documentation excerpts:"]
    out = _code_stream(["See [1].\n", "```bash [1]\n", "Documentation", " excerpts:\n"], stop=stop)
    assert "".join(out) == "See [1].\n"
    ts = TextStream(GenParams([1], 64, drop_scaffolding=True, loop_repeats=3))
    for _ in range(40):
        ts.push(b"```bash [1]\n```\n", None)
        if ts.stop_hit:
            break
    assert ts.stop_hit and ts.full.strip() == ""
    users = ["Users", " can", " set", " X", ".\n", "More", "."]
    assert "".join(_code_stream(users, stop=["\nUser"])) == "Users can set X.\nMore."
    one = ["Question", ":", " how", "?", " Run", " foo", " [1]."]
    assert "".join(_code_stream(one, stop=stop)) == "how? Run foo [1]."
    assert strip_scaffolding("Answer.\n```bash [1]\n```").strip() == "Answer."


def test_reader_evidence_is_never_empty():
    # no unit shares a word with the question: the first units of the best chunk stand in
    ev = for_reader("Quelle est la réponse ?", [CHUNK, "Other."], _idf, 2)
    assert len(ev) == 2 and all(e.chunk == 0 for e in ev)
    assert all(CHUNK[e.start : e.end] == e.text for e in ev)
    assert for_reader("Which parameter sets the context length?", [CHUNK], _idf, 0) == []


def test_evidence_layout_setting():
    from docqa.settings import EXCERPTS_TEMPLATE, load_settings

    assert not load_settings().retrieval.shows_excerpts  # the default: evidence lines alone
    assert load_settings(retrieval={"user_template": EXCERPTS_TEMPLATE}).retrieval.shows_excerpts
    with pytest.raises(ValueError, match="question"):
        load_settings(retrieval={"user_template": "Lines: {evidence}"})
    with pytest.raises(ValueError, match="context"):
        load_settings(retrieval={"user_template": "Q: {question}"})


@pytest.mark.parametrize(
    "text, kept",
    [
        ("The path is /v1/embeddings/v1/v1/v1", "The path is /v1/embeddings/v1"),
        ("Set `ngl` [1] [2] [3] [4]", "Set `ngl` [1]"),
        ("The answer is: The answer is: The answer is: ", "The answer is: "),
        ("Listen on 0.0.0.0", None),  # numbers and addresses are not loops
        ("A million is 1000000", None),
        ("|---|---|---|", None),  # a table rule has no letter
        ("Use `ctx_len` [1] [2]", None),
    ],
)
def test_loop_cut(text, kept):
    cut = loop_cut(text, 3)
    assert (text[:cut] if cut is not None else None) == kept


def _stream(pieces: list[str], repeats: int) -> tuple[str, bool]:
    ts = TextStream(GenParams([1], 64, loop_repeats=repeats))
    out = []
    for piece in pieces:
        d = ts.push(piece.encode(), None)
        if d is not None:
            out.append(d.text)
        if ts.stop_hit:
            break
    d = ts.flush()
    if d is not None:
        out.append(d.text)
    return "".join(out), ts.stop_hit


def test_loop_guard_cuts_a_streamed_loop_after_its_first_copy():
    pieces = ["The", " endpoint", " is", " `/v1/embeddings"] + ["/v1"] * 30
    text, stopped = _stream(pieces, 3)
    assert stopped and text == "The endpoint is `/v1/embeddings/v1"
    # off: the loop runs on; a clean answer is streamed whole either way
    assert _stream(pieces, 0)[0] == "".join(pieces)
    clean = ["Set", " `ctx_len`", " when", " loading", " the", " model", " [1]."]
    assert _stream(clean, 3) == ("".join(clean), False)


def test_loop_guard_does_not_delay_a_clean_answer():
    """The guard holds back only what a later loop could cut: a clean answer streams as it
    is generated (a few characters behind), not a fixed window behind."""
    ts = TextStream(GenParams([1], 64, loop_repeats=3))
    sent = ""
    for piece in ["Set", " `ctx_len`", " in", " the", " load", " model", " request", " to"]:
        d = ts.push(piece.encode(), None)
        sent += d.text if d is not None else ""
    assert len(sent) >= len(ts.full) - 3 and sent.startswith("Set `ctx_len` in the load")


def test_streamed_loop_guard_equals_the_whole_text_cut():
    """Random answers with loops of every period and citation runs: what is streamed equals
    the text cut as a whole (nothing sent that a later cut would have removed)."""
    for seed in range(500):
        _check_stream_against_whole(seed)


def _check_stream_against_whole(seed: int) -> None:
    import random

    rnd = random.Random(seed)
    words = ["The", " port", " is", " `3928`", " [1]", " [2]", " /v1", "ab", ".", " set", "\n"]
    pieces = [rnd.choice(words) for _ in range(rnd.randint(0, 12))]
    if rnd.random() < 0.8:
        unit = "".join(rnd.choice(words) for _ in range(rnd.randint(1, 3)))
        pieces += [unit] * rnd.randint(1, 6)
    pieces += [rnd.choice(words) for _ in range(rnd.randint(0, 4))]
    text, cut_at = "", None
    for piece in pieces:
        text += piece
        cut = loop_cut(text, 3)
        if cut is not None:
            cut_at = text[:cut].rstrip()
            break
    want = cut_at if cut_at is not None else "".join(pieces)
    # (a first copy's trailing whitespace may already be sent when the cut strips it)
    assert _stream(pieces, 3)[0].rstrip() == want.rstrip(), pieces


def test_worked_examples_come_before_the_question_in_the_template():
    """``retrieval.examples``: each worked example is an earlier user turn in the same
    template and the assistant's answer, after the system prompt and before the conversation;
    an answer copying the built-in example is echoed scaffolding."""
    from docqa.settings import BUILTIN_EXAMPLES, load_settings
    from retrieval.prompting import rag_messages

    r = load_settings(retrieval={"examples": BUILTIN_EXAMPLES}).retrieval
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    msgs = rag_messages(
        "SYS",
        r.user_template,
        "Which port?",
        [],
        history,
        evidence="- port 3928 [1]",
        examples=r.examples,
    )
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    ex = r.examples[0]
    assert msgs[1]["content"] == r.user_template.format(question=ex.question, evidence=ex.evidence)
    assert msgs[2]["content"] == ex.answer and msgs[3:5] == history
    assert msgs[-1]["content"].endswith("Which port?") and "3928" in msgs[-1]["content"]
    assert scaffolding(ex.answer) and not scaffolding("Nitro listens on port 3928 [1].")
    assert load_settings().retrieval.examples == []  # off by default (docs/benchmarks.md)
    with pytest.raises(ValueError):
        load_settings(retrieval={"examples": BUILTIN_EXAMPLES * 5})  # at most 4


# --- which excerpts an answer names as its sources (retrieval.sources) ---

_PAGES = [
    ("features/chat.md", "Chat", "Send messages to /v1/chat/completions with a model name."),
    ("features/multi-thread.md", "Threads", "Set `thread_num` in the config; the default is 1."),
    ("guide/install.md", "Install", "Download the release and run the installer script."),
]


def _grounding(policy):
    from retrieval.chunking import Chunk
    from retrieval.search import Hit
    from server.services.rag import Grounding

    hits = [Hit(Chunk(f"c{i}", p, h, t, 20), 1.0 - i / 10) for i, (p, h, t) in enumerate(_PAGES)]
    return Grounding(hits, None, 0.9, [], question="How many threads?", sources=policy)


def test_sources_cited_lists_the_tags_or_everything():
    g = _grounding("cited")
    srcs = g.finalize("Set `thread_num` [1].")["sources"]
    assert [(s["index"], s["cited"]) for s in srcs] == [(1, True)]
    srcs = g.finalize("Set `thread_num` in the config.")["sources"]
    assert [(s["index"], s["cited"]) for s in srcs] == [(1, False), (2, False), (3, False)]


def test_unsupported_flags_what_the_listed_sources_lack():
    g = _grounding("supported")
    out = g.finalize("Set `thread_num` [2]; `fast_threads` is faster.")
    assert out["unsupported"] == ["fast_threads"]
    # a name from an excerpt the answer does not list counts too: under `cited`, an answer
    # tagging excerpt 2 for what excerpt 1 says; `supported` lists excerpt 1 as well
    tagged = "Post to /v1/chat/completions [2]."
    assert _grounding("cited").finalize(tagged)["unsupported"] == ["v1/chat/completions"]
    assert g.finalize(tagged)["unsupported"] == []
    from server.services.rag import Grounding

    assert Grounding([], "not in the docs").finalize("`x_y`") == {"sources": [], "unsupported": []}


def test_sources_supported_adds_the_excerpt_holding_the_answer():
    g = _grounding("supported")
    # the model tagged the chat excerpt, but the thread setting is in excerpt 2
    srcs = g.finalize("Set `thread_num` in the config; the default is 1 [1].")["sources"]
    assert [(s["index"], s["cited"]) for s in srcs] == [(1, True), (2, False)]
    assert srcs[1]["path"] == "features/multi-thread.md"
    # a right tag stays alone
    srcs = g.finalize("Set `thread_num` in the config [2].")["sources"]
    assert [(s["index"], s["cited"]) for s in srcs] == [(2, True)]
    # no tag: all of them, as with `cited` (narrowing them to the excerpts holding the
    # answer's words lost the right page for 5 of 100 fact questions)
    srcs = g.finalize("Run the installer script after you download the release.")["sources"]
    assert [(s["index"], s["cited"]) for s in srcs] == [(1, False), (2, False), (3, False)]


def test_support_counts_the_answers_own_words_not_the_questions():
    from retrieval.answers import claims, words_held

    ans = "The default threads value is 1 [2]; see `thread_num`."
    words = claims(ans, "How many threads?")
    assert "thread_num" in words and "threads" not in words and "[2]" not in words
    assert words_held(ans, [t for _, _, t in _PAGES], "How many threads?") == [0, 2, 0]


def test_unsupported_names_what_no_source_holds():
    from retrieval.answers import unsupported_names

    texts = "\n".join(t for _, _, t in _PAGES)
    ans = "Set `thread_num` [2] or `fast_threads` in /etc/nitro.conf; the default is 1, max 64."
    assert unsupported_names(ans, texts) == ["fast_threads", "etc/nitro.conf", "64"]
    assert unsupported_names("Send it to /v1/chat/completions [1].", texts) == []
