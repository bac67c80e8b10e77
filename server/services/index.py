"""The served index: its owner. Opens (or builds) it at start-up, answers searches with the
current retriever, and replaces it atomically (disk first, then memory) on ingest/delete, so
queries never see a half-built index."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from docqa.settings import Settings
from retrieval.builder import Tokenizer, build_index
from retrieval.factory import build_retriever
from retrieval.index import (
    Index,
    assemble,
    load_index,
    new_manifest,
    recover_index,
    save_index,
)
from retrieval.search import Retriever, SearchResult

log = logging.getLogger(__name__)


class IndexService:
    def __init__(self, retriever: Retriever, index_dir: Path | None):
        self._retriever = retriever
        self.index_dir = index_dir
        self.write_lock = threading.Lock()  # one writer at a time (ingest, delete)

    @property
    def retriever(self) -> Retriever:
        return self._retriever

    @property
    def index(self) -> Index:
        return self._retriever.index

    @property
    def embedder(self):
        return self._retriever.embedder

    def search(
        self,
        query: str,
        top_k: int | None = None,
        path_prefix: str | None = None,
        mode: str | None = None,
    ) -> SearchResult:
        return self._retriever.search(query, top_k, path_prefix=path_prefix, mode=mode)

    def replace(self, new: Index) -> None:
        """Serve ``new``: written to disk first (a failure keeps the old one), then swapped in.
        Call with ``write_lock`` held."""
        if self.index_dir is not None:
            save_index(new, self.index_dir)
        retriever = self._retriever.with_index(new)
        retriever.idf  # noqa: B018 - evidence weights built here, not on the first request
        self._retriever = retriever


def open_index(settings: Settings, embedder, tok: Tokenizer) -> IndexService:
    """The index ``settings.retrieval`` names: loaded from ``index_dir`` (by ``load_index``:
    its backup when a save died mid-swap, put back in place and leftovers removed first), else
    built from ``docs_dir`` (and saved to ``index_dir`` when given), else an empty one to
    ingest into."""
    r = settings.retrieval
    if r.index_dir is not None and recover_index(r.index_dir) is not None:
        index = load_index(r.index_dir)
    elif r.docs_dir is not None:
        index = build_index(
            r.docs_dir, embedder, tok, size=r.chunk_tokens, overlap=r.chunk_overlap, progress=False
        )
        if r.index_dir is not None:
            save_index(index, r.index_dir)
    else:
        log.warning("no index at %s: starting with an empty one", r.index_dir)
        manifest = new_manifest(
            "",
            {},
            {
                "chunk_tokens": r.chunk_tokens,
                "chunk_overlap": r.chunk_overlap,
                "tokenizer": tok.name,
            },
            {"name": embedder.name},
        )
        index = assemble([], np.zeros((0, embedder.dim), dtype=np.float32), manifest)
    retriever = build_retriever(index, settings, embedder)
    retriever.idf  # noqa: B018 - evidence weights built at start-up, not on the first request
    log.info("retrieval ready: %d chunks", len(index))
    return IndexService(retriever, Path(r.index_dir) if r.index_dir else None)
