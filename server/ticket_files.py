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
        except ValueError as exc:
            out.append((n, f"not a JSON ticket object: {exc}"))
            continue
        t.setdefault("id", f"line-{n}")
        out.append((n, t))
    return out
