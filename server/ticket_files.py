"""Ticket files: a JSONL of tickets, a ``.txt`` or a ``.eml`` mail. Read by ``docqa reply``
and by the agent page's queue uploads (``server.services.ticket_queue.parse_upload``); no heavy
imports, so that the command line stays quick to start."""

from __future__ import annotations

import email
import email.policy
import json


def ticket_from_mail(name: str, raw: bytes) -> dict:
    """One ticket from a ``.eml`` (subject + plain-text body) or ``.txt`` file; id = name.
    Raises ``ValueError`` when the bytes are not text."""
    if name.lower().endswith(".eml"):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        body = part.get_content() if part is not None else ""
        return {"id": name, "subject": str(msg.get("subject", "")), "body": body}
    return {"id": name, "subject": "", "body": raw.decode("utf-8")}


def tickets_from_jsonl(text: str) -> list[tuple[int, dict | str]]:
    """``(line number, ticket)`` for each JSON object line, ``(line number, error)`` for a line
    that is not one; blank lines are skipped. A ticket without an id gets ``line-N``."""
    out: list[tuple[int, dict | str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
            if not isinstance(t, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            out.append((n, f"not a JSON ticket object: {exc}"))
            continue
        t.setdefault("id", f"line-{n}")
        out.append((n, t))
    return out


def has_text(t: dict) -> bool:
    """A ticket to answer: a non-empty subject or body."""
    return bool(str(t.get("subject") or t.get("body") or "").strip())


def json_tickets(body) -> list:
    """The tickets of a parsed JSON body: ``{"tickets": [...]}``, a list of tickets, or one
    ticket (whatever it holds: the caller checks each)."""
    tickets = body.get("tickets") if isinstance(body, dict) and "tickets" in body else body
    return tickets if isinstance(tickets, list) else [tickets]


def tickets_from_json(text: str) -> list[tuple[int, dict | str]]:
    """A ``.json`` file: ``{"tickets": [...]}`` (the paste body), a list of tickets, or one
    ticket -> ``(ticket number, ticket or error)`` as ``tickets_from_jsonl`` gives per line
    (one ``(0, error)`` when the file is no JSON at all). A ticket without an id gets
    ``ticket-N``."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return [(0, f"not a JSON file: {exc}")]
    out: list[tuple[int, dict | str]] = []
    for n, t in enumerate(json_tickets(body), 1):
        if not isinstance(t, dict):
            out.append((n, "not a JSON ticket object"))
        else:
            t.setdefault("id", f"ticket-{n}")
            out.append((n, t))
    return out
