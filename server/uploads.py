"""Multipart uploads, the one way every route reads them (documents, the ticket queue) and the
way the body middleware recognises them."""

from __future__ import annotations

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from server.errors import bad_request


def is_multipart(content_type: str) -> bool:
    """``multipart/form-data``, in any case (header values' media types are case-insensitive)."""
    return content_type.lower().startswith("multipart/form-data")


async def read_upload(request: Request, cap: int) -> tuple[FormData, UploadFile, bytes] | None:
    """``(form, its 'file', up to cap + 1 of its bytes)`` for a multipart request (the caller
    says what over ``cap`` means), None for any other body; a form without a ``file`` -> 400."""
    if not is_multipart(request.headers.get("content-type", "")):
        return None
    form = await request.form()
    upload = form.get("file")
    if upload is None or not hasattr(upload, "read"):
        raise bad_request("multipart upload needs a 'file' field", "file")
    return form, upload, await upload.read(cap + 1)
