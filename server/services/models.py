"""GET /v1/models: clean ids only (Jan hides models whose id looks like a path)."""

from __future__ import annotations

from docqa.settings import Settings
from server.runtime import ModelManager


def list_models(settings: Settings, models: ModelManager, has_rag: bool) -> dict:
    rt = models.current()
    created = int(rt.loaded_at)
    data = [
        {
            "id": rt.id,
            "object": "model",
            "created": created,
            "owned_by": "docqa",
            "meta": {"n_ctx": rt.n_ctx, "retrieval": False},
        }
    ]
    if has_rag:
        data.insert(
            0,
            {
                "id": settings.retrieval.rag_model_id,
                "object": "model",
                "created": created,
                "owned_by": "docqa",
                "meta": {"n_ctx": rt.n_ctx, "retrieval": True, "base": rt.id},
            },
        )
    return {"object": "list", "data": data}
