"""Retrieval and document routes (filled by the retrieval service)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import require_api_key, require_ready

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(require_ready)])
