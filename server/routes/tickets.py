"""POST /v1/tickets/reply: one ticket in, one reply record out (same model and index)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server import deps
from server.auth import require_api_key
from server.engine import PromptTooLong, QueueFull
from server.errors import APIError
from server.runtime import RuntimeClosed
from server.services import generation as gen
from server.services.tickets import TicketService

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key), Depends(deps.services)])


class Ticket(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | int = Field(..., description="Ticket id.")
    subject: str = ""
    body: str = ""


@router.post("/tickets/reply")
async def tickets_reply(
    ticket: Ticket, request: Request, service: TicketService = Depends(deps.tickets)
):
    data = ticket.model_dump()
    try:  # a client that leaves (a timeout) stops its ticket's generation
        record = await gen.until_disconnected(request.is_disconnected, service.reply(data))
    except QueueFull as exc:
        raise gen.busy(exc, service.settings.server) from exc
    except RuntimeClosed as exc:
        raise APIError(
            503,
            str(exc),
            code="server_busy",
            headers={"Retry-After": str(service.settings.server.retry_after_s)},
        ) from exc
    except PromptTooLong as exc:
        record = {"id": str(ticket.id), "error": str(exc), "decision": "human"}
    extras = {k: v for k, v in data.items() if k not in ("subject", "body") and k not in record}
    return record | extras
