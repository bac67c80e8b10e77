"""POST /v1/rerank (Jina/Cohere shape): documents ordered by relevance to a query, scores in
0..1. Scored by the cross-encoder ``retrieval.reranker`` names when one is configured (its
relevance probability), else by the embedder's cosine similarity mapped from [-1, 1] to
[0, 1]."""

from __future__ import annotations

import asyncio

import numpy as np

from server.errors import APIError, bad_request
from server.schemas import RerankRequest


async def rerank(embedder, max_documents: int, body: RerankRequest, reranker=None) -> dict:
    if embedder is None and reranker is None:
        raise APIError(
            404, "no embedder is loaded (embedder.enabled is false)", code="model_not_found"
        )
    if len(body.documents) > max_documents:
        raise bad_request(
            f"at most {max_documents} documents per request (retrieval.rerank_max_documents)",
            "documents",
        )
    if any(not d.strip() for d in body.documents):
        raise bad_request("documents must not contain empty strings", "documents")
    if reranker is not None:
        sims = await asyncio.to_thread(reranker.score, body.query, body.documents)
        scorer = reranker
    else:
        q = await asyncio.to_thread(embedder.embed_query, body.query)
        docs = await asyncio.to_thread(embedder.embed, body.documents)
        sims = np.clip((docs @ np.asarray(q)[0] + 1.0) / 2.0, 0.0, 1.0)
        scorer = embedder
    order = sorted(range(len(body.documents)), key=lambda i: (-float(sims[i]), i))
    top = order[: body.top_n] if body.top_n else order
    results = []
    for i in top:
        r = {"index": i, "relevance_score": round(float(sims[i]), 6)}
        if body.return_documents:
            r["document"] = {"text": body.documents[i]}
        results.append(r)
    n_tok = scorer.count_tokens([body.query, *body.documents])
    return {
        "object": "list",
        "model": scorer.name,
        "results": results,
        "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
    }
