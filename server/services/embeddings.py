"""POST /v1/embeddings with the loaded embedder (float or base64 output)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from docqa.settings import EmbedderSettings
from server.errors import APIError, bad_request
from server.schemas import EmbeddingRequest


def _texts(embedder, inp) -> list[str]:
    if isinstance(inp, str):
        return [inp]
    if inp and isinstance(inp[0], str):
        return list(inp)
    if inp and isinstance(inp[0], int):
        inp = [inp]
    n_vocab = len(embedder.tokenizer)
    if any(not 0 <= t < n_vocab for ids in inp for t in ids):
        raise bad_request(f"input token ids must be in [0, {n_vocab})", "input")
    return [embedder.tokenizer.decode(ids, skip_special_tokens=True) for ids in inp]


async def create_embeddings(
    embedder, es: EmbedderSettings, body: EmbeddingRequest, names=None
) -> dict:
    """-> the OpenAI embeddings object (its ``usage`` also goes to the access log). ``names``
    (``server.services.models.ModelNames``) accepts aliases and the unknown-model policy."""
    if embedder is None:
        raise APIError(
            404, "no embedder is loaded (embedder.enabled is false)", code="model_not_found"
        )
    allowed = {embedder.name, es.model}
    if names is not None:
        names.embedding(body.model, allowed)
    elif body.model not in allowed | {None, ""}:
        raise APIError(
            404,
            f"The model '{body.model}' does not exist. Available: {embedder.name}",
            param="model",
            code="model_not_found",
        )
    texts = _texts(embedder, body.input)
    if any(t == "" for t in texts):
        raise bad_request("input must not contain empty strings", "input")
    vecs = await asyncio.to_thread(embedder.embed, texts)
    if body.dimensions is not None:
        if body.dimensions > embedder.dim:
            raise bad_request(f"dimensions must be <= {embedder.dim}", "dimensions")
        vecs = vecs[:, : body.dimensions]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    data = []
    for i, v in enumerate(vecs.astype(np.float32)):
        emb = (
            base64.b64encode(v.astype("<f4").tobytes()).decode()
            if body.encoding_format == "base64"
            else v.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n_tok = embedder.count_tokens(texts)
    return {
        "object": "list",
        "data": data,
        "model": embedder.name,
        "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
    }
