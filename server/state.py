"""The application's typed state: the resources ``lifespan`` builds and the services made from
them. Each resource has one owner: the ``ModelManager`` owns the model runtime, the
``IndexService`` owns the served index; ``Services.close`` closes what it created."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from docqa.settings import Settings
from server.runtime import ModelManager
from server.services.chat import ChatService
from server.services.documents import DocumentsService
from server.services.index import IndexService, open_index, open_shared_index
from server.services.rag import RagService
from server.services.ticket_queue import FILE_NAME as QUEUE_FILE
from server.services.ticket_queue import TicketQueue
from server.services.tickets import TicketService

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    models: ModelManager
    embedder: object | None  # retrieval.embedder.Embedder
    index: IndexService | None
    documents: DocumentsService | None
    rag: RagService | None
    chat: ChatService
    tickets: TicketService | None
    queue: TicketQueue | None = None  # the agent page's ticket queue (opened on first use)
    reranker: object | None = None  # retrieval.reranker.CrossEncoderReranker (retrieval.reranker)

    @classmethod
    def build(
        cls,
        settings: Settings,
        stop: threading.Event | None = None,
        on_wait: Callable[[str | None], None] | None = None,
    ) -> Services:
        """Load the model, the embedder and the index (blocking; run in a thread). ``stop``
        ends a wait for the shared store; ``on_wait`` hears why the server is not ready."""
        models = ModelManager(settings)
        rt = models.start()
        try:
            embedder = None
            if settings.embedder.enabled:
                from retrieval.factory import load_embedder

                embedder = load_embedder(settings.embedder)
                embedder.warm()  # the query encoder is built (or read from cache) now
            index = documents = rag = tickets = None
            r = settings.retrieval
            reranker = None
            if r.reranker:
                from retrieval.factory import load_reranker

                reranker = load_reranker(settings)  # one for the retrievers and /v1/rerank
            if r.index_dir is not None or r.docs_dir is not None or r.database_url:
                if embedder is None:
                    raise ValueError("retrieval needs the embedder (embedder.enabled: true)")
                if r.database_url:
                    index = open_shared_index(
                        settings, embedder, rt.chunk_tokenizer(), stop, on_wait, reranker
                    )
                else:
                    index = open_index(settings, embedder, rt.chunk_tokenizer(), reranker)
                documents = DocumentsService(r, index, models, settings.server.limits)
                rag = RagService(r, index)
                tickets = TicketService(settings, models, rag)
        except BaseException:
            models.close()
            raise
        chat = ChatService(settings, models, rag)
        queue = TicketQueue(
            settings.server.data_dir / QUEUE_FILE, tickets, settings.tickets.queue_lease_s
        )
        return cls(
            settings, models, embedder, index, documents, rag, chat, tickets, queue, reranker
        )

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
        if self.index is not None:
            self.index.close()
        self.models.close()


@dataclass
class AppState:
    """What ``app.state.docqa`` holds: settings at once, services once loaded."""

    settings: Settings
    services: Services | None = None
    load_error: str | None = None
    waiting: str | None = None  # why loading waits (the shared store is unreachable)
