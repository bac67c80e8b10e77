"""Admin: swap the served model between requests, without downtime."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from models.store import ModelNotFound
from server.app_state import swap_model
from server.auth import require_admin_key, require_ready
from server.errors import APIError

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key), Depends(require_ready)]
)


class ReloadRequest(BaseModel):
    model: str | None = Field(None, description="Model to load; None reloads the configured one.")


@router.post("/reload")
async def reload(request: Request, body: ReloadRequest):
    app = request.app
    try:
        new_id = await asyncio.to_thread(swap_model, app, body.model)
    except ModelNotFound as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    return {"status": "ok", "model": new_id}
