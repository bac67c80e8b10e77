"""Hugging Face model helpers: load a base (HF folder or GGUF), save cleanly, device choice."""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections import OrderedDict
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
    model_type, cfg, weights, generation, tok = _read_gguf(gguf, tdtype)
    cfg = copy.deepcopy(cfg)  # transformers fills nested dicts (rope parameters) in place
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=tdtype)
    fresh.load_state_dict(weights)  # copied into the fresh model's own tensors
    fresh.generation_config = copy.deepcopy(generation)
    tok = copy.deepcopy(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return fresh, tok


# The small GGUF files read in this process, dequantized: transformers parses a file three
# times (config, weights, tokenizer; ~40 s for the embedded 135M model on 2 cores, mostly its
# 49k-entry vocabulary read field by field), and the training steps and tests load the same
# bases again and again (the embedded Q4_1 and its F16). Readings are kept, most recent first,
# while their dequantized weights add up to at most this (each of those two takes 0.54 GB as
# fp32); a reading larger than it is never kept.
_GGUF_KEEP_MAX_BYTES = 1200 * 2**20
_gguf_read: OrderedDict[tuple, tuple[tuple, int]] = OrderedDict()


def _read_gguf(gguf: Path, tdtype) -> tuple:
    """(model_type, config dict, weights, generation config, tokenizer) of a GGUF file, for a
    fresh model to be built from (the caller copies what it keeps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = (str(gguf.resolve()), st.st_size, st.st_mtime_ns, str(tdtype))
    if key in _gguf_read:
        _gguf_read.move_to_end(key)
        return _gguf_read[key][0]
    _memoize_gguf_name_maps()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=tdtype
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    for k in ("_name_or_path", "transformers_version", "architectures"):
        cfg.pop(k, None)
    weights = loaded.state_dict()
    read = (model_type, cfg, weights, loaded.generation_config, tok)
    # tied weights (the embeddings and the output layer) share one storage: counted once
    size = sum({t.untyped_storage().data_ptr(): t.nbytes for t in weights.values()}.values())
    if size <= _GGUF_KEEP_MAX_BYTES:
        _gguf_read[key] = (read, size)
        while sum(n for _, n in _gguf_read.values()) > _GGUF_KEEP_MAX_BYTES:
            _gguf_read.popitem(last=False)
    return read


def _memoize_gguf_name_maps() -> None:
    """transformers maps GGUF tensor names to its own by walking every submodule of the model
    and building gguf-py's ``TensorNameMap`` (every architecture's names for every block) again
    for each: ~12 s of a 135M model's ~43 s load on 2 cores. The map depends only on the
    architecture and the block count and is only read, so one per pair is kept."""
    try:
        import gguf  # transformers imports the function from the package on each call
    except ImportError:  # no gguf-py: from_pretrained says what is missing
        return
    fn = getattr(gguf, "get_tensor_name_map", None)
    if fn is None or hasattr(fn, "cache_info"):
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(fn)


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
