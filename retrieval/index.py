"""The on-disk index: plain arrays + JSON + provenance, written atomically, loaded with mmap.

Layout of an index directory::

    manifest.json    provenance: docs root, files + hashes, chunking, embedder, versions
    chunks.jsonl     one chunk per line (id, path, heading, text, n_tokens, ord)
    embeddings.npy   float32 [n_chunks, dim], L2-normalized, row i = chunk i
    bm25/            term_ptr.npy, doc_ids.npy, weights.npy, bm25.json
    questions.jsonl  optional: attached Q&A pool (question, answer, chunk_id or null)
    question_embeddings.npy  optional: float32 [n_questions, dim], row i = question i
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from docqa.atomic import atomic_dir, recover, resolve
from docqa.provenance import make_provenance, write_provenance
from retrieval.bm25 import BM25, tokenize
from retrieval.chunking import Chunk
from retrieval.questions import Questions

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # written last: an index folder holding it is complete


@dataclass
class Index:
    chunks: list[Chunk]
    embeddings: np.ndarray
    bm25: BM25
    manifest: dict[str, Any] = field(default_factory=dict)
    questions: Questions | None = None

    def __post_init__(self):
        self.pos = {c.id: i for i, c in enumerate(self.chunks)}

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest.setdefault("inputs", {}).setdefault("files", {})


def file_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def assemble(
    chunks: list[Chunk],
    embeddings: np.ndarray,
    manifest: dict[str, Any],
    questions: Questions | None = None,
) -> Index:
    """BM25 indexes each chunk's heading trail + text, plus its attached questions if any."""
    attached = questions.by_chunk() if questions is not None else {}
    bm25 = BM25.build(
        [tokenize("\n".join([c.search_text, *attached.get(c.id, [])])) for c in chunks]
    )
    manifest = dict(manifest)
    manifest["n_chunks"] = len(chunks)
    manifest["format_version"] = FORMAT_VERSION
    if questions is not None:
        manifest["questions"] = {"pool": len(questions), "attached": questions.n_attached}
    else:
        manifest.pop("questions", None)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    return Index(chunks, emb, bm25, manifest, questions)


def new_manifest(docs_root: str, files: dict[str, dict], config: dict, embedder: dict) -> dict:
    return make_provenance(
        "index",
        inputs={"docs_root": docs_root, "files": files},
        config=config,
        embedder=embedder,
    )


def _write_into(index: Index, d: Path) -> None:
    with open(d / "chunks.jsonl", "w") as f:
        for c in index.chunks:
            f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
    np.save(d / "embeddings.npy", index.embeddings)
    index.bm25.save(d / "bm25")
    if index.questions is not None:
        with open(d / "questions.jsonl", "w") as f:
            for r in index.questions.rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        np.save(d / "question_embeddings.npy", index.questions.embeddings)
    write_provenance(d / MANIFEST, index.manifest)  # last: marks the dir complete


class NotAnIndex(ValueError):
    """An index folder that exists, holds files and is not an index: replacing it would delete
    them (``retrieval.index_dir`` pointed at the docs, say)."""


def check_index_dir(path: str | Path) -> None:
    """``NotAnIndex`` when ``path`` is a folder holding files but no index; a missing or empty
    folder, or an index, may be written."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
        raise NotAnIndex(
            f"{path} holds files but is not an index (no {MANIFEST}): docqa will not replace "
            "it; set retrieval.index_dir (--index) to an index folder or to a new one"
        )


def save_index(index: Index, out: str | Path) -> Path:
    """Write to a temp dir beside ``out`` then swap it in; a failure leaves ``out`` as it was.
    ``NotAnIndex`` (nothing written) when ``out`` holds other files."""
    out = Path(out)
    check_index_dir(out)
    with atomic_dir(out) as tmp:
        _write_into(index, tmp)
    log.info("index written to %s (%d chunks)", out, len(index))
    return out


class EmbedderMismatch(ValueError):
    """The index's vectors come from another embedder than the one that would query them."""


def check_embedder(index: Index, embedder) -> None:
    """Refuse to pair an index with an embedder other than the one that built it (different
    dimension, or different weights when both are known): dense scores would be meaningless."""
    built = index.manifest.get("embedder") or {}
    dim, fp = built.get("dim"), built.get("fingerprint")
    mine = getattr(embedder, "fingerprint", None)
    if (dim is not None and dim != embedder.dim) or (fp and mine and fp != mine):
        raise EmbedderMismatch(
            f"the index was built with embedder {built.get('name')!r} (dim {dim}, weights {fp}) "
            f"but the configured embedder is {embedder.name!r} (dim {embedder.dim}, weights "
            f"{mine}): rebuild the index with this embedder (docqa index build) or set "
            "embedder.model to the one that built it"
        )


def find_index(path: str | Path) -> Path | None:
    """The complete index ``load_index(path)`` reads: ``path``, or its backup when a save died
    between its two renames (``docqa.atomic.resolve``); None when there is neither."""
    found = resolve(path, MANIFEST)
    return found if (found / MANIFEST).is_file() else None


def recover_index(path: str | Path) -> Path | None:
    """For the process that owns the index folder ``path`` (the server, at start): a backup
    left by a crash is put back in place, and leftover temporary folders and backups are
    removed once ``path`` holds a complete index (``docqa.atomic.recover``). -> ``find_index``."""
    recover(path, MANIFEST)
    return find_index(path)


def load_index(path: str | Path, mmap: bool = True) -> Index:
    """Read the index at ``path`` (or its backup: ``find_index``); ``FileNotFoundError`` when
    there is none."""
    found = find_index(path)
    if found is None:
        raise FileNotFoundError(f"no index at {path} (missing {MANIFEST})")
    path = found
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"index {path} has format {manifest.get('format_version')}, "
            f"expected {FORMAT_VERSION}; rebuild it"
        )
    with open(path / "chunks.jsonl") as f:
        chunks = [Chunk(**json.loads(line)) for line in f if line.strip()]
    emb = np.load(path / "embeddings.npy", mmap_mode="r" if mmap else None)
    bm25 = BM25.load(path / "bm25", mmap=mmap)
    if len(chunks) != emb.shape[0] or bm25.n_docs != len(chunks):
        raise ValueError(
            f"index {path} is inconsistent: {len(chunks)} chunks, "
            f"{emb.shape[0]} embeddings, {bm25.n_docs} bm25 docs"
        )
    questions = None
    if (path / "questions.jsonl").is_file():
        with open(path / "questions.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        qemb = np.load(path / "question_embeddings.npy", mmap_mode="r" if mmap else None)
        if len(rows) != qemb.shape[0]:
            raise ValueError(f"index {path}: {len(rows)} questions, {qemb.shape[0]} vectors")
        questions = Questions(rows, qemb)
    return Index(chunks, emb, bm25, manifest, questions)
