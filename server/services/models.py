"""Model names: GET /v1/models (clean ids only: Jan hides models whose id looks like a path),
GET /v1/models/{id}, and which served model a requested name means (real ids, the
``model.aliases`` table, and the ``server.unknown_model`` policy for everything else)."""

from __future__ import annotations

from docqa.settings import Settings
from server.errors import APIError
from server.runtime import ModelManager, ModelRuntime


class ModelNames:
    """Resolves the ``model`` field of a request to what is served. Chat and completions
    resolve to the model's id or the retrieval id; embeddings to the embedder."""

    def __init__(self, settings: Settings, has_rag: bool):
        self.aliases = dict(settings.model.aliases)
        self.unknown = settings.server.unknown_model
        self.rag_id = settings.retrieval.rag_model_id
        self.has_rag = has_rag

    def _not_found(self, requested: str, known: list[str]) -> APIError:
        return APIError(
            404,
            f"The model '{requested}' does not exist. Available: {', '.join(known)}",
            param="model",
            code="model_not_found",
        )

    def chat_ids(self, rt: ModelRuntime) -> list[str]:
        return ([self.rag_id] if self.has_rag else []) + [rt.id]

    def chat(self, rt: ModelRuntime, requested: str | None) -> tuple[str, bool]:
        """-> (model id to report, answer with retrieval) for chat and text completions, or
        404 (``unknown_model: error``)."""
        default = (self.rag_id, True) if self.has_rag else (rt.id, False)
        if not requested:
            return default
        name = self.aliases.get(requested, requested)
        if name == rt.id:
            return rt.id, False
        if self.has_rag and name == self.rag_id:
            return self.rag_id, True
        if self.unknown == "default":
            return default
        raise self._not_found(requested, self.chat_ids(rt) + sorted(self.aliases))

    def embedding(self, requested: str | None, embedder_names: set[str]) -> None:
        """Accept ``requested`` for /v1/embeddings (and /v1/rerank) or raise 404."""
        if not requested or requested in embedder_names:
            return
        if self.aliases.get(requested) in embedder_names or self.unknown == "default":
            return
        raise self._not_found(requested, sorted(embedder_names))

    def model_object(
        self, rt: ModelRuntime, model_id: str, embedder_name: str | None = None
    ) -> dict:
        """GET /v1/models/{id}: the object of a served id or alias (unknown names: the
        default model with ``unknown_model: default``, else 404)."""
        objects = {o["id"]: o for o in _objects(rt, self.rag_id, self.has_rag)}
        if embedder_name:
            objects[embedder_name] = _object(embedder_name, rt, {"embeddings": True})
        if model_id in objects:
            return objects[model_id]
        target = self.aliases.get(model_id)
        if target is None and self.unknown == "default":
            target = self.rag_id if self.has_rag else rt.id
        if target not in objects:
            raise self._not_found(model_id, list(objects) + sorted(self.aliases))
        obj = dict(objects[target], id=model_id)
        obj["meta"] = dict(obj["meta"], alias_of=target)
        return obj


def _object(model_id: str, rt: ModelRuntime, meta: dict) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": int(rt.loaded_at),
        "owned_by": "docqa",
        "meta": meta,
    }


def _objects(rt: ModelRuntime, rag_id: str, has_rag: bool) -> list[dict]:
    data = [_object(rt.id, rt, {"n_ctx": rt.n_ctx, "retrieval": False})]
    if has_rag:
        data.insert(0, _object(rag_id, rt, {"n_ctx": rt.n_ctx, "retrieval": True, "base": rt.id}))
    return data


def list_models(settings: Settings, models: ModelManager, has_rag: bool) -> dict:
    """The served ids only (aliases are not listed: Jan and others show every id)."""
    rt = models.current()
    return {"object": "list", "data": _objects(rt, settings.retrieval.rag_model_id, has_rag)}
