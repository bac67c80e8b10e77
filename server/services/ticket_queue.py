"""The support agents' ticket queue: tickets read from uploads or pasted, their draft replies
(from ``TicketService``), the agent's edits and decisions, stored in one SQLite file in the
server's data directory (``server.data_dir``) so that the queue survives a restart and every
browser tab sees the same one.

An item moves ``new`` -> ``drafting`` -> ``review`` -> ``approved`` | ``escalated`` (an agent
may move it back to ``review``). ``drafting`` is a claim: one caller drafts an item at a time.
The claim is a lease (``tickets.queue_lease_s``) held by one queue object (its ``owner``
token) and renewed while the draft runs, so several servers may share one queue file: an
item another server holds is not drafted again, a claim left by a server that stopped
mid-draft is released once its lease runs out, and a draft whose claim was lost meanwhile is
not stored over the new holder's.
Every change bumps the item's ``version``; an update that names an older version is refused
(409), so one tab cannot silently overwrite what another tab saved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from server.engine import PromptTooLong
from server.errors import APIError
from server.services.tickets import TicketService
from server.ticket_files import (
    has_text,
    ticket_from_mail,
    tickets_from_json,
    tickets_from_jsonl,
)

log = logging.getLogger(__name__)

STATUSES = ("new", "drafting", "review", "approved", "escalated")
AGENT_STATUSES = ("review", "approved", "escalated")
TICKET_SUFFIXES = (".jsonl", ".ndjson", ".json", ".txt", ".eml")
FILE_NAME = "ticket_queue.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket  TEXT NOT NULL,
    origin  TEXT NOT NULL DEFAULT '',
    status  TEXT NOT NULL DEFAULT 'new',
    draft   TEXT,
    reply   TEXT NOT NULL DEFAULT '',
    note    TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    owner   TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
"""
# added after the first release: columns an older queue file gets when it is opened
_COLUMNS = {"owner": "TEXT", "lease_until": "REAL NOT NULL DEFAULT 0"}


# -- uploads --------------------------------------------------------------------------
def parse_upload(name: str, data: bytes, max_bytes: int) -> tuple[list[dict], list[dict]]:
    """Tickets in one uploaded file -> (tickets, line errors ``{"line", "message"}``; in a
    ``.json`` file "line" is the ticket's number). A file that is too large, not text or of
    another type is an ``APIError`` (the whole file)."""
    suffix = Path(name).suffix.lower()
    if len(data) > max_bytes:
        raise APIError(
            413,
            f"{name} is {len(data)} bytes; the limit is {max_bytes} (server.max_upload_bytes)",
            param="file",
            code="file_too_large",
        )
    if suffix not in TICKET_SUFFIXES:
        raise APIError(
            400,
            f"{name}: unsupported ticket file type {suffix or '(none)'}; "
            f"use {', '.join(TICKET_SUFFIXES)}",
            param="file",
            code="unsupported_file_type",
        )
    if b"\x00" in data:
        raise APIError(400, f"{name} is not a text file", param="file", code="not_text")
    if suffix == ".eml":  # a mail names its own charset (Latin-1 is common)
        try:
            return [ticket_from_mail(name, data)], []
        except (LookupError, ValueError, UnicodeError) as exc:  # an unknown charset, say
            raise APIError(
                400, f"{name} is not a readable mail: {exc}", param="file", code="not_text"
            ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"{name} is not UTF-8 text: {exc}", param="file", code="not_text"
        ) from exc
    if suffix == ".txt":
        return [ticket_from_mail(name, data)], []
    tickets, errors = [], []
    parse = tickets_from_json if suffix == ".json" else tickets_from_jsonl
    for n, t in parse(text):
        if isinstance(t, str):
            errors.append({"line": n, "message": t})
        elif not has_text(t):  # (`docqa reply` keeps such a line: the server records an error)
            errors.append({"line": n, "message": "a ticket needs a subject or a body"})
        else:
            tickets.append(t)
    return tickets, errors


# -- the queue ----------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _item(row: sqlite3.Row) -> dict:
    return {
        "object": "ticket.queue_item",
        "id": row["id"],
        "ticket": json.loads(row["ticket"]),
        "origin": row["origin"],
        "status": row["status"],
        "draft": json.loads(row["draft"]) if row["draft"] else None,
        "reply": row["reply"],
        "note": row["note"],
        "version": row["version"],
        "created": _iso(row["created"]),
        "updated": _iso(row["updated"]),
    }


class TicketQueue:
    """The queue in ``path`` (opened on first use); ``tickets`` drafts replies; a claim on
    an item being drafted lasts ``lease_s`` unless renewed."""

    def __init__(self, path: Path, tickets: TicketService | None, lease_s: float):
        self.path = Path(path)
        self.tickets = tickets
        self.lease_s = float(lease_s)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # -- storage ---------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None, timeout=10
                )
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
                self._migrate(db)
            except (OSError, sqlite3.Error) as exc:
                if db is not None:
                    db.close()
                raise APIError(
                    500,
                    f"the ticket queue {self.path} cannot be opened: {exc}",
                    code="queue_unavailable",
                ) from exc
            self._db = db
            log.info("ticket queue: %s", self.path)
        return self._db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Give a queue file from before leases their columns (under the write lock: several
        servers may open it at once)."""
        have = {r["name"] for r in db.execute("PRAGMA table_info(queue)")}
        if all(name in have for name in _COLUMNS):
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            have = {r["name"] for r in db.execute("PRAGMA table_info(queue)")}
            for name, decl in _COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE queue ADD COLUMN {name} {decl}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _release_expired(self, db: sqlite3.Connection) -> None:
        """A draft whose lease ran out (its server stopped mid-draft) is drafted again. A
        read only looks: the write (and its lock) happens only when there is one."""
        now = time.time()
        try:
            expired = db.execute(
                "SELECT 1 FROM queue WHERE status='drafting' AND lease_until < ? LIMIT 1", (now,)
            ).fetchone()
            if expired is None:
                return
            cur = db.execute(
                "UPDATE queue SET status='new', owner=NULL, version=version+1, updated=? "
                "WHERE status='drafting' AND lease_until < ?",
                (now, now),
            )
        except sqlite3.Error as exc:
            raise APIError(
                500,
                f"the ticket queue {self.path} cannot be written: {exc}",
                code="queue_unavailable",
            ) from exc
        if cur.rowcount:
            log.warning(
                "ticket queue: %d draft claim(s) ran out; the items are new again", cur.rowcount
            )

    def _open(self) -> sqlite3.Connection:
        """The connection, with claims that ran out released first."""
        db = self._conn()
        self._release_expired(db)
        return db

    def _row(self, db: sqlite3.Connection, qid: int) -> sqlite3.Row:
        row = db.execute("SELECT * FROM queue WHERE id=?", (qid,)).fetchone()
        if row is None:
            raise APIError(404, f"no queue item {qid}", param="id", code="queue_item_not_found")
        return row

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- reading ---------------------------------------------------------------------
    def list(self, status: str | None = None) -> list[dict]:
        if status is not None and status not in STATUSES:
            raise APIError(
                400,
                f"status must be one of {', '.join(STATUSES)}",
                param="status",
                code="invalid_value",
            )
        with self._lock:
            db = self._open()
            if status is None:
                rows = db.execute("SELECT * FROM queue ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM queue WHERE status=? ORDER BY id", (status,)
                ).fetchall()
        return [_item(r) for r in rows]

    def get(self, qid: int) -> dict:
        with self._lock:
            return _item(self._row(self._open(), qid))

    def export(self) -> list[dict]:
        """One record per approved item, as ``docqa reply`` writes them, with the agent's
        reply, whether it was edited, and the ticket's extra fields."""
        out = []
        for it in self.list("approved"):
            t, d = it["ticket"], it["draft"] or {}
            rec = {
                "id": str(t.get("id", it["id"])),
                "reply": it["reply"],
                "sources": d.get("sources", []),
                "confidence": d.get("confidence"),
                "decision": d.get("decision"),
                "reason": d.get("reason"),
                "edited": it["reply"] != d.get("reply"),
                "queue_id": it["id"],
                "approved_at": it["updated"],
            }
            extras = {k: v for k, v in t.items() if k not in ("subject", "body") and k not in rec}
            out.append(rec | extras)
        return out

    # -- writing ---------------------------------------------------------------------
    def add(self, tickets: list[dict], origin: str = "") -> list[dict]:
        """Append tickets (``{"id"?, "subject", "body", ...}``) as ``new`` items, in one
        transaction; a ticket without an id is named after its queue item."""
        now = time.time()
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = []
                for t in tickets:
                    cur = db.execute(
                        "INSERT INTO queue (ticket, origin, status, created, updated) "
                        "VALUES (?, ?, 'new', ?, ?)",
                        (json.dumps(t, ensure_ascii=False), origin, now, now),
                    )
                    qid = cur.lastrowid
                    if t.get("id") in (None, ""):
                        t = {**t, "id": f"web-{qid}"}
                        db.execute(
                            "UPDATE queue SET ticket=? WHERE id=?",
                            (json.dumps(t, ensure_ascii=False), qid),
                        )
                    ids.append(qid)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return [_item(self._row(db, q)) for q in ids]

    def update(
        self,
        qid: int,
        *,
        reply: str | None = None,
        status: str | None = None,
        note: str | None = None,
        version: int | None = None,
    ) -> dict:
        """The agent's edit and decision; ``version``, when given, must be the item's."""
        with self._lock:
            db = self._open()
            row = self._row(db, qid)
            if version is not None and version != row["version"]:
                raise APIError(
                    409,
                    f"queue item {qid} changed since version {version} (now {row['version']}); "
                    "reload it",
                    param="version",
                    code="version_conflict",
                )
            if row["status"] == "drafting":
                raise APIError(
                    409, f"queue item {qid} is being drafted", param="id", code="drafting"
                )
            if status is not None and status not in AGENT_STATUSES:
                raise APIError(
                    400,
                    f"status must be one of {', '.join(AGENT_STATUSES)}",
                    param="status",
                    code="invalid_value",
                )
            new_reply = row["reply"] if reply is None else reply
            if status == "approved" and not new_reply.strip():
                raise APIError(
                    400, "an approved item needs a reply", param="reply", code="empty_reply"
                )
            db.execute(
                "UPDATE queue SET reply=?, status=?, note=?, version=version+1, updated=? "
                "WHERE id=?",
                (
                    new_reply,
                    status or row["status"],
                    row["note"] if note is None else note,
                    time.time(),
                    qid,
                ),
            )
            return _item(self._row(db, qid))

    def _claim(self, qid: int) -> tuple[dict, str]:
        """Claim a ``new`` item for drafting -> (the item, the claim's token)."""
        token = f"{self.owner}:{uuid.uuid4().hex[:8]}"  # one per claim, not per queue
        with self._lock:
            db = self._open()
            now = time.time()
            cur = db.execute(
                "UPDATE queue SET status='drafting', owner=?, lease_until=?, version=version+1, "
                "updated=? WHERE id=? AND status='new'",
                (token, now + self.lease_s, now, qid),
            )
            row = self._row(db, qid)
            if cur.rowcount == 0:
                raise APIError(
                    409,
                    f"queue item {qid} is {row['status']}; only new items are drafted",
                    param="id",
                    code="not_new",
                )
            return _item(row), token

    def _renew(self, qid: int, token: str) -> bool:
        """Extend the claim ``token`` on ``qid``; False when it is no longer held. A claim
        whose lease ran out but that nobody released or took is still held."""
        with self._lock:
            cur = self._conn().execute(
                "UPDATE queue SET lease_until=? WHERE id=? AND status='drafting' AND owner=?",
                (time.time() + self.lease_s, qid, token),
            )
            return cur.rowcount > 0

    def _finish(self, qid: int, record: dict | None, token: str) -> tuple[dict, bool]:
        """Store a draft (status ``review``), or release the claim (``record`` None), if the
        claim ``token`` is still held -> (the item now, whether it was). A claim lost
        meanwhile (its lease ran out and the item was released, or claimed again) leaves the
        item as it is."""
        with self._lock:
            db = self._conn()  # not _open: a claim that ran out but is still ours counts
            held = "WHERE id=? AND status='drafting' AND owner=?"
            if record is None:
                cur = db.execute(
                    "UPDATE queue SET status='new', owner=NULL, version=version+1, updated=? "
                    + held,
                    (time.time(), qid, token),
                )
            else:
                cur = db.execute(
                    "UPDATE queue SET status='review', owner=NULL, draft=?, reply=?, "
                    "version=version+1, updated=? " + held,
                    (
                        json.dumps(record, ensure_ascii=False),
                        record.get("reply", ""),
                        time.time(),
                        qid,
                        token,
                    ),
                )
            row = self._row(db, qid)
            if cur.rowcount == 0:
                log.warning(
                    "ticket queue: the claim on item %d ran out during its draft; the draft "
                    "is dropped (the item is %s now)",
                    qid,
                    row["status"],
                )
            return _item(row), cur.rowcount > 0

    async def _keep_claim(self, qid: int, token: str, done: asyncio.Event) -> None:
        """Renew the claim on ``qid`` every third of the lease until ``done``; a failed
        renewal (the file locked by another server, say) is tried again at the next tick."""
        while True:
            try:
                await asyncio.wait_for(done.wait(), self.lease_s / 3)
                return
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                pass
            try:
                held = await asyncio.to_thread(self._renew, qid, token)
            except Exception:  # noqa: BLE001 - logged; the lease has two more ticks
                log.warning(
                    "ticket queue: renewing the claim on item %d failed", qid, exc_info=True
                )
                continue
            if not held:
                log.warning("ticket queue: the claim on item %d was lost mid-draft", qid)
                return

    async def draft(self, qid: int) -> dict:
        """Draft the reply of a ``new`` item with the ticket service: the same record
        ``POST /v1/tickets/reply`` returns. A busy or reloading model releases the claim and
        raises (the caller retries); a ticket that does not fit the context is drafted as an
        error record for a human."""
        if self.tickets is None:
            raise APIError(
                404,
                "ticket replies need an index: start docqa with --index or --docs",
                code="retrieval_disabled",
            )
        item, token = await asyncio.to_thread(self._claim, qid)
        done = asyncio.Event()
        keeper = asyncio.create_task(self._keep_claim(qid, token, done))
        try:
            try:
                record = await self.tickets.reply(item["ticket"])
            except PromptTooLong as exc:
                record = {"id": str(item["ticket"].get("id")), "error": str(exc)}
                record["decision"] = "human"
        except BaseException:
            done.set()
            keeper.cancel()
            self._finish(qid, None, token)
            raise
        done.set()
        keeper.cancel()
        # a cancellation from here on cannot lose the draft: the thread storing it runs to
        # its end even when its awaiter is cancelled
        item, stored = await asyncio.to_thread(self._finish, qid, record, token)
        if not stored:
            raise APIError(
                409,
                f"the claim on queue item {qid} ran out while it was drafted (it is "
                f"{item['status']} now); the draft was dropped",
                param="id",
                code="claim_lost",
            )
        return item
