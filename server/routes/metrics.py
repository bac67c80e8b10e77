"""GET /metrics: Prometheus text format (behind the API key when one is set)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from server import metrics
from server.auth import require_api_key
from server.deps import app_state
from server.errors import APIError
from server.state import AppState

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/metrics")
async def prometheus(state: AppState = Depends(app_state)):
    if not state.settings.server.metrics:
        raise APIError(404, "metrics are off (server.metrics: false)", code="not_found")
    body, content_type = metrics.render(state.services)
    return Response(body, media_type=content_type)
