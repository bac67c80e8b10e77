"""Live documents: read uploads and server paths into documents, ingest and delete them.
The index is replaced whole (``IndexService.replace``); chunk sizes use the served model's
vocabulary, asked of the model manager for the duration of the write."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from pathlib import Path

from docqa.settings import RequestLimits, RetrievalSettings
from retrieval.builder import chunk_documents, embed_documents, update_index
from retrieval.index import Index
from retrieval.loaders import SUPPORTED, Document, load_file, load_tree
from server.errors import APIError, bad_request
from server.runtime import ModelManager
from server.services.index import IndexService, StoreUnavailable

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")

log = logging.getLogger(__name__)


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
    def __init__(
        self,
        settings: RetrievalSettings,
        index: IndexService,
        models: ModelManager,
        limits: RequestLimits | None = None,
    ):
        self.settings = settings
        self.index = index
        self.models = models
        self.limits = limits or RequestLimits()

    # -- reading --------------------------------------------------------------------
    def list(self) -> list[dict]:
        index = self.index.index
        return [doc_record(index, p) for p in sorted(index.files)]

    def from_upload(self, filename: str, data: bytes, param: str = "file") -> list[Document]:
        name = normalize_path(filename or "upload.md", param)
        return self._sized([self._load_upload(name, data)])

    def _sized(self, docs: list[Document]) -> list[Document]:
        """413 for a document over ``limits.max_document_bytes`` (its embedding would hold the
        request for minutes)."""
        cap = self.limits.max_document_bytes
        for d in docs:
            n = len(d.text.encode("utf-8", "replace"))
            if n > cap:
                raise APIError(
                    413,
                    f"document {d.path} has {n} bytes of text, more than {cap} "
                    "(server.limits.max_document_bytes)",
                    param="content",
                    code="document_too_large",
                )
        return docs

    def from_json(self, raw: bytes) -> list[Document]:
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not UTF-8: not JSON either
            raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict):
            raise bad_request("body must be a JSON object")
        if "path" in body and "content" not in body:
            p, root = self._under_allowed(str(body["path"]))
            docs = load_tree(p, within=root)
            base = p.parent if p.is_file() else p
            # stored relative to the roots' common folder: with one root, relative to it; with
            # several, two roots' files of one name stay two documents (a/guide.md, b/guide.md)
            common = Path(
                os.path.commonpath([Path(r).resolve() for r in self.settings.allowed_roots])
            )
            for d in docs:
                d.path = (base / d.path).relative_to(common).as_posix()
            if not docs:
                raise bad_request(f"no loadable documents at {body['path']}", "path")
            return self._sized(docs)
        if "content" in body:
            param = "path" if body.get("path") else "filename"
            name = str(body.get("path") or body.get("filename") or "")
            if not name:
                raise bad_request("give 'path' (name to store the document under)", "path")
            name = normalize_path(name, param)
            return self._sized([self._load_upload(name, str(body["content"]).encode())])
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
        if _CONTROL.search(raw):
            raise bad_request(f"path {raw!r} holds a control character", "path")
        try:
            p = Path(raw).expanduser().resolve()
            for root in roots:
                if p == root or root in p.parents:
                    if not p.exists():
                        raise APIError(
                            404, f"path not found: {raw}", param="path", code="not_found"
                        )
                    return p, root
        except (OSError, ValueError) as exc:  # a name too long for the file system, say
            raise bad_request(f"path {raw!r} cannot be read: {exc}", "path") from exc
        raise APIError(
            403, f"path is outside the allowed roots: {raw}", param="path", code="path_not_allowed"
        )

    @staticmethod
    def _load_upload(name: str, data: bytes) -> Document:
        if Path(name).suffix.lower() not in SUPPORTED:
            raise bad_request(f"unsupported document type: {Path(name).suffix or '(none)'}", "file")
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / ("upload" + Path(name).suffix)  # any name fits (255 bytes)
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
            tok = rt.chunk_tokenizer()
            self._check_chunks(docs, tok)
            try:
                # embedded first: a shared store's write lock is not held while the model runs
                vectors = embed_documents(self.index.index, self.index.embedder, tok, docs)
                new = self.index.update(
                    lambda base: update_index(
                        base, self.index.embedder, tok, add=docs, vectors=vectors
                    )
                )
            except StoreUnavailable as exc:
                raise _store_down(exc, self.settings.db_retry_s) from exc
            except Exception as exc:  # noqa: BLE001 - the old index keeps serving
                raise APIError(
                    500,
                    f"ingest failed, the previous index is still served: {exc}",
                    code="ingest_failed",
                ) from exc
        return new, [doc_record(new, d.path) for d in docs]

    def _check_chunks(self, docs: list[Document], tok) -> None:
        cfg = self.index.index.manifest.get("config", {})
        size, overlap = cfg.get("chunk_tokens", 300), cfg.get("chunk_overlap", 30)
        cap = self.limits.max_document_chunks
        for d in docs:
            n = len(chunk_documents([d], tok, size, overlap))
            if n > cap:
                raise APIError(
                    413,
                    f"document {d.path} makes {n} chunks, more than {cap} "
                    "(server.limits.max_document_chunks)",
                    param="content",
                    code="document_too_large",
                )

    def delete(self, ident: str) -> dict:
        with self.index.write_lock, self.models.lease() as rt:
            tok = rt.chunk_tokenizer()
            found: list[str] = []

            name = ident if ident.startswith("doc_") else normalize_path(ident, "id")

            def change(index: Index) -> Index:  # looked up under the write lock: one delete wins
                path = next(
                    (p for p in index.files if doc_id(p) == ident or p in (ident, name)), None
                )
                if path is None:
                    raise APIError(
                        404, f"no document {ident}", param="id", code="document_not_found"
                    )
                found.append(path)
                return update_index(index, self.index.embedder, tok, remove=[path])

            try:
                self.index.update(change)
            except StoreUnavailable as exc:
                raise _store_down(exc, self.settings.db_retry_s) from exc
        path = found[-1]
        return {"object": "document.deleted", "id": doc_id(path), "path": path, "deleted": True}


def _store_down(exc: Exception, retry_s: float) -> APIError:
    """The client's 503: what happened and when to retry, not the database's error text (it
    can name hosts and users; the log has it)."""
    log.warning("shared store unavailable: %s", exc)
    return APIError(
        503,
        "the shared store is unavailable, the document was not changed (the index in memory "
        "is still served); retry later",
        code="store_unavailable",
        headers={"Retry-After": str(max(1, round(retry_s)))},
    )
