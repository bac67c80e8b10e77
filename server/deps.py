"""FastAPI dependencies: the typed state and the services routers ask for. The only place
that reads ``request.app.state``."""

from __future__ import annotations

from fastapi import Depends, Request

from server.errors import APIError
from server.runtime import ModelManager
from server.services.chat import ChatService
from server.services.documents import DocumentsService
from server.services.index import IndexService
from server.services.ticket_queue import TicketQueue
from server.services.tickets import TicketService
from server.state import AppState, Services


def app_state(request: Request) -> AppState:
    return request.app.state.docqa


def services(state: AppState = Depends(app_state)) -> Services:
    """The loaded services, or 503 while loading (or after a failed load)."""
    if state.services is None:
        msg = (
            "the model failed to load (the reason is in the server log)"
            if state.load_error
            else "model is loading, retry shortly"
        )
        raise APIError(503, msg, code="model_loading", headers={"Retry-After": "1"})
    return state.services


def models(s: Services = Depends(services)) -> ModelManager:
    return s.models


def chat(s: Services = Depends(services)) -> ChatService:
    return s.chat


def _no_index(what: str) -> APIError:
    return APIError(
        404,
        f"{what}: start docqa with --index or --docs",
        code="retrieval_disabled",
    )


def index(s: Services = Depends(services)) -> IndexService:
    if s.index is None:
        raise _no_index("retrieval is not enabled")
    return s.index


def documents(s: Services = Depends(services)) -> DocumentsService:
    if s.documents is None:
        raise _no_index("retrieval is not enabled")
    return s.documents


def tickets(s: Services = Depends(services)) -> TicketService:
    if s.tickets is None:
        raise _no_index("ticket replies need an index")
    return s.tickets


def ticket_queue(s: Services = Depends(services)) -> TicketQueue:
    if s.queue is None:
        raise APIError(404, "the ticket queue is not enabled", code="queue_disabled")
    return s.queue


def max_upload_bytes(state: AppState = Depends(app_state)) -> int:
    return state.settings.server.max_upload_bytes


def retry_after(state: AppState = Depends(app_state)) -> int:
    return state.settings.server.retry_after_s
