"""The served index: its owner. Opens (or builds) it at start-up, answers searches with the
current retriever, and replaces it atomically (disk first, then memory) on ingest/delete, so
queries never see a half-built index."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from docqa.settings import Settings
from retrieval.builder import Tokenizer, build_index, embedder_info
from retrieval.factory import build_retriever
from retrieval.index import (
    Index,
    assemble,
    check_index_dir,
    load_index,
    new_manifest,
    recover_index,
    save_index,
)
from retrieval.pgstore import PgStore, StoreUnavailable, Watcher, redact
from retrieval.search import Retriever, SearchResult
from server import metrics

log = logging.getLogger(__name__)


class IndexService:
    def __init__(
        self,
        retriever: Retriever,
        index_dir: Path | None,
        store: PgStore | None = None,
        version: int = 0,
    ):
        self._retriever = retriever
        self.index_dir = index_dir
        self.write_lock = threading.Lock()  # one writer at a time (ingest, delete)
        self.store = store  # the shared PostgreSQL store, when retrieval.database_url is set
        self.version = version  # the store version the served index holds
        self.watcher: Watcher | None = None

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
        t0 = time.perf_counter()
        try:
            return self._retriever.search(query, top_k, path_prefix=path_prefix, mode=mode)
        finally:
            metrics.RETRIEVAL.observe(time.perf_counter() - t0)

    def replace(self, new: Index) -> None:
        """Serve ``new``: written to disk first (a failure keeps the old one), then swapped in.
        Call with ``write_lock`` held."""
        if self.index_dir is not None:
            save_index(new, self.index_dir)
        retriever = self._retriever.with_index(new)
        retriever.idf  # noqa: B018 - evidence weights built here, not on the first request
        self._retriever = retriever

    # -- the shared store (retrieval.database_url) ---------------------------------------
    def update(self, change: Callable[[Index], Index]) -> Index:
        """Serve ``change(index)`` and keep it: in the shared store when there is one (one
        transaction: ``change`` runs on the store's latest index, the store is written, and
        only a committed write is served), else on disk (``replace``). Call with
        ``write_lock`` held. Raises ``StoreUnavailable`` when the database is unreachable."""
        if self.store is None:
            new = change(self.index)
            self.replace(new)
            return new
        with self.store.transaction() as tx:
            # the store's index: ours, unless another replica wrote since our last refresh
            stored = self.index if tx.version == self.version else tx.load()
            new = change(stored if stored is not None else self.index)
            tx.apply(stored, new)  # None: rewritten whole
        self._serve(new, tx.version)
        return new

    def _serve(self, new: Index, version: int) -> None:
        retriever = self._retriever.with_index(new)
        retriever.idf  # noqa: B018 - evidence weights built here, not on the first request
        self._retriever = retriever
        self.version = version

    def refresh(self) -> bool:
        """Load the store's index when its version differs from the one served. -> changed."""
        if self.store is None or self.store.version() == self.version:
            return False
        with self.write_lock:
            version, index = self.store.load()
            if version == self.version or index is None:
                return False
            self._serve(index, version)
        log.info("index refreshed from the store: version %d, %d chunks", version, len(index))
        return True

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.store is not None:
            self.store.close()


def open_index(settings: Settings, embedder, tok: Tokenizer, reranker=None) -> IndexService:
    """The index ``settings.retrieval`` names: loaded from ``index_dir`` (by ``load_index``:
    its backup when a save died mid-swap, put back in place and leftovers removed first), else
    built from ``docs_dir`` (and saved to ``index_dir`` when given), else an empty one to
    ingest into."""
    r = settings.retrieval
    found = recover_index(r.index_dir) if r.index_dir is not None else None
    if r.index_dir is not None and found is None:
        check_index_dir(r.index_dir)  # not a folder of other files, which a save would delete
    if found is not None:
        index = load_index(r.index_dir)
    elif r.docs_dir is not None:
        index = build_index(
            r.docs_dir, embedder, tok, size=r.chunk_tokens, overlap=r.chunk_overlap, progress=False
        )
        if r.index_dir is not None:
            save_index(index, r.index_dir)
    else:
        log.warning("no index at %s: starting with an empty one", r.index_dir)
        index = _empty(settings, embedder, tok)
    retriever = build_retriever(index, settings, embedder, reranker=reranker)
    retriever.idf  # noqa: B018 - evidence weights built at start-up, not on the first request
    log.info("retrieval ready: %d chunks", len(index))
    return IndexService(retriever, Path(r.index_dir) if r.index_dir else None)


def open_shared_index(
    settings: Settings,
    embedder,
    tok: Tokenizer,
    stop: threading.Event | None = None,
    on_wait: Callable[[str | None], None] | None = None,
    reranker=None,
) -> IndexService:
    """The index in the shared store ``retrieval.database_url``: connects (retrying every
    ``db_retry_s`` while the database is unreachable, logging why; ``on_wait`` hears the
    reason, then None once connected), migrates the schema, fills an empty store from
    ``index_dir`` (a built index) or ``docs_dir`` when given, loads the index into memory
    and starts watching for changes."""
    r = settings.retrieval
    stop = stop or threading.Event()
    store = PgStore(r.database_url, r.db_pool_size, r.db_connect_timeout_s)
    while True:
        try:
            store.open()
            store.migrate()
            break
        except StoreUnavailable as exc:
            store.close()
            why = "shared store unreachable"  # the details (host, error) go to the log only
            log.warning("%s: %s; not ready, retrying in %.0fs", why, exc, r.db_retry_s)
            if on_wait is not None:
                on_wait(why)
            if stop.wait(r.db_retry_s):
                raise RuntimeError("stopped while waiting for the shared store") from exc
    if on_wait is not None:
        on_wait(None)
    try:
        version, index = store.load()
        if index is None:
            with store.transaction() as tx:  # one replica fills it; the others wait, then read
                index = tx.load()
                if index is None:
                    if r.index_dir is not None and (Path(r.index_dir) / "manifest.json").is_file():
                        index = load_index(r.index_dir, mmap=False)  # seeds the store
                    elif r.docs_dir is not None:
                        index = build_index(
                            r.docs_dir,
                            embedder,
                            tok,
                            size=r.chunk_tokens,
                            overlap=r.chunk_overlap,
                            progress=False,
                        )
                    else:
                        index = _empty(settings, embedder, tok)
                    tx.apply(None, index)
            version = tx.version
        retriever = build_retriever(index, settings, embedder, reranker=reranker)
        retriever.idf  # noqa: B018 - evidence weights built at start-up
        service = IndexService(retriever, None, store=store, version=version)
        service.watcher = Watcher(
            r.database_url, service.refresh, r.db_refresh_s, r.db_retry_s, r.db_connect_timeout_s
        )
        service.watcher.start()
    except BaseException:
        store.close()
        raise
    log.info(
        "retrieval ready from the shared store %s: version %d, %d chunks",
        redact(r.database_url),
        version,
        len(index),
    )
    return service


def _empty(settings: Settings, embedder, tok: Tokenizer) -> Index:
    r = settings.retrieval
    manifest = new_manifest(
        "",
        {},
        {"chunk_tokens": r.chunk_tokens, "chunk_overlap": r.chunk_overlap, "tokenizer": tok.name},
        embedder_info(embedder),  # what check_embedder compares after ingests and restarts
    )
    return assemble([], np.zeros((0, embedder.dim), dtype=np.float32), manifest)


__all__ = ["IndexService", "StoreUnavailable", "open_index", "open_shared_index"]
