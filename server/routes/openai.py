"""OpenAI-compatible routes: thin, the work is in services."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.auth import require_api_key, require_ready
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from server.services import generation as gen
from server.services.chat import prepare_chat, prepare_completion
from server.services.embeddings import create_embeddings
from server.services.models import list_models

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(require_ready)])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _respond(request: Request, prep: gen.Prepared, stream: bool):
    state = request.app.state
    job = gen.submit(state.engine, prep, state.settings.server.retry_after_s)
    if stream:
        return StreamingResponse(
            gen.stream(request, prep, job), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    return await gen.whole(request, prep, job)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    prep = await prepare_chat(request, body)
    return await _respond(request, prep, body.stream)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest):
    prep = prepare_completion(request, body)
    return await _respond(request, prep, body.stream)


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest):
    return await create_embeddings(request, body)


@router.get("/models")
async def models(request: Request):
    return list_models(request)
