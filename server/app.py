"""App factory. The lifespan loads the model, embedder and index onto ``app.state`` in a
background thread, so ``GET /health`` answers 503 while loading and 200 when ready."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from docqa.settings import Settings
from models.store import ModelStore
from server.engine import Engine, LoadedModel, chat_formatter, load_llama
from server.errors import install_error_handlers
from server.middleware import AccessLog

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> LoadedModel:
    m = settings.model
    resolved = ModelStore(m.store_dir).resolve(m.model)
    t0 = time.perf_counter()
    llm = load_llama(
        resolved.path,
        n_ctx=m.n_ctx,
        n_batch=m.n_batch,
        n_threads=m.n_threads,
        n_gpu_layers=m.n_gpu_layers,
    )
    log.info(
        "model %s loaded from %s in %.2fs", resolved.id, resolved.path, time.perf_counter() - t0
    )
    return LoadedModel(resolved.id, resolved.path, llm, chat_formatter(llm), resolved.provenance)


def _load_everything(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    model = load_model(settings)
    if settings.model.n_parallel > 1:
        from server.batch_engine import BatchEngine

        app.state.engine = BatchEngine(
            model,
            settings.server.max_queue,
            n_seq=settings.model.n_parallel,
            n_batch=settings.model.n_batch,
            n_threads=settings.model.n_threads,
        )
    else:
        app.state.engine = Engine(model, settings.server.max_queue)
    if settings.embedder.enabled:
        app.state.embedder = settings.embedder.load()
        app.state.embedder.warm()  # the query encoder is built (or read from cache) now
    r = settings.retrieval
    if r.index_dir is not None or r.docs_dir is not None:
        from server.services.rag import build_rag

        app.state.rag = build_rag(settings, app.state.embedder, app.state.engine)
    app.state.loaded_at = time.time()


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.ready = False
    app.state.load_error = None
    app.state.engine = None
    app.state.embedder = None
    app.state.rag = None

    async def load():
        try:
            await asyncio.to_thread(_load_everything, app)
            app.state.ready = True
            log.info("docqa ready")
        except Exception as exc:  # noqa: BLE001
            log.exception("loading failed")
            app.state.load_error = f"{type(exc).__name__}: {exc}"

    task = asyncio.create_task(load())
    try:
        yield
    finally:
        task.cancel()
        engine = app.state.engine
        if engine is not None:
            await asyncio.to_thread(engine.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="docqa", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.server.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(AccessLog)

    from server.routes import admin, openai, retrieval, tickets

    app.include_router(openai.router)
    app.include_router(retrieval.router)
    app.include_router(tickets.router)
    app.include_router(admin.router)

    @app.get("/health")
    async def health():
        if app.state.ready:
            engine, emb = app.state.engine, app.state.embedder
            out = {"status": "ok", "model": engine.model.id, "busy": engine.busy}
            if emb is not None:
                out["embedder"] = {"name": emb.name, "query_backend": emb.backend}
            return out
        if app.state.load_error:
            return JSONResponse({"status": "error", "error": app.state.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})

    return app
