"""The smoke recipe end to end on CPU: real LoRA steps, a real GGUF, gate and publish."""

from __future__ import annotations

import hashlib

import llama_cpp
import pytest

from docqa.provenance import read_provenance
from training.config import load_recipe
from training.rebuild import rebuild

from .conftest import SHARED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "nitro-qa").is_dir(), reason="../shared data not present"),
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    store = tmp_path_factory.mktemp("store")
    recipe = load_recipe("smoke")
    recipe.publish.store_dir = str(store)
    rows = rebuild(recipe, out)
    return recipe, out, store, rows


def test_every_step_ran_with_provenance(smoke_run):
    recipe, out, _, rows = smoke_run
    assert [r["step"] for r in rows] == list(recipe.steps)
    for step in recipe.steps:
        prov = read_provenance(out / step / "provenance.json")
        assert prov and prov["versions"]["python"] and "config" in prov, step


def test_loss_fell_and_weights_changed(smoke_run):
    _, out, _, _ = smoke_run
    sft = read_provenance(out / "sft" / "provenance.json")["metrics"]
    assert sft["loss_last3"] < sft["loss_first3"]
    assert sft["weight_delta"] > 0
    assert read_provenance(out / "dpo" / "provenance.json")["metrics"]["weight_delta"] > 0
    assert (out / "sft" / "adapter" / "adapter_config.json").is_file()
    assert (out / "merge" / "mergekit.yaml").is_file()


def test_gguf_loads_and_answers(smoke_run):
    _, out, _, _ = smoke_run
    llm = llama_cpp.Llama(str(out / "export" / "model.gguf"), n_ctx=512, verbose=False)
    r = llm.create_chat_completion(
        [{"role": "user", "content": "What is Nitro?"}], max_tokens=16, temperature=0
    )
    assert r["choices"][0]["message"]["content"].strip()
    assert read_provenance(out / "export" / "provenance.json")["quant"] == "Q8_0"


def test_gate_and_publish(smoke_run):
    recipe, out, store, _ = smoke_run
    gate = read_provenance(out / "gate" / "provenance.json")
    assert gate["passed"] is True
    assert set(gate["metrics"]["metrics"]) == {"facts_accuracy", "qa_f1", "mcq_accuracy"}
    published = store / f"{recipe.export.name}.gguf"
    assert published.is_file()
    prov = read_provenance(published.with_suffix(".json"))
    assert prov["upstream"]["gate"]["passed"] is True
    assert prov["sha256"] == hashlib.sha256(published.read_bytes()).hexdigest()


def test_failed_step_keeps_published_model_and_artifacts(smoke_run):
    recipe, out, store, _ = smoke_run
    published = store / f"{recipe.export.name}.gguf"
    before = hashlib.sha256(published.read_bytes()).hexdigest()
    old_export = (out / "export" / "model.gguf").stat().st_mtime
    broken = recipe.model_copy(deep=True)
    broken.export.quant = "Q9_9"  # not a llama.cpp type: the export step fails
    with pytest.raises(ValueError):
        rebuild(broken, out)
    assert hashlib.sha256(published.read_bytes()).hexdigest() == before
    assert (out / "export" / "model.gguf").stat().st_mtime == old_export
    assert (out / "sft" / "hf" / "config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".export.tmp")]


def test_gguf_hf_gguf_roundtrip(smoke_run, tmp_path):
    """GGUF -> HF -> GGUF gives the same greedy output (F16 and Q8_0)."""
    from training.export import convert_to_gguf, quantize
    from training.hf import load_causal_lm, save_hf

    _, out, _, _ = smoke_run
    first = convert_to_gguf(out / "base" / "hf", tmp_path / "a.f16.gguf")
    model, tok = load_causal_lm(first)
    save_hf(model, tok, tmp_path / "hf")
    second = convert_to_gguf(tmp_path / "hf", tmp_path / "b.f16.gguf")

    def greedy(path):
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
        return llm.create_completion("The three primary colors are", max_tokens=20, temperature=0)[
            "choices"
        ][0]["text"]

    assert greedy(first) == greedy(second)
    qa = quantize(first, tmp_path / "a.q8.gguf", "Q8_0")
    qb = quantize(second, tmp_path / "b.q8.gguf", "Q8_0")
    assert greedy(qa) == greedy(qb)


def test_full_finetune_of_the_top_layers(smoke_run, tmp_path):
    """The smollm2-reader recipe's SFT in small: full finetuning (``lora: null``) of the top
    two layers on evidence-layout examples with one torch thread: the loss falls, the top
    layers change, the embeddings and the layers below do not."""
    import torch

    from training.config import SFTStep
    from training.data import sft_examples, train_pairs
    from training.hf import load_causal_lm
    from training.lora import train_sft

    _, out, _, _ = smoke_run
    pairs = train_pairs(limit=60, seed=1)
    ex = sft_examples(pairs, rag=True, k=2, p_missing=0.0, target="grounded", limit=3)
    assert ex and ex[0]["prompt"][-1]["content"].startswith("Documentation excerpts:\n")
    cfg = SFTStep(
        lora=None,
        train_layers=2,
        threads=1,
        max_steps=6,
        batch_size=1,
        learning_rate=3e-4,
        warmup_ratio=0.0,
        max_length=512,
    )
    model, tok = load_causal_lm(out / "base" / "hf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained, m = train_sft(model, tok, ex, cfg, tmp_path)
    assert m["loss_last3"] < m["loss_first3"]
    assert m["trainable_params"] < m["total_params"] / 5
    last = len(trained.model.layers) - 1
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith(f"model.layers.{last}.") for n in changed)
    allowed = (f"model.layers.{last - 1}.", f"model.layers.{last}.", "model.norm.")
    assert all(n.startswith(allowed) for n in changed), sorted(changed)[:5]
    assert not (tmp_path / "adapter").exists()  # no adapter: the weights themselves changed


def test_stitched_sft_learns_the_served_layout(tmp_path):
    """``sft.block_attention``: examples are cut as the server cuts the prompt (the same tokens
    as the chat template's rendering; the prefix, one segment per evidence line, then the open
    tail), and a short stitched run lowers the stitched loss on them and changes the top layers
    only."""
    import torch

    from docqa.settings import load_settings
    from training.blocks import OPEN, PREFIX, block_example, collate, stitched_loss
    from training.config import SFTStep
    from training.data import sft_examples, train_pairs
    from training.hf import load_causal_lm
    from training.lora import train_sft

    pairs = train_pairs(limit=60, seed=1)
    ex = sft_examples(pairs, rag=True, k=2, p_missing=0.0, target="grounded", limit=3)
    model, tok = load_causal_lm(load_settings().model.model)  # the embedded model
    retrieval = load_settings().retrieval
    rows = [block_example(tok, e, retrieval) for e in ex]
    for e, r in zip(ex, rows):
        text = tok.apply_chat_template(e["prompt"] + e["completion"], tokenize=False)
        assert tok.decode(r["input_ids"]) == text
        seg = r["segments"]
        assert seg[0] == PREFIX and seg[-1] == OPEN
        assert sorted(set(seg) - {PREFIX, OPEN}) == list(range(1, len(e["evidence"]) + 1))
        answer = [i for i, lab in enumerate(r["labels"]) if lab != -100]
        assert answer and all(seg[i] == OPEN for i in answer)

    def loss():
        with torch.no_grad():
            return float(stitched_loss(model, collate(rows)))

    before_loss = loss()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SFTStep(
        block_attention=True,
        lora=None,
        train_layers=2,
        threads=1,
        max_steps=6,
        batch_size=3,
        learning_rate=3e-4,
        warmup_ratio=0.0,
        max_length=1024,
    )
    trained, m = train_sft(model, tok, ex, cfg, tmp_path)
    assert m["stitched_examples"] == len(ex) and m["steps"] == 6
    model = trained
    assert loss() < 0.7 * before_loss, (before_loss, loss())
    last = len(trained.model.layers) - 1
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    allowed = (f"model.layers.{last - 1}.", f"model.layers.{last}.", "model.norm.")
    assert changed and all(n.startswith(allowed) for n in changed), sorted(changed)[:5]


def test_distilled_sft_learns_to_read_stitched_prompts_as_plain_ones(tmp_path):
    """``sft.objective: distill``: the KL divergence from the starting model's plain forward
    pass to the stitched one is zero where a prompt is not cut into lines and positive where it
    is; a short distilled run lowers it on the stitched prompts and leaves the teacher (the
    starting weights) untouched."""
    import torch

    from docqa.settings import load_settings
    from training.blocks import OPEN, block_example, collate, distill_loss
    from training.config import SFTStep
    from training.data import sft_examples, train_pairs
    from training.hf import load_causal_lm
    from training.lora import train_sft

    with pytest.raises(ValueError, match="block_attention"):
        SFTStep(objective="distill")
    pairs = train_pairs(limit=60, seed=2)
    ex = sft_examples(pairs, rag=True, k=3, p_missing=0.0, target="grounded", limit=3)
    model, tok = load_causal_lm(load_settings().model.model)  # the embedded model
    teacher, _ = load_causal_lm(load_settings().model.model)
    retrieval = load_settings().retrieval
    rows = [block_example(tok, e, retrieval) for e in ex]
    assert all(max(r["segments"]) >= 2 for r in rows)  # several lines: stitching matters
    plain = [dict(r, segments=[OPEN] * len(r["segments"])) for r in rows]

    def kl(batch_rows, m=model):
        with torch.no_grad():
            return float(distill_loss(m, teacher, collate(batch_rows)))

    assert abs(kl(plain)) < 1e-4
    before_kl = kl(rows)
    assert before_kl > 1e-3
    cfg = SFTStep(
        block_attention=True,
        objective="distill",
        lora=None,
        train_layers=4,
        threads=1,
        max_steps=8,
        batch_size=3,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        max_length=1024,
    )
    start = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trained, m = train_sft(model, tok, ex, cfg, tmp_path)
    assert m["stitched_examples"] == len(ex) and m["steps"] == 8
    assert kl(rows, trained) < 0.5 * before_kl, (before_kl, kl(rows, trained))
    assert all(torch.equal(p, start[n]) for n, p in teacher.named_parameters())


def test_samples_feed_sft_and_dpo_with_the_models_own_judged_answers(smoke_run, tmp_path):
    """The samples step in small (smollm2-reader-self's chain): the embedded model answers real
    train questions through llama.cpp; every SFT example is one of its own answers judged
    right, every DPO pair a right and a wrong answer to the same prompt; SFT trains on those
    answers and DPO on those pairs (their inputs say so), and both change the weights."""
    import json

    from training.config import Recipe
    from training.samples import judge

    _, out, _, _ = smoke_run
    recipe = Recipe.model_validate(
        {
            "name": "samples-smoke",
            "steps": ["samples", "sft", "dpo"],
            "inputs": {"model": str(out / "base" / "hf")},
            "samples": {"limit": 6, "candidates": 3, "max_tokens": 64, "seed": 1},
            "sft": {
                "max_steps": 4,
                "batch_size": 1,
                "max_length": 768,
                "learning_rate": 3e-4,
                "warmup_ratio": 0.0,
                "lora": None,
                "train_layers": 2,
                "threads": 1,
            },
            "dpo": {
                "max_steps": 2,
                "batch_size": 1,
                "max_length": 768,
                "learning_rate": 1e-4,
                "warmup_ratio": 0.0,
                "lora": None,
                "train_layers": 2,
                "threads": 1,
            },
        }
    )
    run = tmp_path / "run"
    rebuild(recipe, run)
    prov = read_provenance(run / "samples" / "provenance.json")
    counts = prov["metrics"]
    assert counts["questions"] == 6 and counts["examples"] >= 1

    rows = [json.loads(x) for x in (run / "samples" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert len(r["answers"]) == 3 and r["must"]
        evidence = "\n".join(t for t, _ in r["evidence"])
        for a in r["answers"]:  # each verdict is the judge's (answers ended or were trimmed)
            assert (
                a["right"]
                == judge(a["text"], r["must"], evidence, r["question"], r["gold_tag"], True).right
            )
    right = {(json.dumps(r["prompt"]), a["text"]) for r in rows for a in r["answers"] if a["right"]}
    wrong = {
        (json.dumps(r["prompt"]), a["text"]) for r in rows for a in r["answers"] if not a["right"]
    }
    answers = [json.loads(x) for x in (run / "samples" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == counts["examples"]
    for e in answers:
        assert (json.dumps(e["prompt"]), e["completion"][0]["content"]) in right
    prefs = [
        json.loads(x) for x in (run / "samples" / "preferences.jsonl").read_text().splitlines()
    ]
    assert len(prefs) == counts["preference_pairs"]
    for p in prefs:
        assert (json.dumps(p["prompt"]), p["chosen"][0]["content"]) in right
        assert (json.dumps(p["prompt"]), p["rejected"][0]["content"]) in wrong

    sft = read_provenance(run / "sft" / "provenance.json")
    assert sft["inputs"]["answers"].endswith("answers.jsonl")
    assert sft["inputs"]["examples"] == len(answers)
    assert sft["metrics"]["weight_delta"] > 0
    assert prefs, "6 questions x 3 answers gave no right/wrong pair"
    dpo = read_provenance(run / "dpo" / "provenance.json")
    assert dpo["inputs"]["pairs"] == len(prefs) and dpo["metrics"]["weight_delta"] > 0


def test_a_gguf_base_is_read_once_per_process_and_each_load_is_its_own(monkeypatch):
    """transformers parses a GGUF three times per load (~40 s for the embedded model on 2
    cores); training.hf keeps a small file's reading, and every load gets its own copy."""
    import torch
    from transformers import AutoModelForCausalLM

    from docqa.settings import load_settings
    from training import hf

    reads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        reads.append(kw.get("gguf_file"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    name = load_settings().model.model
    a, tok_a = hf.load_causal_lm(name)
    b, tok_b = hf.load_causal_lm(name)
    assert len([r for r in reads if r]) <= 1  # the second load read nothing
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    tok_a.pad_token = "<|im_start|>"
    c, tok_c = hf.load_causal_lm(name)
    assert torch.equal(next(b.parameters()), next(c.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    assert tok_c.pad_token == tok_b.pad_token != "<|im_start|>"
