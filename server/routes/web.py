"""The support agents' page: ``/`` and its static files under ``/web/`` (plain HTML, CSS and
JS in ``server/web``, no CDN, nothing fetched from outside the server). The page calls the
``/v1`` API like any client, with the API key the agent gives it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from retrieval.loaders import SUPPORTED
from server.deps import app_state
from server.errors import APIError
from server.services.ticket_queue import TICKET_SUFFIXES
from server.state import AppState

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = WEB_DIR / name
    if path.suffix not in _TYPES or path.parent != WEB_DIR or not path.is_file():
        raise APIError(404, f"no file /web/{name}", code="not_found")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
async def page():
    return _file("index.html")


@router.get("/web/config.json")
async def config(state: AppState = Depends(app_state)):
    """What the page needs before the key: whether it must ask for one, and the upload cap."""
    s = state.settings
    return {
        "auth": s.server.api_key is not None,
        "max_upload_bytes": s.server.max_upload_bytes,
        "rag_model": s.retrieval.rag_model_id,
        "document_types": sorted(SUPPORTED),
        "ticket_types": list(TICKET_SUFFIXES),
    }


@router.get("/web/{name}")
async def static(name: str):
    return _file(name)
