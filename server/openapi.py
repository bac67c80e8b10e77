"""The error responses the OpenAPI document lists for each endpoint (OpenAI's error shape)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail = Field(..., description="OpenAI's error object.")


_WHY = {
    400: "Invalid request (bad JSON, a bad value, a grammar llama.cpp could not use).",
    401: "Missing or wrong API key (or admin key).",
    403: "Forbidden: admin endpoints off, an origin not allowed, a path outside the roots.",
    404: "Unknown model, document or route, or retrieval not enabled.",
    409: "A queue item changed since the version given, or is not in the state asked for.",
    413: "Request body, document or grammar too large.",
    415: "Content-Type is not application/json (or multipart/form-data where allowed).",
    503: "Loading, or the queue is full: retry after Retry-After seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    return {c: {"model": ErrorBody, "description": _WHY[c]} for c in codes}
