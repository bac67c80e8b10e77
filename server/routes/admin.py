"""Admin: swap the served model without downtime."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from models.store import ModelNotFound
from server import deps
from server.auth import require_admin_key
from server.errors import APIError
from server.runtime import ModelManager

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key), Depends(deps.services)]
)


class ReloadRequest(BaseModel):
    model: str | None = Field(None, description="Model to load; None reloads the configured one.")


@router.post("/reload")
async def reload(body: ReloadRequest, models: ModelManager = Depends(deps.models)):
    """Load the model beside the running one, swap it in; requests on the old one finish."""
    try:
        new = await asyncio.to_thread(models.reload, body.model)
    except ModelNotFound as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    return {"status": "ok", "model": new.id}
