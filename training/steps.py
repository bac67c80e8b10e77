"""The training steps, registered with one signature ``run(ctx: StepContext) -> dict``.

Each step reads the artifacts its plan resolved (``ctx.input(kind)``), writes its own into a
temp dir with a provenance JSON, and only then replaces the step's directory. What each step
needs and produces is declared at its registration (training.registry). GGUF conversion,
quantization and the export step live in training.export.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

from training.artifacts import PROV, config_hash, finish, step_dir
from training.config import (
    BaseStep,
    DPOStep,
    EmbedderStep,
    GateStep,
    MergeStep,
    PublishStep,
    RerankerStep,
    SamplesStep,
    SFTStep,
    SynthStep,
)
from training.registry import Need, StepContext, register

log = logging.getLogger(__name__)

PAIRS = Need("pairs", optional=True)  # synth's pairs when an earlier step makes them, else CSV


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def read_pairs(
    path: Path, limit: int | None = None, seed: int = 0, heldout: set[str] = frozenset()
):
    """Q&A pairs from a JSONL file (question/answer per line), held-out questions dropped, and
    their twins in other punctuation, quotes or articles (``split_qa``): those of the file's
    own held-out questions and those keyed in ``heldout`` (``question_key``s of the evaluation
    split)."""
    from docqa.data import QAPair, is_heldout, question_key

    pairs = [QAPair(r["question"], r["answer"]) for r in _jsonl(path)]
    twins = set(heldout) | {question_key(p.question) for p in pairs if is_heldout(p.question)}
    pairs = [
        p for p in pairs if not is_heldout(p.question) and question_key(p.question) not in twins
    ]
    return random.Random(seed).sample(pairs, min(limit, len(pairs))) if limit else pairs


def heldout_keys(csv: str | Path | None) -> set[str]:
    """The ``question_key``s of the held-out split of the Q&A CSV (the recipe's, else the
    Nitro pairs; none when there is no such file): what no training pair may repeat."""
    from docqa.data import DEFAULT_QA, load_qa, question_key, split_qa

    src = Path(csv or DEFAULT_QA)
    if not src.is_file():
        return set()
    return {question_key(p.question) for p in split_qa(load_qa(src, duplicates=True))[1]}


def train_pairs_for(ctx: StepContext, limit: int | None, seed: int = 0):
    """Train pairs: the planned ``pairs`` input (the synth step's) when there is one, else the
    train split of the recipe's CSV."""
    from training.data import train_pairs

    if ctx.has("pairs"):
        return read_pairs(ctx.input("pairs"), limit, seed, heldout_keys(ctx.csv))
    return train_pairs(ctx.csv, limit, seed)


@register("base", BaseStep, produces={"model": "hf"})
def run_base(ctx: StepContext) -> dict:
    """Load the base weights (store name, GGUF or HF folder) and save a clean HF folder."""
    from training.hf import load_causal_lm, save_hf

    cfg: BaseStep = ctx.config
    with step_dir(ctx.out, ctx.name) as tmp:
        model, tok = load_causal_lm(cfg.source, cfg.dtype)
        save_hf(model, tok, tmp / "hf")
        n = sum(p.numel() for p in model.parameters())
        return finish(tmp, "base", cfg, inputs={"source": cfg.source}, metrics={"parameters": n})


@register("synth", SynthStep, produces={"pairs": "pairs.jsonl"})
def run_synth(ctx: StepContext) -> dict:
    """Make question/answer pairs from the docs at an endpoint (or take the CSV's train split)."""
    from training.synth import synthesize

    cfg: SynthStep = ctx.config
    with step_dir(ctx.out, ctx.name) as tmp:
        stats = synthesize(cfg, tmp / "pairs.jsonl", cache=ctx.out / ".synth-cache")
        return finish(
            tmp,
            "synth",
            cfg,
            inputs={"docs": cfg.docs, "endpoint": cfg.endpoint, "csv": cfg.csv},
            metrics=stats,
        )


def _merge_needs(cfg: MergeStep) -> tuple[Need, ...]:
    # a mergekit config names its own models; otherwise the base is merged with a variant
    return () if cfg.mergekit is not None else (Need("model"), PAIRS)


def _mergekit_models(config: dict) -> list[str]:
    models = [m.get("model") for m in config.get("models") or []]
    for sl in config.get("slices") or []:
        models += [s.get("model") for s in sl.get("sources") or []]
    return list(dict.fromkeys(str(m) for m in models if m))


@register("merge", MergeStep, needs=_merge_needs, produces={"model": "hf"})
def run_merge(ctx: StepContext) -> dict:
    """SLERP merge with mergekit: the models its config names, or the base and a variant."""
    from training.merge import slerp_merge

    cfg: MergeStep = ctx.config
    if cfg.mergekit is not None:
        src, qa = None, None
        inputs = {"base": cfg.mergekit.get("base_model"), "models": _mergekit_models(cfg.mergekit)}
    else:
        src = ctx.input("model")
        qa = train_pairs_for(ctx, 64)
        inputs = {"base": str(src)}
    with step_dir(ctx.out, ctx.name) as tmp:
        metrics = slerp_merge(cfg, src, tmp, qa)
        return finish(tmp, "merge", cfg, inputs=inputs, metrics=metrics)


def _dpo_needs(cfg: DPOStep) -> tuple[Need, ...]:
    # given preference pairs replace the offline ones built from Q&A pairs; so do those of an
    # earlier samples step
    if cfg.pairs:
        return (Need("model"),)
    return (Need("model"), PAIRS, Need("preferences", optional=True))


@register(
    "samples",
    SamplesStep,
    needs=(PAIRS,),
    produces={
        "answers": "answers.jsonl",
        "preferences": "preferences.jsonl",
        "greedy": "greedy.jsonl",
    },
)
def run_samples(ctx: StepContext) -> dict:
    """The model's own answers to training questions, judged: SFT examples and DPO pairs."""
    from training.samples import greedy_examples, sample_answers, select

    cfg: SamplesStep = ctx.config
    pairs = train_pairs_for(ctx, None, cfg.seed)
    random.Random(cfg.seed).shuffle(pairs)
    rows = sample_answers(pairs, cfg, ctx.out / ".samples-cache")
    examples, prefs, counts = select(rows)
    greedy = greedy_examples(rows)
    if not examples and not greedy:
        raise ValueError("samples: no question got an answer; nothing to train on")
    with step_dir(ctx.out, ctx.name) as tmp:
        files = (("answers.jsonl", examples), ("preferences.jsonl", prefs))
        for name, items in files + (("greedy.jsonl", greedy),):
            with open(tmp / name, "w") as f:
                for e in items:
                    f.write(json.dumps(e) + "\n")
        with open(tmp / "candidates.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return finish(
            tmp, "samples", cfg, inputs={"model": cfg.model, "pairs": len(pairs)}, metrics=counts
        )


@register("dpo", DPOStep, needs=_dpo_needs, produces={"model": "hf"})
def run_dpo(ctx: StepContext) -> dict:
    """DPO with LoRA on given preference pairs, or on offline pairs built from Q&A data."""
    from training.dpo_data import build_pairs, load_pairs
    from training.hf import load_causal_lm, save_hf, weight_delta
    from training.lora import train_dpo

    cfg: DPOStep = ctx.config
    src = ctx.input("model")
    model, tok = load_causal_lm(src)
    if cfg.pairs:
        pairs = load_pairs(cfg.pairs)[: cfg.n_pairs]
    elif ctx.has("preferences"):
        pairs = load_pairs(ctx.input("preferences"))[: cfg.n_pairs]
        if not pairs:
            raise ValueError(
                f"dpo: {ctx.input('preferences')} holds no pair (no question got both a right "
                "and a wrong answer): sample more questions or candidates"
            )
    else:
        pairs = build_pairs(model, tok, train_pairs_for(ctx, cfg.n_pairs, cfg.seed), cfg)
    with step_dir(ctx.out, ctx.name) as tmp:
        ref, _ = load_causal_lm(src)
        merged, metrics = train_dpo(model, tok, pairs, cfg, tmp)
        metrics["weight_delta"] = weight_delta(ref, merged)
        save_hf(merged, tok, tmp / "hf")
        with open(tmp / "pairs.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        return finish(
            tmp, "dpo", cfg, inputs={"model": str(src), "pairs": len(pairs)}, metrics=metrics
        )


@register(
    "sft",
    SFTStep,
    needs=(
        Need("model"),
        PAIRS,
        Need("answers", optional=True),
        Need("greedy", optional=True),
    ),
    produces={"model": "hf"},
)
def run_sft(ctx: StepContext) -> dict:
    """LoRA SFT (optionally retrieval-augmented); the adapter is merged into the saved model."""
    from training.data import sft_examples

    cfg: SFTStep = ctx.config
    src = ctx.input("model")
    own = "greedy" if cfg.own_answers == "greedy" else "answers"
    if ctx.has(own):  # the model's own answers (an earlier samples step): right, or greedy
        examples = _jsonl(ctx.input(own))[: cfg.limit]
        return _train_sft(ctx, src, examples, {own: str(ctx.input(own))})
    # the grounded target skips pairs, so it draws from every (shuffled) pair up to the limit
    skips = (cfg.rag and cfg.target == "grounded") or (not cfg.rag and cfg.require_identifiers)
    pairs = train_pairs_for(ctx, None if skips else cfg.limit, cfg.seed)
    if skips:
        random.Random(cfg.seed).shuffle(pairs)
    examples = sft_examples(
        pairs,
        rag=cfg.rag,
        k=cfg.k_chunks,
        p_missing=cfg.p_gold_missing,
        target=cfg.target,
        seed=cfg.seed,
        limit=cfg.limit,
        require_identifiers=cfg.require_identifiers,
        recite_docs=cfg.recite_docs,
        qa_pairs=cfg.qa_pairs,
    )
    return _train_sft(ctx, src, examples, {"pairs": len(pairs)})


def _train_sft(ctx: StepContext, src: Path, examples: list[dict], inputs: dict) -> dict:
    from training.hf import load_causal_lm, save_hf, weight_delta
    from training.lora import train_sft

    cfg: SFTStep = ctx.config
    with step_dir(ctx.out, ctx.name) as tmp:
        model, tok = load_causal_lm(src)
        ref, _ = load_causal_lm(src)
        merged, metrics = train_sft(model, tok, examples, cfg, tmp)
        metrics["weight_delta"] = weight_delta(ref, merged)
        save_hf(merged, tok, tmp / "hf")
        with open(tmp / "examples.jsonl", "w") as f:
            for e in examples[:50]:
                f.write(json.dumps(e) + "\n")
        return finish(
            tmp,
            "sft",
            cfg,
            inputs={"model": str(src), **inputs, "examples": len(examples)},
            metrics=metrics,
        )


@register("embedder", EmbedderStep, needs=(PAIRS,), produces={"embedder": "model"})
def run_embedder(ctx: StepContext) -> dict:
    """Finetune the retrieval embedder; the step's ``model/`` is a sentence-transformers folder
    (set ``embedder.model`` to it and rebuild the index)."""
    from docqa.data import DEFAULT_QA, load_qa, split_qa
    from training.embedder import finetune_embedder

    cfg: EmbedderStep = ctx.config
    pairs = train_pairs_for(ctx, cfg.limit, cfg.seed)
    heldout = split_qa(load_qa(ctx.csv or DEFAULT_QA, duplicates=True))[1]
    with step_dir(ctx.out, ctx.name) as tmp:
        metrics = finetune_embedder(cfg, pairs, heldout, tmp / "model")
        return finish(
            tmp,
            "embedder",
            cfg,
            inputs={"base": cfg.base, "docs": cfg.docs, "csv": ctx.csv, "pairs": len(pairs)},
            metrics=metrics,
        )


@register("reranker", RerankerStep, needs=(PAIRS,), produces={"reranker": "model"})
def run_reranker(ctx: StepContext) -> dict:
    """Finetune a cross-encoder reranker; the step's ``model/`` is a CrossEncoder folder (set
    ``retrieval.reranker`` to it)."""
    from docqa.data import DEFAULT_QA, load_qa, split_qa
    from training.reranker import finetune_reranker

    cfg: RerankerStep = ctx.config
    pairs = train_pairs_for(ctx, cfg.limit, cfg.seed)
    heldout = split_qa(load_qa(ctx.csv or DEFAULT_QA, duplicates=True))[1]
    with step_dir(ctx.out, ctx.name) as tmp:
        metrics = finetune_reranker(cfg, pairs, heldout, tmp / "model")
        return finish(
            tmp,
            "reranker",
            cfg,
            inputs={"base": cfg.base, "docs": cfg.docs, "csv": ctx.csv, "pairs": len(pairs)},
            metrics=metrics,
        )


@register("gate", GateStep, needs=(Need("gguf"),), produces={"gate": PROV})
def run_gate(ctx: StepContext) -> dict:
    """Evaluate the new GGUF against the published model; record whether it passed."""
    from training.gate import compare, published_model

    cfg: GateStep = ctx.config
    gguf = ctx.input("gguf")
    from docqa.provenance import sha256_file

    with step_dir(ctx.out, ctx.name) as tmp:
        sha = sha256_file(gguf)  # what was judged: publish ships only this file
        result = compare(str(gguf), cfg)
        (tmp / "comparison.json").write_text(json.dumps(result, indent=2))
        return finish(
            tmp,
            "gate",
            cfg,
            inputs={"candidate": str(gguf), "against": published_model(cfg)},
            metrics=result,
            passed=result["passed"],
            sha256=sha,
        )


class GateRefused(RuntimeError):
    pass


@register(
    "publish",
    PublishStep,
    needs=(Need("gguf"), Need("gate", optional=True)),
    produces={"published": "published.json"},
)
def run_publish(ctx: StepContext) -> dict:
    """Copy the GGUF into the model store with its provenance (refused when the gate failed);
    optionally hot-reload a running server."""
    from docqa.provenance import read_provenance
    from models.store import ModelStore
    from training.publish import notify_server

    cfg: PublishStep = ctx.config
    gguf = ctx.input("gguf")
    gate_prov = read_provenance(ctx.input("gate")) if ctx.has("gate") else None
    if ctx.has("gate") and ctx.recipe.gate.enforce:
        if gate_prov is None:
            raise GateRefused("publish needs a gate result: run the gate step first")
        if not gate_prov.get("passed"):
            raise GateRefused("the gate refused this model; the published model stays")
        from docqa.provenance import sha256_file

        if gate_prov.get("sha256") != sha256_file(gguf):
            raise GateRefused(
                f"the gate judged another file than {gguf} (it was made again since): run "
                "the gate again; the published model stays"
            )
        if gate_prov.get("config_hash") != config_hash(ctx.recipe.gate):
            raise GateRefused(
                "the gate's verdict was made under another gate config than the recipe's "
                "(margin, min_gain, ... changed since): run the gate again; the published "
                "model stays"
            )
    # the provenance of the step that made the GGUF (export, or quant_select: its choice table)
    upstream = {"export": read_provenance(gguf.parent / PROV), "gate": gate_prov}
    with step_dir(ctx.out, ctx.name) as tmp:
        name = cfg.name or ctx.recipe.export.name
        from docqa.settings import load_settings

        store_dir = cfg.store_dir or load_settings().model.store_dir
        resolved = ModelStore(store_dir).publish(gguf, name, upstream)
        reloaded = notify_server(cfg, resolved.id)
        shutil.copyfile(resolved.path.with_suffix(".json"), tmp / "published.json")
        return finish(
            tmp,
            "publish",
            cfg,
            inputs={"gguf": str(gguf)},
            metrics={"published": str(resolved.path), "reloaded": reloaded},
        )
