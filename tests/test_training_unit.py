"""Training unit tests: recipes load, held-out split never leaks, synth parsing, gate logic."""

from __future__ import annotations

import json

import pytest

from docqa.data import is_heldout
from training.config import RECIPES, load_recipe
from training.gate import decide
from training.synth import BadReply, dedupe, parse_pairs

from .conftest import SHARED


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads(path):
    r = load_recipe(path)
    assert r.steps and r.name == path.stem
    if r.merge.mergekit:
        from mergekit.config import MergeConfiguration

        MergeConfiguration.model_validate(r.merge.mergekit)


def test_published_recipe_matches_the_case():
    r = load_recipe("stealth-mistral-7b")
    assert (r.sft.lora.r, r.sft.lora.alpha) == (256, 512)
    assert (r.synth.chunk_tokens, r.synth.chunk_overlap) == (300, 30)
    assert r.merge.mergekit["merge_method"] == "slerp"


def test_unknown_recipe_keys_fail(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nsteps: [base]\nsft: {lora: {rank: 8}}\n")
    with pytest.raises(ValueError):
        load_recipe(p)


@pytest.mark.skipif(not (SHARED / "nitro-qa").is_dir(), reason="../shared data not present")
def test_training_data_never_contains_heldout():
    from training.data import sft_examples, train_pairs

    pairs = train_pairs(limit=None)
    assert pairs and not any(is_heldout(p.question) for p in pairs)
    ex = sft_examples(pairs[:5], rag=False)
    assert all(e["prompt"][-1]["content"] == p.question for e, p in zip(ex, pairs[:5]))
    for e in ex:  # never multiple-choice formatted
        assert "A. " not in e["prompt"][-1]["content"]


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "I cannot help with that.",
        "```json\n{not json}\n```",
        '{"pairs": "nope"}',
        '{"pairs": [{"question": "", "answer": "x"}]}',
        "[1, 2, 3]",
    ],
)
def test_synth_rejects_malformed_replies(reply):
    with pytest.raises(BadReply):
        parse_pairs(reply)


def test_synth_parses_fenced_and_chatty_replies():
    reply = (
        'Sure! Here you go:\n```json\n{"pairs": [{"question": "Which port does it use?", '
        '"answer": "3928"}, {"question": "bad"}, "junk"]}\n```\nHope this helps.'
    )
    assert parse_pairs(reply) == [{"question": "Which port does it use?", "answer": "3928"}]
    bare = json.dumps([{"question": "What is ngl for?", "answer": "GPU layers."}])
    assert parse_pairs(bare)[0]["answer"] == "GPU layers."
    d = dedupe(
        [{"question": "What is ngl?", "answer": "a"}, {"question": "what is NGL", "answer": "b"}]
    )
    assert len(d) == 1


def test_gate_decision():
    pub = {"facts_accuracy": 0.30, "qa_f1": 0.20, "mcq_accuracy": 0.25}
    better = {"facts_accuracy": 0.40, "qa_f1": 0.21, "mcq_accuracy": 0.24}
    assert decide(better, pub, 0.02)["passed"]
    worse = {"facts_accuracy": 0.40, "qa_f1": 0.10, "mcq_accuracy": 0.30}
    d = decide(worse, pub, 0.02)
    assert not d["passed"] and not d["metrics"]["qa_f1"]["ok"]
    assert decide(worse, pub, 0.2)["passed"]


def test_identifiers_are_the_exact_names_the_chunk_holds():
    from training.data import identifiers

    chunk = 'Load with `ctx_len` and "ngl": 32 at http://localhost:3928/v1/embeddings, set baseURL.'
    ref = (
        "Set 'ctx_len' and `ngl` (32 layers) on the GPU via the API; the URL is "
        "http://localhost:3928/v1/embeddings. Also set baseURL and max_tokens."
    )
    got = identifiers(ref, chunk)
    assert got == ["ctx_len", "ngl", "32", "http://localhost:3928/v1/embeddings", "baseURL"]
    # acronyms, prose words and names the chunk lacks (max_tokens) are not identifiers
    assert "API" not in got and "GPU" not in got and "max_tokens" not in got


def test_grounded_answer_is_one_sentence_quoting_the_identifier():
    from training.data import grounded_answer

    chunk = "Nitro listens on port 3928 by default. Use `--port` to change it."
    ref = "Nitro is a fast server. By default, Nitro listens on port 3928. It can be changed."
    assert grounded_answer(chunk, ref) == "By default, Nitro listens on port `3928`."
    assert grounded_answer(chunk, "It is fast and small.") is None  # nothing to quote


@pytest.mark.skipif(not (SHARED / "nitro-qa").is_dir(), reason="../shared data not present")
def test_grounded_rag_examples_quote_their_cited_excerpt():
    import random
    import re

    from training.data import sft_examples, train_pairs

    pairs = train_pairs()
    random.Random(1).shuffle(pairs)
    ex = sft_examples(pairs[:40], rag=True, k=3, p_missing=0.0, target="grounded", limit=8)
    assert len(ex) == 8
    for e in ex:
        user = e["prompt"][-1]["content"]
        answer = e["completion"][0]["content"]
        cited = re.search(r"\[(\d)\]$", answer)
        assert cited and e["gold_in_context"], answer
        n = int(cited.group(1))
        context = user.split("\nQuestion:")[0]
        starts = [m.start() for m in re.finditer(r"(?m)^\[\d\] \(", context)] + [len(context)]
        excerpt = context[starts[n - 1] : starts[n]]
        assert excerpt.startswith(f"[{n}] (")
        quoted = re.findall(r"`([^`]+)`", answer)
        assert quoted and all(q in excerpt for q in quoted), (answer, excerpt[:200])
