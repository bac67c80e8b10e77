"""GET /v1/models: clean ids only (Jan hides models whose id looks like a path)."""

from __future__ import annotations

from fastapi import Request


def list_models(request: Request) -> dict:
    state = request.app.state
    engine = state.engine
    created = int(getattr(state, "loaded_at", 0))
    data = [
        {
            "id": engine.model.id,
            "object": "model",
            "created": created,
            "owned_by": "docqa",
            "meta": {"n_ctx": engine.n_ctx, "retrieval": False},
        }
    ]
    if getattr(state, "rag", None) is not None:
        data.insert(
            0,
            {
                "id": state.settings.retrieval.rag_model_id,
                "object": "model",
                "created": created,
                "owned_by": "docqa",
                "meta": {"n_ctx": engine.n_ctx, "retrieval": True, "base": engine.model.id},
            },
        )
    return {"object": "list", "data": data}
