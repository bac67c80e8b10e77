"""POST /v1/tickets/reply: one ticket in, one reply record out (same engine and index)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.auth import require_api_key, require_ready
from server.engine import PromptTooLong, QueueFull
from server.errors import APIError
from server.services.tickets import reply_ticket

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(require_ready)])


class Ticket(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | int = Field(..., description="Ticket id.")
    subject: str = ""
    body: str = ""


@router.post("/tickets/reply")
async def tickets_reply(request: Request, ticket: Ticket):
    state = request.app.state
    if getattr(state, "rag", None) is None:
        raise APIError(
            404,
            "ticket replies need an index: start docqa with --index or --docs",
            code="retrieval_disabled",
        )
    data = ticket.model_dump()
    try:
        record = await reply_ticket(state, data)
    except QueueFull as exc:
        raise APIError(
            503,
            str(exc),
            code="server_busy",
            headers={"Retry-After": str(state.settings.server.retry_after_s)},
        ) from exc
    except PromptTooLong as exc:
        record = {"id": str(ticket.id), "error": str(exc), "decision": "human"}
    extras = {k: v for k, v in data.items() if k not in ("subject", "body") and k not in record}
    return record | extras
