"""Live documents: read uploads and server paths into documents, ingest and delete them.
The index is replaced whole (``IndexService.replace``); chunk sizes use the served model's
vocabulary, asked of the model manager for the duration of the write."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
from pathlib import Path

from docqa.settings import RetrievalSettings
from retrieval.builder import update_index
from retrieval.index import Index
from retrieval.loaders import SUPPORTED, Document, load_file, load_tree
from server.errors import APIError, bad_request
from server.runtime import ModelManager
from server.services.index import IndexService

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def normalize_path(raw: str, param: str = "path") -> str:
    """The name a document is stored (and identified) under: relative, ``/``-separated (a
    ``\\`` counts as one), with no ``.`` segment and no repeated separator, so ``./guide.md``,
    ``guide.md`` and ``.//guide.md`` are one document. A 400 naming ``param`` for a name that
    is empty, holds a NUL or control character or a lone surrogate, is absolute, or climbs
    out with ``..``."""
    if _CONTROL.search(raw):
        raise bad_request(f"document path {raw!r} holds a control character", param)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no file name, no id
        raise bad_request(f"document path {raw!r} is not valid Unicode", param) from exc
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise bad_request(f"document path {raw!r} must be relative, not absolute", param)
    if ".." in name.split("/"):
        raise bad_request(f"document path {raw!r} must not contain '..'", param)
    name = posixpath.normpath(name) if name else ""
    if name in ("", "."):
        raise bad_request("document path is empty", param)
    return name


def doc_id(path: str) -> str:
    return "doc_" + hashlib.sha256(path.encode()).hexdigest()[:12]


def doc_record(index: Index, path: str) -> dict:
    ids = [c.id for c in index.chunks if c.path == path]
    return {
        "object": "document",
        "id": doc_id(path),
        "path": path,
        "chunks": len(ids),
        "chunk_ids": ids,
    }


class DocumentsService:
    def __init__(self, settings: RetrievalSettings, index: IndexService, models: ModelManager):
        self.settings = settings
        self.index = index
        self.models = models

    # -- reading --------------------------------------------------------------------
    def list(self) -> list[dict]:
        index = self.index.index
        return [doc_record(index, p) for p in sorted(index.files)]

    def from_upload(self, filename: str, data: bytes, param: str = "file") -> list[Document]:
        name = normalize_path(filename or "upload.md", param)
        return [self._load_upload(name, data)]

    def from_json(self, raw: bytes) -> list[Document]:
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict):
            raise bad_request("body must be a JSON object")
        if "path" in body and "content" not in body:
            p, root = self._under_allowed(str(body["path"]))
            docs = load_tree(p)
            base = p.parent if p.is_file() else p
            for d in docs:
                d.path = (base / d.path).relative_to(root).as_posix()
            if not docs:
                raise bad_request(f"no loadable documents at {body['path']}", "path")
            return docs
        if "content" in body:
            param = "path" if body.get("path") else "filename"
            name = str(body.get("path") or body.get("filename") or "")
            if not name:
                raise bad_request("give 'path' (name to store the document under)", "path")
            name = normalize_path(name, param)
            return [self._load_upload(name, str(body["content"]).encode())]
        raise bad_request("give a multipart 'file', or JSON {'path'} or {'path','content'}")

    def _under_allowed(self, raw: str) -> tuple[Path, Path]:
        roots = [Path(r).resolve() for r in self.settings.allowed_roots]
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

    @staticmethod
    def _load_upload(name: str, data: bytes) -> Document:
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

    # -- writing (blocking: call in a thread) -----------------------------------------
    def ingest(self, docs: list[Document]) -> tuple[Index, list[dict]]:
        with self.index.write_lock, self.models.lease() as rt:
            try:
                new = update_index(
                    self.index.index, self.index.embedder, rt.chunk_tokenizer(), add=docs
                )
                self.index.replace(new)
            except Exception as exc:  # noqa: BLE001 - the old index keeps serving
                raise APIError(
                    500,
                    f"ingest failed, the previous index is still served: {exc}",
                    code="ingest_failed",
                ) from exc
        return new, [doc_record(new, d.path) for d in docs]

    def delete(self, ident: str) -> dict:
        with self.index.write_lock, self.models.lease() as rt:
            index = self.index.index  # looked up under the write lock: one delete wins
            name = ident if ident.startswith("doc_") else normalize_path(ident, "id")
            path = next((p for p in index.files if doc_id(p) == ident or p in (ident, name)), None)
            if path is None:
                raise APIError(404, f"no document {ident}", param="id", code="document_not_found")
            new = update_index(index, self.index.embedder, rt.chunk_tokenizer(), remove=[path])
            self.index.replace(new)
        return {"object": "document.deleted", "id": doc_id(path), "path": path, "deleted": True}
