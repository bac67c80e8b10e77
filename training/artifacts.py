"""Step artifact directories: written to a temp dir and renamed into place on success, so a
failed step leaves every earlier artifact (and the previous run of the same step) untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from docqa.atomic import atomic_dir
from docqa.provenance import make_provenance, read_provenance, write_provenance

PROV = "provenance.json"


def config_hash(cfg) -> str:
    data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def step_path(out: Path, step: str) -> Path:
    return Path(out) / step


def done(out: Path, step: str, cfg=None) -> dict | None:
    """The step's provenance when it completed (with the same config, if given)."""
    prov = read_provenance(step_path(out, step) / PROV)
    if prov is None:
        return None
    if cfg is not None and prov.get("config_hash") != config_hash(cfg):
        return None
    return prov


def step_dir(out: Path, step: str):
    """A context manager yielding a temp dir; on success it replaces ``out/step``; on failure
    it is removed (``docqa.atomic.atomic_dir``)."""
    return atomic_dir(step_path(out, step))


# steps whose artifacts depend on docqa's settings (DOCQA_CONFIG, DOCQA_* variables): they
# build served prompts (RAG examples, the model's own answers) or serve models to evaluate
SETTINGS_STEPS = frozenset({"sft", "samples", "dpo", "gate", "quant_select"})


def served_settings() -> dict:
    """The settings a step's served prompts and evaluations follow: the retrieval and embedder
    sections and the model's prompt-shaping fields (secrets masked)."""
    from docqa.settings import load_settings

    s = load_settings()
    m = s.model
    return {
        "retrieval": s.retrieval.model_dump(mode="json"),
        "embedder": s.embedder.model_dump(mode="json"),
        "model": {"model": m.model, "n_ctx": m.n_ctx, "chat_format": m.chat_format},
    }


def finish(tmp: Path, step: str, cfg, *, inputs: dict, metrics: dict, **extra) -> dict:
    if step in SETTINGS_STEPS and "settings" not in extra:
        extra["settings"] = served_settings()
    record = make_provenance(
        f"training.{step}",
        inputs=inputs,
        config=cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg,
        metrics=metrics,
        config_hash=config_hash(cfg),
        **extra,
    )
    write_provenance(tmp / PROV, record)
    return record
