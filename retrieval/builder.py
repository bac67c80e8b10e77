"""Build and update indexes: load → chunk (model tokens) → embed → BM25 → atomic save.

Updates reuse the embeddings of chunks whose id (hash of path + content) is unchanged, so
re-ingesting a file only embeds what changed and never duplicates a chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrieval.chunking import Chunk, chunk_document
from retrieval.index import Index, assemble, file_sha, new_manifest
from retrieval.loaders import Document, LoadReport, load_tree

log = logging.getLogger(__name__)


@dataclass
class Tokenizer:
    """Model tokenizer used for chunk sizes (the served GGUF's vocabulary)."""

    name: str
    tokenize: object
    detokenize: object

    @classmethod
    def from_gguf(cls, path: str | Path, name: str) -> Tokenizer:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return cls.from_llama(llm, name)

    @classmethod
    def from_llama(cls, llm, name: str) -> Tokenizer:
        def tok(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

        def detok(ids: list[int]) -> str:
            return llm.detokenize(ids).decode("utf-8", errors="ignore")

        return cls(name, tok, detok)


def default_tokenizer(model: str = "smollm2-135m-instruct", store_dir: str | Path = "models/store"):
    from models.store import ModelStore

    resolved = ModelStore(store_dir).resolve(model)
    return Tokenizer.from_gguf(resolved.path, resolved.id)


def chunk_documents(docs: list[Document], tok: Tokenizer, size: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    seen: set[str] = set()
    for doc in docs:
        for c in chunk_document(doc, tok.tokenize, tok.detokenize, size, overlap):
            if c.id not in seen:
                seen.add(c.id)
                chunks.append(c)
    return chunks


def _embed(chunks: list[Chunk], embedder, reuse: dict[str, np.ndarray], progress: bool):
    todo = [c for c in chunks if c.id not in reuse]
    vecs = dict(reuse)
    if todo:
        batch = 64
        bar = tqdm(total=len(todo), desc="embedding", unit="chunk", disable=not progress)
        for i in range(0, len(todo), batch):
            part = todo[i : i + batch]
            for c, v in zip(part, embedder.embed([c.search_text for c in part])):
                vecs[c.id] = v
            bar.update(len(part))
        bar.close()
    dim = embedder.dim
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([vecs[c.id] for c in chunks]).astype(np.float32)


def embed_documents(index: Index, embedder, tok: Tokenizer, docs: list[Document]) -> dict:
    """The vectors of ``docs``' chunks that ``index`` lacks, chunked as ``index`` is: the slow
    part of an ingest, done before a shared store's write transaction opens
    (``update_index(..., vectors=)``), not while it holds the store's lock."""
    cfg = index.manifest.get("config", {})
    size, overlap = cfg.get("chunk_tokens", 300), cfg.get("chunk_overlap", 30)
    todo = [c for c in chunk_documents(list(docs), tok, size, overlap) if c.id not in index.pos]
    if not todo:
        return {}
    return dict(zip([c.id for c in todo], _embed(todo, embedder, {}, False)))


def _config(size: int, overlap: int, tok: Tokenizer) -> dict:
    return {"chunk_tokens": size, "chunk_overlap": overlap, "tokenizer": tok.name}


def embedder_info(embedder) -> dict:
    info = {"name": embedder.name, "path": str(embedder.path), "dim": embedder.dim}
    fingerprint = getattr(embedder, "fingerprint", None)
    if fingerprint:
        info["fingerprint"] = fingerprint
    return info


def build_index(
    docs_root: str | Path,
    embedder,
    tok: Tokenizer,
    *,
    size: int = 300,
    overlap: int = 30,
    progress: bool = True,
    report: LoadReport | None = None,
    questions: list | None = None,
) -> Index:
    """``questions``: Q&A pairs (``.question``, ``.answer``) to attach to the chunks that hold
    their answers (question-augmented indexing, ``retrieval.questions``)."""
    report = report if report is not None else LoadReport()
    docs = load_tree(docs_root, report)
    chunks = chunk_documents(docs, tok, size, overlap)
    log.info("%d files -> %d chunks (%d skipped)", len(docs), len(chunks), len(report.skipped))
    emb = _embed(chunks, embedder, {}, progress)
    files = {d.path: {"sha256": file_sha(d.text), "title": d.title} for d in docs}
    manifest = new_manifest(
        str(Path(docs_root).resolve()), files, _config(size, overlap, tok), embedder_info(embedder)
    )
    manifest["skipped"] = report.skipped
    attached = None
    if questions:
        from retrieval.questions import attach_questions

        attached = attach_questions(questions, chunks, embedder, progress)
        log.info("attached %d of %d questions", attached.n_attached, len(attached))
    return assemble(chunks, emb, manifest, attached)


def update_index(
    index: Index,
    embedder,
    tok: Tokenizer,
    *,
    add: list[Document] = (),
    remove: list[str] = (),
    progress: bool = False,
    vectors: dict[str, np.ndarray] | None = None,
) -> Index:
    """A new index with ``remove`` paths dropped and ``add`` documents (re)placed; chunks
    found in ``vectors`` (``embed_documents``, computed earlier) are not embedded again."""
    cfg = index.manifest.get("config", {})
    size, overlap = cfg.get("chunk_tokens", 300), cfg.get("chunk_overlap", 30)
    replaced = {d.path for d in add} | set(remove)
    missing = [p for p in remove if p not in index.files]
    if missing:
        raise KeyError(f"not in the index: {', '.join(missing)}")
    kept = [c for c in index.chunks if c.path not in replaced]
    new = chunk_documents(list(add), tok, size, overlap)
    known = {c.id for c in kept}
    new = [c for c in new if c.id not in known]
    reuse = {c.id: np.asarray(index.embeddings[index.pos[c.id]]) for c in index.chunks}
    reuse.update(vectors or {})
    chunks = kept + new
    emb = _embed(chunks, embedder, {c.id: reuse[c.id] for c in chunks if c.id in reuse}, progress)
    manifest = {k: v for k, v in index.manifest.items()}
    files = {p: v for p, v in index.files.items() if p not in replaced}
    for d in add:
        files[d.path] = {"sha256": file_sha(d.text), "title": d.title}
    manifest["inputs"] = {**manifest.get("inputs", {}), "files": files}
    history = list(manifest.get("updates", []))
    history.append({"added": sorted(d.path for d in add), "removed": sorted(remove)})
    manifest["updates"] = history[-50:]
    questions = index.questions.reattach(chunks) if index.questions is not None else None
    return assemble(chunks, emb, manifest, questions)
