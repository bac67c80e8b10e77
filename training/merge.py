"""SLERP merge with mergekit, configured in mergekit's own YAML schema. Without a given
config (the CPU world) the second model is a variant of the base made by a short SFT on the
Q&A data, and the two are SLERP-merged."""

from __future__ import annotations

import logging
from pathlib import Path

from training.config import MergeStep, TrainCommon

log = logging.getLogger(__name__)


def slerp_config(base: Path, other: Path, t, dtype: str = "float32") -> dict:
    n_layers = _n_layers(base)
    return {
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, n_layers]},
                    {"model": str(other), "layer_range": [0, n_layers]},
                ]
            }
        ],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": t},
        "dtype": dtype,
    }


def _n_layers(path: Path) -> int:
    import json

    return int(json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"])


def run_mergekit(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    mc = MergeConfiguration.model_validate(config)
    run_merge(
        mc,
        str(out),
        options=MergeOptions(
            copy_tokenizer=True, lazy_unpickle=False, low_cpu_memory=False, quiet=True
        ),
    )
    return out


def slerp_merge(cfg: MergeStep, base: Path | None, work: Path, qa_pairs=None) -> dict:
    import yaml

    metrics: dict = {}
    if cfg.mergekit is not None:
        config = cfg.mergekit
    else:
        from training.data import sft_examples
        from training.hf import load_causal_lm, save_hf
        from training.lora import train_sft

        variant_cfg = cfg.variant or TrainCommon(max_steps=4, learning_rate=1e-4)
        model, tok = load_causal_lm(base)
        examples = sft_examples(qa_pairs or [], rag=False)
        variant, m = train_sft(model, tok, examples, variant_cfg, work / "variant-train")
        save_hf(variant, tok, work / "variant")
        metrics["variant"] = {k: v for k, v in m.items() if k != "losses"}
        config = slerp_config(base, work / "variant", cfg.t)
    (work / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_mergekit(config, work / "hf")
    metrics["merge_method"] = config.get("merge_method")
    return metrics
