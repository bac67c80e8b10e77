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
    # nor a held-out question in other punctuation, quotes or articles (before: 14 twins)
    from docqa.data import DEFAULT_QA, load_qa, question_key, split_qa

    _, held = split_qa(load_qa(DEFAULT_QA))
    assert not {question_key(p.question) for p in held} & {question_key(p.question) for p in pairs}
    assert question_key("What is the role of the '-H' flag?") == question_key(
        "What is role of -H flag"
    )
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


def test_gate_requires_a_significant_facts_gain_when_asked():
    base = [True] * 10 + [False] * 24
    pub = {"facts_accuracy": 10 / 34, "facts_correct": base}
    # 8 questions only the candidate answers, none lost: McNemar p = 2 * 0.5**8 < 0.05
    won = [True] * 18 + [False] * 16
    d = decide({"facts_accuracy": 18 / 34, "facts_correct": won}, pub, 0.02, 0.15)
    assert d["passed"] and d["beats"] and d["facts_paired"]["only_a"] == 8
    assert d["facts_paired"]["p"] < 0.05 and "beats" in d["verdict"]
    # 6 wins and 1 loss (+0.147) misses the gain and the test: the published model is kept
    mixed = [True] * 9 + [False] + [True] * 6 + [False] * 18
    d = decide({"facts_accuracy": 15 / 34, "facts_correct": mixed}, pub, 0.02, 0.15)
    assert not d["passed"] and not d["beats"] and "kept" in d["verdict"]
    assert d["facts_paired"]["only_a"] == 6 and d["facts_paired"]["only_b"] == 1
    # without min_gain, no worse than the margin is enough
    assert decide({"facts_accuracy": 15 / 34, "facts_correct": mixed}, pub, 0.02)["passed"]


def test_gate_serves_the_candidate_with_its_settings(monkeypatch):
    """``gate.candidate_settings`` reach the candidate's server (smollm2-kv: unit KV caches
    on) and not the published model's, which is served with the defaults."""
    from training import gate
    from training.config import GateStep

    calls = []

    def fake_evaluate_model(model, *, rag, index, cfg, progress=True, settings=None):
        calls.append((model, settings))
        return {"facts_accuracy": 0.3, "qa_f1": 0.2}

    monkeypatch.setattr(gate, "evaluate_model", fake_evaluate_model)
    cfg = GateStep(candidate_settings={"retrieval": {"kv_cache": True}}, mcq_limit=0)
    out = gate.compare("cand.gguf", cfg)
    assert calls == [
        ("cand.gguf", {"retrieval": {"kv_cache": True}}),
        ("smollm2-135m-instruct-f16", None),  # the served default (found by a review:
    ]  # it was the code's default whatever the settings served)
    assert out["passed"] and cfg.against is None
    calls.clear()
    monkeypatch.setenv("DOCQA_MODEL__MODEL", "docqa-smollm2-nitro")
    gate.compare("cand.gguf", cfg)
    assert calls[1] == ("docqa-smollm2-nitro", None)
    recipe = load_recipe("smollm2-kv")
    assert recipe.gate.candidate_settings == {"retrieval": {"kv_cache": True}}
    assert recipe.sft.objective == "distill" and recipe.sft.block_attention
    assert recipe.sft.own_answers == "greedy" and recipe.samples.candidates == 1


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


def test_closed_book_sft_can_keep_only_the_pairs_naming_an_identifier():
    from docqa.data import QAPair
    from training.config import SFTStep
    from training.data import sft_examples

    pairs = [
        QAPair("Which port?", "Nitro listens on port 3928."),
        QAPair("Is Nitro fast?", "Yes, it is fast and small."),
        QAPair("How do I set the context?", "Pass `ctx_len` when loading the model."),
    ]
    every = sft_examples(pairs, rag=False)
    named = sft_examples(pairs, rag=False, require_identifiers=True)
    assert len(every) == 3
    assert [e["prompt"][0]["content"] for e in named] == [
        "Which port?",
        "How do I set the context?",
    ]
    assert named[1]["completion"][0]["content"] == "Pass `ctx_len` when loading the model."
    with pytest.raises(ValueError, match="closed-book"):
        SFTStep(rag=True, require_identifiers=True)


def test_closed_book_sft_can_recite_every_chunk_of_the_index(fixture_index):
    from docqa.data import QAPair
    from retrieval.index import load_index
    from training.config import SFTStep
    from training.data import sft_examples

    index = fixture_index()
    chunks = load_index(index).chunks
    pairs = [QAPair("Which port?", "Nitro listens on port 3928.")]
    out = sft_examples(pairs, rag=False, index_dir=index, recite_docs=2)
    assert len(out) == 1 + 2 * len(chunks)
    recited = [e for e in out if e["prompt"][0]["content"] != "Which port?"]
    c = chunks[0]
    mine = [e for e in recited if e["completion"][0]["content"] == c.text.strip()]
    assert len(mine) == 2 and c.path in mine[0]["prompt"][0]["content"]
    assert sft_examples(pairs, rag=False, index_dir=index) == [
        {
            "prompt": [{"role": "user", "content": "Which port?"}],
            "completion": [{"role": "assistant", "content": "Nitro listens on port 3928."}],
        }
    ]
    only = sft_examples(pairs, rag=False, index_dir=index, recite_docs=1, qa_pairs=False)
    assert len(only) == len(chunks) and "Which port?" not in str(only)
    with pytest.raises(ValueError, match="closed-book"):
        SFTStep(rag=True, recite_docs=1)
    with pytest.raises(ValueError, match="nothing to train"):
        SFTStep(rag=False, qa_pairs=False)


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
        # the evidence layout: the prompt's lines, each tagged [k] with its excerpt's number
        assert user.startswith("Documentation excerpts:\n") and "\n\nQuestion: " in user
        block = user[len("Documentation excerpts:\n") : user.rindex("\n\nQuestion: ")]
        lines = re.findall(r"(.*?) \[(\d)\](?:\n|$)", block, re.S)
        tagged = " ".join(text for text, k in lines if int(k) == n)
        quoted = re.findall(r"`([^`]+)`", answer)
        # the answer names what the lines of the excerpt it cites show
        assert tagged and quoted and all(q in tagged for q in quoted), (answer, block[:300])


# --- the step registry and recipe plans (no model is loaded by any of these) ---------------


def _write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_registry_matches_the_recipe_sections():
    from training.config import STEPS, Recipe
    from training.registry import steps

    reg = steps()
    assert set(reg) == set(STEPS)
    for name, step in reg.items():
        assert Recipe.model_fields[name].annotation is step.config, name
        assert step.produces and step.help, name


def test_step_without_a_provider_fails_at_load_naming_step_and_need(tmp_path):
    from training.registry import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, "name: bad\nsteps: [sft]\n"))
    msg = str(e.value)
    assert "step 'sft' needs 'model'" in msg
    assert "available before 'sft': nothing" in msg and "base" in msg  # who could make it
    # an earlier step that makes something else does not help; the message lists it
    with pytest.raises(RecipeError, match=r"step 'export' needs 'model'.*pairs \(from synth\)"):
        load_recipe(_write(tmp_path, "name: bad\nsteps: [synth, export]\n"))
    # a provider after the step is no provider
    with pytest.raises(RecipeError, match="step 'gate' needs 'gguf'"):
        load_recipe(_write(tmp_path, "name: bad\nsteps: [base, gate, export]\n"))
    with pytest.raises(RecipeError, match="'base' is listed twice"):
        load_recipe(_write(tmp_path, "name: bad\nsteps: [base, sft, base]\n"))


def test_merge_needs_a_model_unless_mergekit_names_them(tmp_path):
    from training.registry import RecipeError, plan

    with pytest.raises(RecipeError, match="step 'merge' needs 'model'"):
        load_recipe(_write(tmp_path, "name: m\nsteps: [merge, sft]\n"))
    mk = "{merge_method: slerp, base_model: /a, slices: [], parameters: {t: 0.5}}"
    r = load_recipe(_write(tmp_path, f"name: m\nsteps: [merge, sft]\nmerge: {{mergekit: {mk}}}\n"))
    merge, sft = plan(r)
    assert merge.needs == () and merge.sources == {}
    assert sft.sources == {"model": "merge"}
    # without mergekit, an earlier model and the synth pairs feed the merge
    merge = plan(load_recipe(_write(tmp_path, "name: m\nsteps: [synth, base, merge]\n")))[2]
    assert merge.sources == {"model": "base", "pairs": "synth"}


def test_stealth_plan_merge_makes_the_model_dpo_and_sft_train():
    from training.registry import plan

    p = {s.name: s for s in plan(load_recipe("stealth-mistral-7b"))}
    assert list(p) == ["merge", "dpo", "synth", "sft", "export", "gate", "publish"]
    assert p["merge"].needs == () and p["merge"].produces == ("model",)
    assert p["dpo"].sources == {"model": "merge"}  # given preference pairs: no Q&A pairs
    assert p["sft"].sources == {"model": "dpo", "pairs": "synth"}  # the chain from merge
    assert p["export"].sources == {"model": "sft"}
    assert p["gate"].sources == {"gguf": "export"}
    assert p["publish"].sources == {"gguf": "export", "gate": "gate"}


def test_optional_needs_fall_back_and_given_inputs_provide(tmp_path):
    from training.registry import GIVEN, RecipeError, plan

    # sft without synth: the pairs need is optional (the CSV is used), the model is not
    r = load_recipe("smollm2-nitro")
    sft = next(s for s in plan(r) if s.name == "sft")
    assert sft.sources == {"model": "base", "pairs": "synth"}
    r = load_recipe(_write(tmp_path, "name: g\nsteps: [base, sft]\n"))
    assert plan(r)[1].sources == {"model": "base"}
    r = load_recipe(_write(tmp_path, f"name: g\nsteps: [sft]\ninputs: {{model: {tmp_path}}}\n"))
    assert plan(r)[0].sources == {"model": GIVEN}
    with pytest.raises(RecipeError, match="unknown input kind"):
        load_recipe(_write(tmp_path, "name: g\nsteps: [base]\ninputs: {weights: /x}\n"))


def test_a_missing_input_stops_the_step_before_it_loads_anything(tmp_path):
    from training.rebuild import run_step

    with pytest.raises(
        FileNotFoundError, match="'sft' needs 'model' from step 'dpo'.*run 'dpo' first"
    ):
        run_step(load_recipe("smoke"), "sft", tmp_path / "run")
    missing = tmp_path / "no-such-model"
    r = load_recipe(_write(tmp_path, f"name: g\nsteps: [export]\ninputs: {{model: {missing}}}\n"))
    with pytest.raises(FileNotFoundError, match="'export' needs 'model' from a given input"):
        run_step(r, "export", tmp_path / "run")
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_dry_runs(path, tmp_path):
    """The 7B recipe too: its mergekit model paths need not exist for a dry run."""
    from typer.testing import CliRunner

    from training.cli import app
    from training.rebuild import rebuild

    recipe = load_recipe(path)
    out = tmp_path / "run"
    rows = rebuild(recipe, out, dry_run=True)
    assert [r["step"] for r in rows] == list(recipe.steps)
    assert all(r["status"] == "would run" and r["produces"] for r in rows)
    assert not out.exists()  # nothing written, nothing loaded
    res = CliRunner().invoke(
        app, ["rebuild", "--recipe", str(path), "--out", str(out), "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert f"plan of {len(recipe.steps)} steps is valid" in res.output
    assert all(step in res.output for step in recipe.steps)
    assert not out.exists()


def test_dry_run_shows_which_steps_would_resume(tmp_path):
    from training.artifacts import finish
    from training.rebuild import mark_made, rebuild

    recipe = load_recipe("smollm2-nitro")
    (tmp_path / "base").mkdir()
    finish(tmp_path / "base", "base", recipe.base, inputs={}, metrics={})
    assert rebuild(recipe, tmp_path, dry_run=True)[0]["status"] == "would run"  # from what?
    mark_made(recipe, tmp_path, "base")  # as `docqa train base` does after the step
    rows = rebuild(recipe, tmp_path, dry_run=True)
    assert [r["status"] for r in rows[:2]] == ["would resume", "would run"]
    assert rows[1]["inputs"] == {} and rows[2]["inputs"] == {"model": "base", "pairs": "synth"}
    assert rebuild(recipe, tmp_path, dry_run=True, force=True)[0]["status"] == "would run"
    recipe.base.dtype = "bfloat16"  # another config: the completed step no longer counts
    assert rebuild(recipe, tmp_path, dry_run=True)[0]["status"] == "would run"


def test_cli_dry_run_of_a_bad_recipe_names_step_and_need(tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    p = _write(tmp_path, "name: bad\nsteps: [synth, dpo]\n")
    res = CliRunner().invoke(app, ["rebuild", "-r", str(p), "-o", str(tmp_path), "--dry-run"])
    assert res.exit_code == 1
    assert "step 'dpo' needs 'model'" in res.output


def test_cli_has_a_command_per_registered_step(tmp_path):
    from typer.testing import CliRunner

    from training.cli import app
    from training.registry import steps

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == {"rebuild", *steps()}
    res = CliRunner().invoke(app, ["sft", "-r", "smollm2-nitro", "-o", str(tmp_path / "run")])
    assert res.exit_code == 1 and "run 'base' first" in res.output


def test_dry_run_imports_no_torch(tmp_path):
    """`docqa train rebuild --dry-run` validates every recipe without torch or a model."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from training.cli import app\n"
        "from training.config import RECIPES\n"
        "codes = [CliRunner().invoke(app, ['rebuild', '-r', str(p), '-o', sys.argv[1],\n"
        "         '--dry-run']).exit_code for p in sorted(RECIPES.glob('*.yaml'))]\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'mergekit', 'llama_cpp',\n"
        "         'sentence_transformers', 'datasets')\n"
        "print(json.dumps({'codes': codes, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["codes"] == [0] * len(list(RECIPES.glob("*.yaml")))
    assert got["loaded"] == []


def test_samples_judge_each_way_an_answer_can_fail():
    """training.samples.judge: a right answer states the reference's identifiers, names nothing
    the evidence lacks, echoes no scaffolding and cites only the gold excerpt."""
    from training.samples import judge

    ev = "- ctx_len (integer): the context length. Default 2048."
    q = "Which parameter sets the context length?"
    ok = judge(
        "The `ctx_len` parameter sets it; its default is 2048 [2].", ["ctx_len"], ev, q, "2", True
    )
    assert ok.right and ok.why == ""
    cases = {
        "The `ngl` parameter sets it [2].": "does not state 'ctx_len'",
        "The `ctx_len` parameter; its default is 4096 [2].": "names '4096'",
        "The `ctx_len` parameter [1].": "cites [1]",
        "Question: The `ctx_len` parameter [2].": "echoes scaffolding",
        "": "empty",
    }
    for answer, why in cases.items():
        v = judge(answer, ["ctx_len"], ev, q, "2", True)
        assert not v.right and v.why.startswith(why), (answer, v)
    assert judge("The `ctx_len` parameter [2].", ["ctx_len"], ev, q, "2", False).why == (
        "cut at max_tokens"
    )


def test_samples_keep_whole_sentences_and_real_names():
    from training.samples import names_something, whole_sentences

    assert whole_sentences("It is `ctx_len` [1]. Its default is 20") == "It is `ctx_len` [1]."
    assert whole_sentences("Set it. Then run the") == "Set it."
    assert whole_sentences("no sentence end here") == ""
    assert names_something(["ctx_len"]) and names_something(["/v1/models"])
    assert names_something(["3928"]) and names_something(["AsyncOpenAI"])
    assert not names_something(["server", "curl"])


def test_samples_select_the_best_grounded_right_answer_and_pair_it_with_a_wrong_one():
    from training.samples import select

    prompt = [{"role": "user", "content": "q"}]
    ev = [["- ctx_len (integer): the context length. Default 2048.", "[1]"]]

    def row(*answers):
        return {
            "prompt": prompt,
            "evidence": ev,
            "answers": [{"text": t, "right": r, "why": ""} for t, r in answers],
        }

    rows = [
        # greedy wrong, two sampled right: the one holding more evidence words is taught
        row(
            ("It is `ngl`.", False),
            ("It is `ctx_len`.", True),
            ("`ctx_len`: the context length, default 2048.", True),
        ),
        row(("It is `ctx_len` [1].", True), ("It is `ctx_len` too.", True)),  # no wrong: no pair
        row(("It is `ngl`.", False), ("Unknown.", False)),  # none right: nothing
    ]
    examples, prefs, counts = select(rows)
    assert [e["completion"][0]["content"] for e in examples] == [
        "`ctx_len`: the context length, default 2048.",
        "It is `ctx_len` [1].",
    ]
    assert len(prefs) == 1 and prefs[0]["rejected"][0]["content"] == "It is `ngl`."
    assert prefs[0]["chosen"] == examples[0]["completion"] and prefs[0]["prompt"] == prompt
    assert counts == {
        "questions": 3,
        "greedy_right": 1,
        "any_right": 2,
        "rescued": 1,
        "examples": 2,
        "preference_pairs": 1,
    }


def test_a_step_whose_upstream_was_made_again_is_not_resumed(tmp_path, monkeypatch):
    """A rebuild that reran sft and export, then failed in the gate, keeps the gate's old
    artifact (atomic steps). The next rebuild must judge the new model, not resume the old
    verdict and publish a model no gate has seen (before: only a step's own config counted).
    Publish also refuses a gate verdict on another file than the GGUF it would ship."""
    from training.artifacts import finish, step_dir
    from training.config import Recipe
    from training.rebuild import rebuild
    from training.registry import REGISTRY, Step, steps
    from training.steps import GateRefused

    steps()
    crash = {"gate": False}

    def sft(ctx):
        with step_dir(ctx.out, ctx.name) as tmp:
            (tmp / "hf").mkdir()
            (tmp / "hf" / "w").write_text(f"lr={ctx.config.learning_rate}")
            return finish(tmp, "sft", ctx.config, inputs={}, metrics={})

    def export(ctx):
        with step_dir(ctx.out, ctx.name) as tmp:
            (tmp / "model.gguf").write_text((ctx.input("model") / "w").read_text())
            return finish(tmp, "export", ctx.config, inputs={}, metrics={})

    def gate(ctx):
        from docqa.provenance import sha256_file

        if crash["gate"]:
            raise RuntimeError("the evaluation server died")
        with step_dir(ctx.out, ctx.name) as tmp:
            judged = ctx.input("gguf").read_text()
            sha = sha256_file(ctx.input("gguf"))
            return finish(
                tmp,
                "gate",
                ctx.config,
                inputs={"judged": judged},
                metrics={},
                passed=True,
                sha256=sha,
            )

    for name, fn in (("sft", sft), ("export", export), ("gate", gate)):
        s = REGISTRY[name]
        monkeypatch.setitem(REGISTRY, name, Step(name, s.config, fn, s.produces, s.needs))
    given = tmp_path / "base"
    given.mkdir()
    out = tmp_path / "run"
    recipe = {
        "name": "r",
        "steps": ["sft", "export", "gate", "publish"],
        "inputs": {"model": str(given)},
        "publish": {"store_dir": str(tmp_path / "store")},
    }

    def run(lr):
        r = Recipe.model_validate(recipe | {"sft": {"learning_rate": lr}})
        return [(row["step"], row["status"]) for row in rebuild(r, out)]

    assert [s for _, s in run(1e-4)] == ["done"] * 4
    assert [s for _, s in run(1e-4)] == ["resumed"] * 4
    crash["gate"] = True
    with pytest.raises(RuntimeError, match="server died"):
        run(0.5)
    crash["gate"] = False
    assert run(0.5) == [
        ("sft", "resumed"),
        ("export", "resumed"),
        ("gate", "done"),
        ("publish", "done"),
    ]
    assert json.loads((out / "gate" / "provenance.json").read_text())["inputs"]["judged"] == (
        "lr=0.5"
    )
    (given / "new.txt").write_text("a given input changed")  # everything after it reruns
    assert [s for _, s in run(0.5)] == ["done"] * 4
    # found by a review: a gate measured under other retrieval settings was resumed
    monkeypatch.setenv("DOCQA_RETRIEVAL__TOP_K", "4")
    assert run(0.5) == [
        ("sft", "done"),  # builds served prompts (RAG examples) from these settings
        ("export", "done"),
        ("gate", "done"),
        ("publish", "done"),
    ]
    gate_prov = json.loads((out / "gate" / "provenance.json").read_text())
    assert gate_prov["settings"]["retrieval"]["top_k"] == 4
    assert [s for _, s in run(0.5)] == ["resumed"] * 4
    (out / "export" / "model.gguf").write_text("made again, never judged")
    monkeypatch.setitem(
        REGISTRY,
        "export",
        Step(
            "export",
            REGISTRY["export"].config,
            lambda ctx: None,
            REGISTRY["export"].produces,
            REGISTRY["export"].needs,
        ),
    )
    from training.registry import plan_for

    r = Recipe.model_validate(recipe | {"sft": {"learning_rate": 0.5}})
    with pytest.raises(GateRefused, match="judged another file"):
        plan_for(r, "publish").run(r, out)
    (out / "export" / "model.gguf").write_text("lr=0.5")  # the file the gate judged again
    # found by a review: publish alone took a verdict made under an older gate config
    looser = Recipe.model_validate(recipe | {"sft": {"learning_rate": 0.5}, "gate": {"margin": 1}})
    with pytest.raises(GateRefused, match="another gate config"):
        plan_for(looser, "publish").run(looser, out)
    plan_for(r, "publish").run(r, out)  # the verdict's own config: published


def test_export_f32_writes_f32_and_quant_select_uses_candidate_settings(tmp_path, monkeypatch):
    """``export.quant: F32`` asks the converter for F32 (before: an F16 file named F32), and
    ``quant_select.quality.candidate_settings`` serves the quants with those settings, the
    reference with the defaults (before: accepted and ignored)."""
    from pathlib import Path

    import eval.speed as speed
    import models.store as store
    import training.export as export
    import training.gate as gate
    import training.quants as quants
    from training.config import Recipe
    from training.registry import plan_for

    calls = []

    def convert(hf, out_file, outtype="f16"):
        calls.append(outtype)
        out_file.write_bytes(b"gguf-" + outtype.encode())
        return out_file

    monkeypatch.setattr(export, "convert_to_gguf", convert)
    given = tmp_path / "hf"
    given.mkdir()
    rec = Recipe.model_validate(
        {
            "name": "r",
            "steps": ["export"],
            "inputs": {"model": str(given)},
            "export": {"quant": "F32"},
        }
    )
    plan_for(rec, "export").run(rec, tmp_path / "run")
    assert calls == ["f32"] and (tmp_path / "run/export/model.gguf").read_bytes() == b"gguf-f32"

    seen = []

    def evaluate(model, cfg, settings=None):
        seen.append((Path(model).name, settings))
        return {"facts_accuracy": 0.5, "qa_f1": 0.3}

    def export_quants(model, out_dir, names):
        for n in names:
            (out_dir / f"{n}.gguf").write_bytes(b"x")
        return {n: out_dir / f"{n}.gguf" for n in names}

    ref = tmp_path / "ref.gguf"
    ref.write_bytes(b"r")
    monkeypatch.setattr(gate, "evaluate", evaluate)
    monkeypatch.setattr(quants, "export_quants", export_quants)
    monkeypatch.setattr(
        speed,
        "measure_speed",
        lambda paths, **kw: {n: {"prefill_tok_s": 1.0, "decode_tok_s": 1.0} for n in paths},
    )
    monkeypatch.setattr(store.ModelStore, "resolve", lambda self, n: store.ResolvedModel(n, ref))
    kv = {"retrieval": {"kv_cache": True}}
    rec = Recipe.model_validate(
        {
            "name": "r",
            "steps": ["quant_select"],
            "inputs": {"model": str(given)},
            "quant_select": {"quants": ["Q8_0"], "quality": {"candidate_settings": kv}},
        }
    )
    plan_for(rec, "quant_select").run(rec, tmp_path / "run2")
    assert rec.quant_select.quality.against == "smollm2-135m-instruct"  # not the served one
    assert rec.quant_select.quality.mcq_limit == 0
    assert sorted(seen, key=str) == [("Q8_0.gguf", kv), ("smollm2-135m-instruct", None)]


def test_publish_without_a_store_dir_uses_the_servers_store(tmp_path, monkeypatch):
    """``publish.store_dir`` unset publishes into the settings' ``model.store_dir``, the store
    the server reads (before: a hard-coded models/store, so a server with another store could
    not find, or reload to, the published model)."""
    from training.config import Recipe
    from training.registry import plan_for

    store = tmp_path / "srv-store"
    monkeypatch.setenv("DOCQA_MODEL__STORE_DIR", str(store))
    gguf_dir = tmp_path / "given"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF-made-elsewhere")
    rec = Recipe.model_validate(
        {
            "name": "r",
            "steps": ["publish"],
            "inputs": {"gguf": str(gguf_dir / "model.gguf")},
            "export": {"name": "mine"},
        }
    )
    assert rec.publish.store_dir is None
    plan_for(rec, "publish").run(rec, tmp_path / "run")
    assert (store / "mine.gguf").read_bytes() == b"GGUF-made-elsewhere"


def test_synth_pairs_from_a_file_leave_out_held_out_twins(tmp_path):
    """Found by a review: pairs from a synth or given file dropped held-out questions but not
    their twins in other punctuation or articles (14 of the Nitro pairs), as split_qa does."""
    from docqa.data import is_heldout, question_key
    from training.steps import read_pairs

    held = next(
        q
        for q in (f"What does option number {i} do?" for i in range(200))
        if is_heldout(q) and not is_heldout(q.replace("What does", "What does the"))
    )
    twin = held.replace("What does", "What does the")
    f = tmp_path / "pairs.jsonl"
    rows = [
        {"question": held, "answer": "a"},
        {"question": twin, "answer": "b"},
        {"question": "Which port does it use?", "answer": "c"},
        {"question": "What is role of -H flag", "answer": "d"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [p.question for p in read_pairs(f, heldout={question_key("The role of the '-H' flag?")})]
    assert twin not in got and held not in got
    assert "Which port does it use?" in got or is_heldout("Which port does it use?")
    assert question_key("What is role of -H flag") != question_key("The role of the '-H' flag?")
    got = [
        p.question
        for p in read_pairs(f, heldout={question_key("What is the role of the '-H' flag?")})
    ]
    assert "What is role of -H flag" not in got


def test_a_samples_cache_cut_mid_line_is_mended(tmp_path, monkeypatch):
    """Found by a review: a run killed mid-append left a partial last line, and every later
    run failed on it (JSONDecodeError) before loading any model."""
    from training import samples

    cache = tmp_path / "cache"
    cache.mkdir()
    good = json.dumps({"key": "k1", "question": "q"})
    (cache / "candidates.jsonl").write_text(good + "\n" + '{"key": "x", "ques')

    class Stop(Exception):
        pass

    def no_model(*a, **kw):
        raise Stop  # reached: the cache was read past the cut line

    monkeypatch.setattr("training.data.RagExamples", no_model)
    from training.config import SamplesStep

    dummy = tmp_path / "m.gguf"
    dummy.write_bytes(b"GGUF")
    cfg = SamplesStep(model=str(dummy))
    with pytest.raises(Stop):
        samples.sample_answers([], cfg, cache, progress=False)
    assert (cache / "candidates.jsonl").read_text() == good + "\n"


def test_a_published_model_is_readable_and_never_described_by_its_predecessor(
    tmp_path, monkeypatch
):
    """Found by a review: a published GGUF was 0600 (mkstemp), and a crash between the rename
    and the new provenance left the new model with the old model's provenance."""
    import models.store as store_mod
    from docqa.provenance import read_provenance, sha256_file

    store = store_mod.ModelStore(tmp_path / "store")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF-a")
    b.write_bytes(b"GGUF-b")
    got = store.publish(a, "mine")
    assert got.path.stat().st_mode & 0o777 == 0o644
    assert read_provenance(store_mod.provenance_path(got.path))["sha256"] == sha256_file(a)

    def crash(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "write_provenance", crash)
    with pytest.raises(OSError, match="disk full"):
        store.publish(b, "mine")
    prov = read_provenance(store_mod.provenance_path(got.path))
    assert prov is None or prov["sha256"] == sha256_file(got.path)
