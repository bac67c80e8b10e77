"""The agent page's ticket queue: /v1/tickets/queue (list, add, draft, update, export). Thin:
the work is in ``server.services.ticket_queue``."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from server import deps
from server.auth import require_api_key
from server.engine import QueueFull
from server.errors import APIError, bad_request
from server.runtime import RuntimeClosed
from server.services.ticket_queue import TicketQueue, parse_upload
from server.ticket_files import has_text, json_tickets
from server.uploads import read_upload

router = APIRouter(
    prefix="/v1/tickets/queue",
    dependencies=[Depends(require_api_key), Depends(deps.services)],
)


class QueueUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reply: str | None = Field(None, max_length=100_000, description="The agent's reply text.")
    status: str | None = Field(None, description="review, approved or escalated.")
    note: str | None = Field(None, max_length=10_000, description="Why it was escalated.")
    version: int | None = Field(None, ge=1, description="The version the edit was made on.")


def _tickets_from_json(raw: bytes) -> list[dict]:
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
    tickets = json_tickets(body)
    if not tickets:
        raise bad_request("give {'tickets': [{'subject', 'body', ...}]} or one ticket", "tickets")
    for i, t in enumerate(tickets):
        if not isinstance(t, dict) or not has_text(t):
            raise bad_request(f"ticket {i} needs a subject or a body", f"tickets.{i}")
    return tickets


@router.get("")
async def list_queue(status: str | None = None, queue: TicketQueue = Depends(deps.ticket_queue)):
    return {"object": "list", "data": await asyncio.to_thread(queue.list, status)}


@router.post("")
async def add_to_queue(
    request: Request,
    queue: TicketQueue = Depends(deps.ticket_queue),
    cap: int = Depends(deps.max_upload_bytes),
):
    """A multipart ``file`` (JSONL, .txt, .eml) or JSON ``{"tickets": [...]}`` / one ticket.
    A malformed JSONL line is reported in ``errors`` and the other lines are added."""
    errors: list[dict] = []
    if (multipart := await read_upload(request, cap)) is not None:
        _, upload, data = multipart
        origin = str(upload.filename or "upload")
        tickets, errors = parse_upload(origin, data, cap)
    else:
        raw = await request.body()
        if len(raw) > cap:
            raise APIError(413, f"body over {cap} bytes", code="file_too_large")
        tickets, origin = _tickets_from_json(raw), "pasted"
    data = await asyncio.to_thread(queue.add, tickets, origin) if tickets else []
    return {"object": "list", "file": origin, "data": data, "errors": errors}


@router.get("/export")
async def export_queue(queue: TicketQueue = Depends(deps.ticket_queue)):
    """Approved replies as JSONL, one record per ticket."""
    rows = await asyncio.to_thread(queue.export)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="approved-replies.jsonl"'},
    )


@router.get("/{qid}")
async def get_item(qid: int, queue: TicketQueue = Depends(deps.ticket_queue)):
    return await asyncio.to_thread(queue.get, qid)


@router.patch("/{qid}")
async def update_item(qid: int, body: QueueUpdate, queue: TicketQueue = Depends(deps.ticket_queue)):
    fields = body.model_dump(exclude_none=True)
    return await asyncio.to_thread(queue.update, qid, **fields)


@router.post("/{qid}/draft")
async def draft_item(
    qid: int,
    queue: TicketQueue = Depends(deps.ticket_queue),
    retry_after: int = Depends(deps.retry_after),
):
    """Draft the reply of a new item (as POST /v1/tickets/reply would) and store it."""
    try:
        return await queue.draft(qid)
    except (QueueFull, RuntimeClosed) as exc:
        raise APIError(
            503, str(exc), code="server_busy", headers={"Retry-After": str(retry_after)}
        ) from exc
