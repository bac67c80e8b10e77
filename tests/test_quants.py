"""The quant_select step (issue 19 item 3): its choice (quality first, then prefill speed) on
given figures, its recipe's plan, and real Q8_0 / Q4_0 exports of the embedded model."""

from __future__ import annotations

import pytest

from training.quants import choose, keeps_quality, table_markdown

REF = "smollm2-135m-instruct"
N = 34  # the grounded-fact dev questions


def _facts(correct: int, first: int = 0) -> list[bool]:
    """Per-question correctness: questions first .. first+correct-1 right."""
    return [first <= i < first + correct for i in range(N)]


def _fig(prefill: float, facts: list[bool], qa_f1: float = 0.30, decode: float = 60.0) -> dict:
    return {
        "size_bytes": 100_000_000,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "facts_accuracy": sum(facts) / len(facts),
        "facts_correct": facts,
        "qa_f1": qa_f1,
    }


def test_the_fastest_quant_that_keeps_quality_is_chosen():
    figures = {
        REF: _fig(172, _facts(20)),
        "Q8_0": _fig(267, _facts(20)),  # same questions right: keeps quality
        "Q4_0": _fig(317, _facts(16)),  # faster, but 4 facts (0.118) lost: beyond the margin
    }
    out = choose(figures, REF, margin=0.02, alpha=0.05)
    assert out["chosen"] == "Q8_0"
    rows = {r["model"]: r for r in out["table"]}
    assert [r["model"] for r in out["table"]] == [REF, "Q8_0", "Q4_0"]
    assert rows["Q8_0"]["chosen"] and rows["Q8_0"]["keeps_quality"]
    assert not rows["Q4_0"]["keeps_quality"] and "facts_accuracy" in rows["Q4_0"]["why"]
    assert rows[REF]["keeps_quality"] and not rows[REF]["chosen"]
    assert "Q8_0 is chosen" in out["verdict"] and "267" in out["verdict"]
    md = table_markdown(out["table"])
    assert md.count("\n") == 4 and "**yes**" in md

    # both keep quality: the faster prefill wins, whichever has the better figures
    figures["Q4_0"] = _fig(317, _facts(20), qa_f1=0.29)
    assert choose(figures, REF, margin=0.02, alpha=0.05)["chosen"] == "Q4_0"
    # a quant that keeps quality but prefills slower than the reference: the reference stays
    slow = {REF: _fig(172, _facts(20)), "Q8_0": _fig(150, _facts(21))}
    out = choose(slow, REF, margin=0.02, alpha=0.05)
    assert out["chosen"] == REF and "prefills 0% faster" in out["verdict"]
    # faster by less than min_speedup is noise: the reference stays; by more, the quant wins
    near = {REF: _fig(300, _facts(20)), "Q8_0": _fig(310, _facts(20))}
    out = choose(near, REF, margin=0.02, alpha=0.05, min_speedup=0.05)
    assert out["chosen"] == REF and "not 5% faster" in out["table"][1]["why"]
    assert choose(near, REF, margin=0.02, alpha=0.05, min_speedup=0.03)["chosen"] == "Q8_0"


def test_no_quant_keeps_quality_keeps_the_reference_and_says_why():
    figures = {
        REF: _fig(172, _facts(20)),
        "Q8_0": _fig(267, _facts(20), qa_f1=0.25),  # QA F1 down 0.05 > margin
        "Q4_0": _fig(317, _facts(10)),
    }
    out = choose(figures, REF, margin=0.02, alpha=0.05)
    assert out["chosen"] == REF
    assert "no quant keeps its quality" in out["verdict"]
    assert "qa_f1" in out["verdict"] and "Q4_0" in out["verdict"]
    assert [r["chosen"] for r in out["table"]] == [True, False, False]


def test_a_significant_facts_loss_fails_even_within_the_margin():
    ref = _fig(172, _facts(20))
    # 7 questions only the reference gets, none only the quant: McNemar p = 2 * 0.5**7 = 0.016
    lost = _fig(317, _facts(13))
    loose = keeps_quality(lost, ref, margin=0.25, alpha=0.05)  # -0.206 is within 0.25
    assert loose["deltas"]["facts_accuracy"] == pytest.approx(-7 / 34, abs=1e-4)
    assert not loose["keeps"] and "significantly worse" in loose["why"]
    assert loose["only_reference"] == 7 and loose["only_quant"] == 0
    assert loose["mcnemar_p"] == pytest.approx(2 * 0.5**7)
    # the same net loss spread over swaps in both directions is not significant: kept
    swapped = _fig(317, _facts(13, first=10))  # right on 10..22: 3 only the quant, 10 only ref
    kept = keeps_quality(swapped, ref, margin=0.25, alpha=0.05)
    assert kept["keeps"] and kept["mcnemar_p"] == pytest.approx(2 * 378 / 2**13)
    # a significant gain is no loss
    assert keeps_quality(ref, lost, margin=0.02, alpha=0.05)["keeps"]


def test_the_recipe_publishes_the_choice_under_its_own_name():
    from training.config import load_recipe
    from training.registry import plan

    recipe = load_recipe("smollm2-fast")
    steps = {p.name: p for p in plan(recipe)}
    assert list(steps) == ["base", "quant_select", "publish"]
    assert steps["quant_select"].sources == {"model": "base"}
    assert steps["publish"].sources == {"gguf": "quant_select", "gate": "quant_select"}
    assert recipe.publish.name == "smollm2-135m-fast"
    assert recipe.quant_select.quants == ["Q8_0", "Q4_0", "F16"]
    assert recipe.quant_select.quality.against == REF


def test_quant_select_refuses_a_min_gain(tmp_path):
    from pydantic import ValidationError

    from training.config import QuantSelectStep

    with pytest.raises(ValidationError, match="min_gain"):
        QuantSelectStep(quality={"min_gain": 0.05})


@pytest.mark.slow
def test_embedded_model_exports_as_q8_0_and_q4_0(tmp_path):
    """The real path: the embedded Q4_1 dequantized to an fp32 HF folder (the base step), then
    one F32 GGUF quantized to Q8_0 and Q4_0: both load in llama.cpp, answer, are timed, and
    carry a provenance JSON with their sha256."""
    import llama_cpp

    from docqa.provenance import read_provenance, sha256_file
    from eval.speed import measure_speed
    from training.hf import load_causal_lm, save_hf
    from training.quants import export_quants

    model, tok = load_causal_lm(REF)
    save_hf(model, tok, tmp_path / "hf")
    del model
    files = export_quants(tmp_path / "hf", tmp_path / "out", ["Q8_0", "q4_0"])
    assert list(files) == ["Q8_0", "Q4_0"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Q4_0.gguf",
        "Q4_0.json",
        "Q8_0.gguf",
        "Q8_0.json",
    ]  # the F32 intermediate is gone
    for quant, path in files.items():
        prov = read_provenance(path.with_suffix(".json"))
        assert prov["quant"] == quant and prov["sha256"] == sha256_file(path)
        assert prov["metrics"]["size_bytes"] == path.stat().st_size
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
        text = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
        assert text["choices"][0]["text"].strip()
        llm.close()
    assert files["Q4_0"].stat().st_size < files["Q8_0"].stat().st_size
    speed = measure_speed(files, threads=1, prompt_tokens=16, tokens=4, rounds=1)
    assert all(s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0 for s in speed.values())
