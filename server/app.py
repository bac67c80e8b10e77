"""App factory. The lifespan builds the typed services (model runtime, embedder, index) in a
background thread, so ``GET /health`` answers 503 while loading and 200 when ready, and closes
them at shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from docqa.settings import Settings
from server.errors import install_error_handlers
from server.middleware import AccessLog
from server.routes import admin, openai, retrieval, tickets
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
    settings = settings or Settings()
    app = FastAPI(title="docqa", version="0.1.0", lifespan=lifespan)
    app.state.docqa = AppState(settings)
    install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.server.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(AccessLog)
    app.include_router(openai.router)
    app.include_router(retrieval.router)
    app.include_router(tickets.router)
    app.include_router(admin.router)

    @app.get("/health")
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
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, 503)
        body = {"status": "loading"}
        if state.waiting:
            body["waiting"] = state.waiting
        return JSONResponse(body, 503, headers={"Retry-After": "1"})

    return app
