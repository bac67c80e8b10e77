"""The one place that turns settings into retrieval objects.

Every retriever — the server's, ``docqa index query``, evaluation, the retrieval-augmented
training data, benchmarks — is built by ``build_retriever`` from the same
``RetrievalSettings``, so they all see the same hits for the same query and index.
"""

from __future__ import annotations

import logging
from pathlib import Path

from docqa.settings import EmbedderSettings, Settings
from retrieval.index import Index, load_index
from retrieval.search import Retriever, SearchConfig

log = logging.getLogger(__name__)


def load_embedder(es: EmbedderSettings, model: str | Path | None = None):
    """The embedder ``es`` describes (``model`` overrides which weights: an index's own)."""
    from retrieval.embedder import Embedder

    return Embedder(
        str(model or es.model),
        device=es.device,
        batch_size=es.batch_size,
        query_backend=es.query_backend,
        query_threads=es.query_threads,
        cache_dir=es.cache_dir,
    )


def index_embedder(index: Index, es: EmbedderSettings):
    """The embedder an index was built with (its manifest's model folder when it is still
    there, else its recorded name), run as ``es`` says; ``check_embedder`` confirms it."""
    from retrieval.embedder import built_with

    return load_embedder(es, built_with(index))


def load_reranker(settings: Settings, path: str | Path | None = None):
    """The cross-encoder ``retrieval.reranker`` names (``path`` overrides it), or None when
    reranking is off. Loaded once by its owner (``Services``) and shared by its retrievers."""
    path = path or settings.retrieval.reranker
    if not path:
        return None
    from retrieval.reranker import CrossEncoderReranker

    return CrossEncoderReranker(path, device=settings.embedder.device)


def build_retriever(
    index: Index | str | Path, settings: Settings, embedder=None, *, reranker=None
) -> Retriever:
    """A retriever over ``index`` (an ``Index`` or its directory) searching as
    ``settings.retrieval`` says. ``embedder`` defaults to the index's own; the reranker to the
    configured one (pass one to share it between retrievers; False: none, the fused order)."""
    if not isinstance(index, Index):
        index = load_index(index)
    if embedder is None:
        embedder = index_embedder(index, settings.embedder)
    if reranker is None:
        reranker = load_reranker(settings)
    elif reranker is False:
        reranker = None
    return Retriever(
        index, embedder, SearchConfig.from_settings(settings.retrieval), reranker=reranker
    )
