"""One library function per training step. Each reads its inputs from earlier step
directories, writes its artifact into a temp dir with a provenance JSON, and only then
replaces the step's directory."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from training.artifacts import finish, step_dir, step_path
from training.config import (
    BaseStep,
    DPOStep,
    EmbedderStep,
    ExportStep,
    GateStep,
    MergeStep,
    PublishStep,
    SFTStep,
    SynthStep,
)

log = logging.getLogger(__name__)
HF_STEPS = ("sft", "dpo", "merge", "base")


def latest_hf(out: Path, before: str, order: list[str]) -> Path:
    """The HF model made by the last model-producing step before ``before`` in the recipe."""
    prior = order[: order.index(before)] if before in order else order
    for step in reversed(prior):
        if step in HF_STEPS and (step_path(out, step) / "hf" / "config.json").is_file():
            return step_path(out, step) / "hf"
    raise FileNotFoundError(f"no model before step {before!r}: run 'base' first")


def run_base(cfg: BaseStep, out: Path) -> dict:
    from training.hf import load_causal_lm, save_hf

    with step_dir(out, "base") as tmp:
        model, tok = load_causal_lm(cfg.source, cfg.dtype)
        save_hf(model, tok, tmp / "hf")
        n = sum(p.numel() for p in model.parameters())
        return finish(tmp, "base", cfg, inputs={"source": cfg.source}, metrics={"parameters": n})


def run_synth(cfg: SynthStep, out: Path) -> dict:
    from training.synth import synthesize

    with step_dir(out, "synth") as tmp:
        stats = synthesize(cfg, tmp / "pairs.jsonl", cache=out / ".synth-cache")
        return finish(
            tmp,
            "synth",
            cfg,
            inputs={"docs": cfg.docs, "endpoint": cfg.endpoint, "csv": cfg.csv},
            metrics=stats,
        )


def _pairs_for(out: Path, csv: str | None, limit: int | None, seed: int = 0):
    """Train pairs: the synth step's output when present, else the train split of the CSV."""
    from docqa.data import QAPair
    from training.data import train_pairs

    synth = step_path(out, "synth") / "pairs.jsonl"
    if synth.is_file():
        rows = [json.loads(x) for x in synth.read_text().splitlines() if x.strip()]
        pairs = [QAPair(r["question"], r["answer"]) for r in rows]
        import random

        from docqa.data import is_heldout

        pairs = [p for p in pairs if not is_heldout(p.question)]
        return random.Random(seed).sample(pairs, min(limit, len(pairs))) if limit else pairs
    return train_pairs(csv, limit, seed)


def run_sft(cfg: SFTStep, out: Path, order: list[str], csv: str | None = None) -> dict:
    from training.data import sft_examples
    from training.hf import load_causal_lm, save_hf, weight_delta
    from training.lora import train_sft

    src = latest_hf(out, "sft", order)
    # the grounded target skips pairs, so it draws from every (shuffled) pair up to the limit
    skips = cfg.rag and cfg.target == "grounded"
    pairs = _pairs_for(out, csv, None if skips else cfg.limit, cfg.seed)
    if skips:
        import random

        random.Random(cfg.seed).shuffle(pairs)
    examples = sft_examples(
        pairs,
        rag=cfg.rag,
        k=cfg.k_chunks,
        p_missing=cfg.p_gold_missing,
        target=cfg.target,
        seed=cfg.seed,
        limit=cfg.limit,
    )
    with step_dir(out, "sft") as tmp:
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
            inputs={"model": str(src), "pairs": len(pairs), "examples": len(examples)},
            metrics=metrics,
        )


def run_dpo(cfg: DPOStep, out: Path, order: list[str], csv: str | None = None) -> dict:
    from training.dpo_data import build_pairs, load_pairs
    from training.hf import load_causal_lm, save_hf, weight_delta
    from training.lora import train_dpo

    src = latest_hf(out, "dpo", order)
    model, tok = load_causal_lm(src)
    if cfg.pairs:
        pairs = load_pairs(cfg.pairs)[: cfg.n_pairs]
    else:
        pairs = build_pairs(model, tok, _pairs_for(out, csv, cfg.n_pairs, cfg.seed), cfg)
    with step_dir(out, "dpo") as tmp:
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


def run_merge(cfg: MergeStep, out: Path, order: list[str], csv: str | None = None) -> dict:
    from training.merge import slerp_merge

    src = latest_hf(out, "merge", order)
    with step_dir(out, "merge") as tmp:
        metrics = slerp_merge(
            cfg, src, tmp, _pairs_for(out, csv, 64) if cfg.mergekit is None else None
        )
        return finish(tmp, "merge", cfg, inputs={"base": str(src)}, metrics=metrics)


def run_embedder(cfg: EmbedderStep, out: Path, csv: str | None = None) -> dict:
    """Finetune the retrieval embedder; the step's ``model/`` is a sentence-transformers folder
    (set ``embedder.model`` to it and rebuild the index)."""
    from docqa.data import DEFAULT_QA, load_qa, split_qa
    from training.embedder import finetune_embedder

    pairs = _pairs_for(out, csv, cfg.limit, cfg.seed)
    heldout = split_qa(load_qa(csv or DEFAULT_QA, duplicates=True))[1]
    with step_dir(out, "embedder") as tmp:
        metrics = finetune_embedder(cfg, pairs, heldout, tmp / "model")
        return finish(
            tmp,
            "embedder",
            cfg,
            inputs={"base": cfg.base, "docs": cfg.docs, "csv": csv, "pairs": len(pairs)},
            metrics=metrics,
        )


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    cmd = [
        sys.executable,
        "-m",
        "convert_hf_to_gguf",
        str(hf_dir),
        "--outfile",
        str(out_file),
        "--outtype",
        outtype,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"GGUF conversion failed:\n{r.stderr[-2000:]}")
    return out_file


def quantize(src: Path, dst: Path, quant: str) -> Path:
    import ctypes

    import llama_cpp

    name = quant.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown quantization {quant!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp quantization to {quant} failed (rc={rc})")
    return dst


def run_export(cfg: ExportStep, out: Path, order: list[str]) -> dict:
    from docqa.provenance import sha256_file

    src = latest_hf(out, "export", order)
    with step_dir(out, "export") as tmp:
        f16 = convert_to_gguf(src, tmp / "model.f16.gguf")
        if cfg.quant.upper() in ("F16", "F32"):
            final = f16.rename(tmp / "model.gguf")
        else:
            final = quantize(f16, tmp / "model.gguf", cfg.quant)
            f16.unlink()
        return finish(
            tmp,
            "export",
            cfg,
            inputs={"model": str(src)},
            metrics={"size_bytes": final.stat().st_size},
            sha256=sha256_file(final),
            quant=cfg.quant,
        )


def run_gate(cfg: GateStep, out: Path) -> dict:
    from training.gate import compare

    gguf = step_path(out, "export") / "model.gguf"
    if not gguf.is_file():
        raise FileNotFoundError("gate needs the export step's model.gguf")
    with step_dir(out, "gate") as tmp:
        result = compare(str(gguf), cfg)
        (tmp / "comparison.json").write_text(json.dumps(result, indent=2))
        return finish(
            tmp,
            "gate",
            cfg,
            inputs={"candidate": str(gguf), "against": cfg.against},
            metrics=result,
            passed=result["passed"],
        )


class GateRefused(RuntimeError):
    pass


def run_publish(cfg: PublishStep, out: Path, export: ExportStep, gate: GateStep | None) -> dict:
    from docqa.provenance import read_provenance
    from models.store import ModelStore
    from training.publish import notify_server

    gguf = step_path(out, "export") / "model.gguf"
    gate_prov = read_provenance(step_path(out, "gate") / "provenance.json")
    if gate is not None and gate.enforce:
        if gate_prov is None:
            raise GateRefused("publish needs a gate result: run the gate step first")
        if not gate_prov.get("passed"):
            raise GateRefused("the gate refused this model; the published model stays")
    upstream = {
        "export": read_provenance(step_path(out, "export") / "provenance.json"),
        "gate": gate_prov,
    }
    with step_dir(out, "publish") as tmp:
        resolved = ModelStore(cfg.store_dir).publish(gguf, export.name, upstream)
        reloaded = notify_server(cfg, resolved.id)
        shutil.copyfile(resolved.path.with_suffix(".json"), tmp / "published.json")
        return finish(
            tmp,
            "publish",
            cfg,
            inputs={"gguf": str(gguf)},
            metrics={"published": str(resolved.path), "reloaded": reloaded},
        )
