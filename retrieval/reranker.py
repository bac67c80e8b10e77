"""The cross-encoder reranker: scores (query, chunk) pairs read together by one small BERT
(``docqa train reranker``: all-MiniLM-L6-v2 with a one-logit head, finetuned on the Q&A pairs
labelled to their chunks). ``retrieval.reranker`` names its folder; the retriever factory
loads it once and the retriever reorders the top ``retrieval.rerank_candidates`` fused
candidates with it before the ``top_k`` cut. POST /v1/rerank scores with it too.

Scores are relevance probabilities in 0..1 (the sigmoid of the head's logit).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


class CrossEncoderReranker:
    """A local sentence-transformers CrossEncoder folder with one output (relevance logit).
    Thread-safe (calls are serialized: one CPU-bound forward at a time)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int | None = None,
    ):
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"reranker not found: {path} (retrieval.reranker must be a local cross-encoder "
                "folder, e.g. the model/ folder `docqa train rebuild --recipe reranker-nitro` "
                "writes)"
            )
        from sentence_transformers import CrossEncoder

        self.path = p
        self.model = CrossEncoder(str(p), device=device, max_length=max_length)
        if self.model.num_labels != 1:
            raise ValueError(f"{p}: a reranker has one output, not {self.model.num_labels}")
        self.batch_size = batch_size
        self.name = f"cross-encoder:{p.parent.name if p.name == 'model' else p.name}"
        self._lock = threading.Lock()

    def logits(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        import torch

        if not pairs:
            return np.zeros(0, dtype=np.float64)
        with self._lock:
            out = self.model.predict(
                [list(p) for p in pairs],
                batch_size=self.batch_size,
                activation_fn=torch.nn.Identity(),
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Relevance in 0..1 of each (query, document) pair."""
        return sigmoid(self.logits(pairs))

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        return self.predict([(query, d) for d in documents])

    def count_tokens(self, texts: list[str]) -> int:
        tok = self.model.tokenizer
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
