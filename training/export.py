"""GGUF export: llama.cpp's converter (HF folder -> F16 GGUF), llama.cpp quantization, and
the ``export`` training step that chains them."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from models.store import quantize
from training.artifacts import finish, step_dir
from training.config import ExportStep
from training.registry import Need, StepContext, register

log = logging.getLogger(__name__)


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """Convert an HF model folder to a GGUF file with llama.cpp's ``convert_hf_to_gguf``."""
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


@register("export", ExportStep, needs=(Need("model"),), produces={"gguf": "model.gguf"})
def run_export(ctx: StepContext) -> dict:
    """Convert the model to GGUF and quantize it with llama.cpp."""
    from docqa.provenance import sha256_file

    cfg: ExportStep = ctx.config
    src = ctx.input("model")
    with step_dir(ctx.out, ctx.name) as tmp:
        if cfg.quant.upper() in ("F16", "F32", "BF16"):  # the converter writes these itself
            final = convert_to_gguf(src, tmp / "model.gguf", cfg.quant.lower())
        else:
            f16 = convert_to_gguf(src, tmp / "model.f16.gguf")
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
