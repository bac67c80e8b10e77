"""OpenAI-compatible routes: thin, the work is in services."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server import deps
from server.auth import require_api_key
from server.errors import APIError
from server.runtime import ModelManager, ModelRuntime, RuntimeClosed
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
)
from server.services import generation as gen
from server.services.chat import ChatService
from server.services.embeddings import create_embeddings
from server.services.models import list_models
from server.services.rerank import rerank as rerank_documents
from server.state import Services

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(deps.services)])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def peer(request: Request) -> gen.Peer:
    def record(usage: dict, reason: str) -> None:
        request.state.usage = usage
        request.state.finish_reason = reason

    return gen.Peer(request.is_disconnected, record)


def acquire(models: ModelManager, retry_after: int):
    try:
        return models.acquire()
    except RuntimeClosed as exc:
        raise APIError(
            503, f"{exc}; retry", code="model_loading", headers={"Retry-After": str(retry_after)}
        ) from exc


async def respond(
    request: Request,
    chat: ChatService,
    stream: bool,
    prepare: Callable[[ModelRuntime], gen.Prepared],
):
    """Admit, prepare, submit and write one request, all on one leased model runtime. A place
    in the engine's queue is reserved first (503 + Retry-After when there is none, before any
    work); the preparation (retrieval, chat template, tokenization) then runs in a worker
    thread, off the event loop, and the place becomes the job (or is freed on any error). The
    lease is released when the answer (or the stream) ends."""
    retry_after = chat.settings.server.retry_after_s
    held = acquire(chat.models, retry_after)
    try:
        with gen.reserve(held.runtime, chat.settings.server) as slot:
            prep = await anyio.to_thread.run_sync(prepare, held.runtime)
            job = gen.submit(slot, held.runtime, prep, chat.settings.server)
    except BaseException:
        held.release()
        raise
    if stream:

        def closed() -> None:  # also when the stream never started (client gone before)
            job.cancel()
            held.release()

        return StreamingResponse(
            gen.stream(peer(request), prep, job, on_close=held.release),
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
            background=BackgroundTask(closed),
        )
    try:
        return await gen.whole(peer(request), prep, job)
    finally:
        held.release()


@router.post("/chat/completions")
async def chat_completions(
    request: Request, body: ChatCompletionRequest, chat: ChatService = Depends(deps.chat)
):
    return await respond(request, chat, body.stream, lambda rt: chat.prepare_chat(rt, body))


@router.post("/completions")
async def completions(
    request: Request, body: CompletionRequest, chat: ChatService = Depends(deps.chat)
):
    return await respond(request, chat, body.stream, lambda rt: chat.prepare_completion(rt, body))


@router.post("/embeddings")
async def embeddings(
    request: Request, body: EmbeddingRequest, s: Services = Depends(deps.services)
):
    out = await create_embeddings(s.embedder, s.settings.embedder, body, s.chat.names)
    request.state.usage = out["usage"] | {"completion_tokens": 0}
    return out


@router.post("/rerank")
async def rerank(request: Request, body: RerankRequest, s: Services = Depends(deps.services)):
    cap = s.settings.retrieval.rerank_max_documents
    out = await rerank_documents(s.embedder, cap, body, s.reranker)
    request.state.usage = out["usage"] | {"completion_tokens": 0}
    return out


@router.get("/models")
async def models(s: Services = Depends(deps.services)):
    return list_models(s.settings, s.models, s.rag is not None)


@router.get("/models/{model_id:path}")
async def model(model_id: str, s: Services = Depends(deps.services)):
    embedder = s.embedder.name if s.embedder is not None else None
    return s.chat.names.model_object(s.models.current(), model_id, embedder)
