"""One-query encoders for the retrieval hot path: MiniLM-style Transformer + mean pooling +
normalize as a single graph.

- ``onnx-int8`` (default): the graph exported to ONNX and its weights quantized to int8 per
  output channel (dynamic quantization), run by ONNX Runtime. On the 2-core development
  machine one query takes ~2.5 ms against ~8-10 ms for TorchScript fp32; the vector stays
  within cosine 0.98 of the fp32 one (checked at export, recorded in the provenance) and the
  retrieval figures in docs/benchmarks.md are unchanged by it. Documents are still embedded
  in fp32; only queries take this path.
- ``torchscript``: the fp32 module traced and frozen (equal to sentence-transformers to 1e-5).
- ``eager``: the fp32 module as is.

The ONNX model is built once per (weights, versions) and cached under ``cache_dir`` with a
provenance JSON beside it; it is written into a temporary folder and renamed into place
(``docqa.atomic``), so a crash mid-export never leaves a half model that a later start would
load. The provenance also records the embedding size and the query token limit, so a later
start can find and run the cached model (``cached_onnx_int8``) with ONNX Runtime and the
model folder's ``tokenizer.json`` alone, without importing torch or sentence-transformers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from docqa.atomic import atomic_dir
from docqa.paths import cache_root
from docqa.provenance import make_provenance, read_provenance, write_provenance

log = logging.getLogger(__name__)

FORMAT = 1
MIN_COSINE = 0.98  # an export whose probe vectors drift further is rejected
PROBES = [
    "How do I install it?",
    "What is the default port of the server and how do I change it?",
    "Which parameter sets the number of GPU layers when loading a model?",
    "error: context length exceeded",
]


def default_cache_dir() -> Path:
    return cache_root() / "embedders"


def pooled_module(model):
    """Transformer + attention-masked mean pooling + L2 normalization as one torch module."""
    import torch

    class _Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, mask):
            out = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(out.dtype)
            vec = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vec, dim=-1)

    return _Encoder().eval()


def trace(module, batch):
    """TorchScript-traced and frozen copy of ``module`` (raises when tracing fails)."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape-dependent branches
        tr = torch.jit.trace(
            module, (batch["input_ids"], batch["attention_mask"]), check_trace=False, strict=False
        )
        return torch.jit.optimize_for_inference(torch.jit.freeze(tr))


class OnnxInt8Encoder:
    """ONNX Runtime session over the int8 model; ``__call__(ids, mask)`` -> [batch, dim]."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"ids": ids.astype(np.int64), "mask": mask.astype(np.int64)}
        return self.session.run(None, feed)[0]


def _export(model, tokenizer, out: Path) -> None:
    """fp32 ONNX export of the pooled encoder, then dynamic int8 per-channel quantization."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    batch = tokenizer(["export probe sentence"], return_tensors="pt")
    fp32 = out.with_name("model.fp32.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pooled_module(model),
            (batch["input_ids"], batch["attention_mask"]),
            str(fp32),
            input_names=["ids", "mask"],
            output_names=["vec"],
            dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "vec": {0: "b"}},
            opset_version=17,
            dynamo=False,
        )
    logging.disable(logging.WARNING)  # the quantizer logs every tensor on the root logger
    try:
        quantize_dynamic(fp32, out, per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    fp32.unlink()


def _entry(model_dir: Path, fingerprint: str, cache_dir: Path | None) -> Path:
    """The cache folder for (weights, format, torch and ONNX Runtime versions). The torch
    version is read from the installed package's metadata (the same string as
    ``torch.__version__``): finding a cached model imports no torch."""
    import onnxruntime

    torch_version = importlib.metadata.version("torch")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key_src = json.dumps([FORMAT, fingerprint, torch_version, onnxruntime.__version__])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return cache_dir / f"{model_dir.parent.name}-{model_dir.name}-{key}"


def _cached(final: Path) -> dict | None:
    prov = read_provenance(final / "provenance.json")
    if (final / "model.int8.onnx").is_file() and prov and prov.get("kind") == "query-encoder":
        return prov
    return None


def cached_onnx_int8(
    model_dir: Path, fingerprint: str, cache_dir: Path | None = None
) -> tuple[Path, dict] | None:
    """(model path, export config) of the cached int8 encoder when there is one that records
    the embedding size (``dim``) and query token limit (``max_seq_length``), else None.
    Imports neither torch nor sentence-transformers."""
    final = _entry(model_dir, fingerprint, cache_dir)
    prov = _cached(final)
    config = (prov or {}).get("config") or {}
    if prov is None or not {"dim", "max_seq_length"} <= set(config):
        return None
    return final / "model.int8.onnx", config


def build_onnx_int8(
    model,
    tokenizer,
    model_dir: Path,
    fingerprint: str,
    reference,
    cache_dir: Path | None = None,
    shape: dict | None = None,
) -> Path:
    """Path of the cached int8 ONNX query encoder for ``model``, exported when missing.

    ``fingerprint``: the embedder's weights hash (``Embedder.fingerprint``, also what index
    manifests record), part of the cache key. ``reference(texts) -> np.ndarray`` gives the
    fp32 vectors the export is checked against. ``shape``: ``dim`` and ``max_seq_length``,
    recorded in the provenance's config for ``cached_onnx_int8``.
    """
    final = _entry(model_dir, fingerprint, cache_dir)
    model_path = final / "model.int8.onnx"
    if _cached(final) is not None:
        return model_path

    with atomic_dir(final) as tmp:  # replaces a stale entry; a failed export leaves none
        _export(model, tokenizer, tmp / "model.int8.onnx")
        enc = OnnxInt8Encoder(tmp / "model.int8.onnx", threads=1)
        ref = reference(PROBES)
        cos = []
        for text, r in zip(PROBES, ref):
            b = tokenizer([text], return_tensors="np")
            cos.append(float(enc(b["input_ids"], b["attention_mask"])[0] @ r))
        if min(cos) < MIN_COSINE:
            raise RuntimeError(f"int8 query encoder drifts from fp32 (cosine {min(cos):.3f})")
        record = make_provenance(
            "query-encoder",
            inputs={"model_dir": str(model_dir), "weights_sha256": fingerprint},
            config={
                "format": FORMAT,
                "opset": 17,
                "quantization": "dynamic int8 per-channel",
                **(shape or {}),
            },
            metrics={"probe_min_cosine_vs_fp32": min(cos), "probes": len(PROBES)},
        )  # versions (torch, onnxruntime, onnx...) are recorded by make_provenance
        write_provenance(tmp / "provenance.json", record)
    log.info("int8 ONNX query encoder written to %s (min cosine %.4f)", final, min(cos))
    return model_path
