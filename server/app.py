"""App factory. The lifespan builds the typed services (model runtime, embedder, index) in a
background thread, so ``GET /health`` answers 503 while loading and 200 when ready, and closes
them at shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse

from docqa.settings import Settings
from server.auth import check_exposure, require_api_key
from server.errors import CatchAll, install_error_handlers
from server.middleware import AccessLog, BodyGuard
from server.openapi import error_responses
from server.routes import admin, metrics, openai, retrieval, ticket_queue, tickets, web
from server.state import AppState, Services

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: AppState = app.state.docqa

    stop = threading.Event()  # ends a wait for the shared store at shutdown

    def waiting(why: str | None) -> None:
        state.waiting = why

    async def load():
        try:
            state.services = await asyncio.to_thread(Services.build, state.settings, stop, waiting)
            log.info("docqa ready")
        except Exception as exc:  # noqa: BLE001
            log.exception("loading failed")
            state.load_error = f"{type(exc).__name__}: {exc}"

    task = asyncio.create_task(load())
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        if state.services is not None:
            await asyncio.to_thread(state.services.close)
            state.services = None


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings``; raises ``InsecureSettings`` for a server reachable beyond
    loopback with writes open to anyone (see ``server.auth.check_exposure``)."""
    settings = settings or Settings()
    check_exposure(settings.server)
    app = FastAPI(
        title="docqa",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served below, behind the API key like the rest
        redoc_url=None,
        openapi_url=None,
    )
    app.state.docqa = AppState(settings)
    install_error_handlers(app)
    # Outermost last: AccessLog > CORS > CatchAll > BodyGuard > routes (CORS outside the
    # catch-all, so that a browser client reads an unexpected 500 too, not a CORS failure).
    app.add_middleware(
        BodyGuard,
        max_body_bytes=settings.server.limits.max_body_bytes,
        origins=settings.server.cors_origins,
        multipart_paths=["/v1/documents", "/v1/tickets/queue"],
        multipart_max_bytes=settings.server.max_upload_bytes + 64 * 1024,
    )
    app.add_middleware(CatchAll)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.server.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(AccessLog)
    app.include_router(openai.router, responses=error_responses(400, 401, 404, 413, 415, 503))
    app.include_router(retrieval.router, responses=error_responses(400, 401, 404, 413, 415, 503))
    app.include_router(tickets.router, responses=error_responses(400, 401, 404, 413, 415, 503))
    app.include_router(
        ticket_queue.router, responses=error_responses(400, 401, 404, 409, 413, 415, 503)
    )
    app.include_router(admin.router, responses=error_responses(400, 401, 403, 404, 413, 415, 503))
    if settings.server.web_ui:
        app.include_router(web.router)
    app.include_router(metrics.router, responses=error_responses(401))

    keyed = [Depends(require_api_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi_json():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="docqa API")

    @app.get("/redoc", include_in_schema=False, dependencies=keyed)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="docqa API")

    @app.get("/health", responses=error_responses(503))
    async def health():
        state: AppState = app.state.docqa
        s = state.services
        if s is not None:
            rt = s.models.current()
            out = {"status": "ok", "model": rt.id, "busy": rt.busy}
            endpoints = getattr(rt, "endpoints", None)  # remote generation (server.remote)
            if endpoints is not None:
                out["endpoints"] = endpoints
            if s.embedder is not None:
                out["embedder"] = {"name": s.embedder.name, "query_backend": s.embedder.backend}
            return out
        if state.load_error:  # the reason is in the server log, not for every caller
            return JSONResponse({"status": "error"}, 503)
        body = {"status": "loading"}
        if state.waiting:  # a short reason only (no connection details): see the log
            body["waiting"] = state.waiting
        return JSONResponse(body, 503, headers={"Retry-After": "1"})

    return app
