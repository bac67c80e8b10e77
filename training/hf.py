"""Hugging Face model helpers: load a base (HF folder or GGUF), save cleanly, device choice."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_causal_lm(source: str | Path, dtype: str = "float32", store_dir: str | None = None):
    """-> (model, tokenizer). ``source``: an HF folder, a GGUF path or a store name. A GGUF is
    dequantized by transformers, then copied into a fresh model so it saves without the
    GGUF ``quantization_config``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tdtype = getattr(torch, dtype)
    if is_hf_dir(source):
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=tdtype)
        tok = AutoTokenizer.from_pretrained(str(source))
        return model, tok
    from models.store import ModelStore

    if store_dir is None:  # the settings' store, as the server and the gate read it
        from docqa.settings import load_settings

        store_dir = load_settings().model.store_dir
    gguf = ModelStore(store_dir).resolve(str(source)).path
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=tdtype
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    for k in ("_name_or_path", "transformers_version", "architectures"):
        cfg.pop(k, None)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=tdtype)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return fresh, tok


def save_hf(model, tok, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def weight_delta(a, b) -> float:
    """Largest absolute difference between two models' matching parameters."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return max(float(torch.max(torch.abs(sa[k].float() - sb[k].float()))) for k in sa if k in sb)
