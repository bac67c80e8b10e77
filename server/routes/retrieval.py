"""Retrieval and live document routes: /v1/retrieve, /v1/documents (thin: the work is in
``IndexService`` and ``DocumentsService``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server import deps
from server.auth import require_api_key
from server.errors import APIError
from server.services.documents import DocumentsService
from server.services.index import IndexService
from server.uploads import read_upload

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(deps.services)])


class RetrieveFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path_prefix: str | None = Field(None, description="Only chunks whose path starts with this.")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: str = Field(..., min_length=1)
    top_k: int | None = Field(
        None, ge=1, le=100, description="Chunks to return (default: retrieval.top_k)."
    )
    filter: RetrieveFilter | None = None
    mode: str | None = Field(
        None, pattern="^(hybrid|bm25|dense)$", description="Default: retrieval.mode."
    )


@router.post("/retrieve")
async def retrieve(body: RetrieveRequest, index: IndexService = Depends(deps.index)):
    prefix = body.filter.path_prefix if body.filter else None
    res = await asyncio.to_thread(index.search, body.query, body.top_k, prefix, body.mode)
    return {
        "object": "list",
        "data": [
            {
                "id": h.chunk.id,
                "text": h.chunk.text,
                "score": h.score,
                "source": {"path": h.chunk.path, "heading": h.chunk.heading},
            }
            for h in res.hits
        ],
        "best_similarity": res.best_sim,
    }


@router.get("/documents")
async def list_documents(docs: DocumentsService = Depends(deps.documents)):
    return {"object": "list", "data": docs.list()}


_DOCUMENT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Name to store it under."},
                    "content": {"type": "string", "description": "The document's text."},
                },
                "required": ["path"],
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "path": {"type": "string"},
                },
                "required": ["file"],
            }
        },
    },
}


@router.post("/documents", openapi_extra={"requestBody": _DOCUMENT_BODY})
async def add_documents(
    request: Request,
    docs: DocumentsService = Depends(deps.documents),
    cap: int = Depends(deps.max_upload_bytes),
):
    if (multipart := await read_upload(request, cap)) is not None:
        form, upload, data = multipart
        name = str(form.get("path") or upload.filename or "upload.md")
        if len(data) > cap:
            raise APIError(
                413,
                f"{name} is over {cap} bytes (server.max_upload_bytes)",
                param="file",
                code="file_too_large",
            )
        param = "path" if form.get("path") else "file"
        # parsing (a PDF, say) runs off the event loop, like the JSON path's
        parsed = await asyncio.to_thread(docs.from_upload, name, data, param)
    else:
        parsed = await asyncio.to_thread(docs.from_json, await request.body())
    index, data = await asyncio.to_thread(docs.ingest, parsed)
    return {"object": "list", "data": data, "total_chunks": len(index)}


@router.delete("/documents/{ident:path}")
async def delete_document(ident: str, docs: DocumentsService = Depends(deps.documents)):
    return await asyncio.to_thread(docs.delete, ident)
