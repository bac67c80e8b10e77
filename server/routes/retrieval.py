"""Retrieval and live document routes: /v1/retrieve, /v1/documents."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from retrieval.loaders import SUPPORTED, load_file, load_tree
from server.auth import require_api_key, require_ready
from server.errors import APIError, bad_request

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(require_ready)])


class RetrieveFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path_prefix: str | None = Field(None, description="Only chunks whose path starts with this.")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: str = Field(..., min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    filter: RetrieveFilter | None = None
    mode: str = Field("hybrid", pattern="^(hybrid|bm25|dense)$")


def _rag(request: Request):
    rag = getattr(request.app.state, "rag", None)
    if rag is None:
        raise APIError(
            404,
            "retrieval is not enabled: start docqa with --index or --docs",
            code="retrieval_disabled",
        )
    return rag


def doc_id(path: str) -> str:
    return "doc_" + hashlib.sha256(path.encode()).hexdigest()[:12]


@router.post("/retrieve")
async def retrieve(request: Request, body: RetrieveRequest):
    rag = _rag(request)
    prefix = body.filter.path_prefix if body.filter else None
    res = await asyncio.to_thread(rag.search, body.query, body.top_k, prefix, body.mode)
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


def _doc_record(index, path: str) -> dict:
    ids = [c.id for c in index.chunks if c.path == path]
    return {
        "object": "document",
        "id": doc_id(path),
        "path": path,
        "chunks": len(ids),
        "chunk_ids": ids,
    }


@router.get("/documents")
async def list_documents(request: Request):
    index = _rag(request).index
    return {"object": "list", "data": [_doc_record(index, p) for p in sorted(index.files)]}


def _under_allowed(request: Request, raw: str) -> tuple[Path, Path]:
    roots = [Path(r).resolve() for r in request.app.state.settings.retrieval.allowed_roots]
    if not roots:
        raise APIError(
            403,
            "ingest by path is disabled (retrieval.allowed_roots is empty)",
            param="path",
            code="path_not_allowed",
        )
    p = Path(raw).expanduser().resolve()
    for root in roots:
        if p == root or root in p.parents:
            if not p.exists():
                raise APIError(404, f"path not found: {raw}", param="path", code="not_found")
            return p, root
    raise APIError(
        403, f"path is outside the allowed roots: {raw}", param="path", code="path_not_allowed"
    )


async def _documents_from_request(request: Request):
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise bad_request("multipart upload needs a 'file' field", "file")
        name = Path(str(form.get("path") or upload.filename or "upload.md")).as_posix().lstrip("/")
        return [_load_upload(name, await upload.read())]
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as exc:
        raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    if "path" in body and "content" not in body:
        p, root = _under_allowed(request, str(body["path"]))
        docs = load_tree(p)
        base = p.parent if p.is_file() else p
        for d in docs:
            d.path = (base / d.path).relative_to(root).as_posix()
        if not docs:
            raise bad_request(f"no loadable documents at {body['path']}", "path")
        return docs
    if "content" in body:
        name = str(body.get("path") or body.get("filename") or "").lstrip("/")
        if not name:
            raise bad_request("give 'path' (name to store the document under)", "path")
        return [_load_upload(name, str(body["content"]).encode())]
    raise bad_request("give a multipart 'file', or JSON {'path'} or {'path','content'}")


def _load_upload(name: str, data: bytes):
    import tempfile

    if Path(name).suffix.lower() not in SUPPORTED:
        raise bad_request(f"unsupported document type: {Path(name).suffix or '(none)'}", "file")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / Path(name).name
        f.write_bytes(data)
        try:
            doc = load_file(f, name)
        except Exception as exc:  # noqa: BLE001
            raise bad_request(f"could not read document {name}: {exc}", "file") from exc
    if not doc.text.strip():
        raise bad_request(f"document {name} is empty", "file")
    return doc


@router.post("/documents")
async def add_documents(request: Request):
    rag = _rag(request)
    docs = await _documents_from_request(request)
    try:
        index = await asyncio.to_thread(rag.ingest, docs)
    except Exception as exc:  # noqa: BLE001 - the old index keeps serving
        raise APIError(
            500, f"ingest failed, the previous index is still served: {exc}", code="ingest_failed"
        ) from exc
    data = [_doc_record(index, d.path) for d in docs]
    return {"object": "list", "data": data, "total_chunks": len(index)}


@router.delete("/documents/{ident:path}")
async def delete_document(request: Request, ident: str):
    rag = _rag(request)
    index = rag.index
    path = next((p for p in index.files if doc_id(p) == ident or p == ident), None)
    if path is None:
        raise APIError(404, f"no document {ident}", param="id", code="document_not_found")
    await asyncio.to_thread(rag.delete, [path])
    return {"object": "document.deleted", "id": doc_id(path), "path": path, "deleted": True}
