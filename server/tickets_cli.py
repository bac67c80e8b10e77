"""`docqa reply --in FILE --out FILE`: draft replies for a batch of tickets, resumably."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import httpx
import typer
from tqdm.auto import tqdm

from server.ticket_files import ticket_from_mail, tickets_from_jsonl

log = logging.getLogger(__name__)


def read_tickets(src: Path) -> list[dict]:
    """JSONL of {id, subject, body, ...}, or a folder of .txt/.eml files (id = file name).
    A line that is not valid JSON becomes a ticket with an error, never a crash. The same
    readers parse the files uploaded to the agent page's queue."""
    out: list[dict] = []
    if src.is_dir():
        for f in sorted(p for p in src.iterdir() if p.suffix.lower() in (".txt", ".eml")):
            try:
                out.append(ticket_from_mail(f.name, f.read_bytes()))
            except Exception as exc:  # noqa: BLE001
                out.append({"id": f.name, "_error": f"unreadable: {exc}"})
        return out
    text = src.read_text(encoding="utf-8", errors="replace")
    for n, t in tickets_from_jsonl(text):
        out.append({"id": f"line-{n}", "_error": f"unreadable: {t}"} if isinstance(t, str) else t)
    return out


def done_ids(out: Path) -> set[str]:
    ids = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ids.add(str(json.loads(line)["id"]))
    return ids


def _trim_partial_line(out: Path) -> None:
    """A run killed mid-write leaves a last line without its newline: cut it off, so the
    resumed run's first record starts on a line of its own (before: it was glued to it, and
    both were lost)."""
    if not out.is_file():
        return
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class Refused(Exception):
    """The server refused the key (401, 403): the run stops, nothing is recorded (before, every
    ticket was written down as a human one, and a rerun skipped them as done)."""


class _Transient(Exception):
    """A busy or unreachable server: the ticket is left for the next run, not recorded."""


def _post(client: httpx.Client, url: str, ticket: dict, headers: dict, tries: int, wait_max: float):
    """The server's answer; a 503 (busy, model loading) or a connection error is retried
    after Retry-After (at most ``wait_max`` s), ``tries`` times in all, then ``_Transient``."""
    for attempt in range(tries):
        try:
            r = client.post(url, json=ticket, headers=headers)
        except httpx.TransportError as exc:
            why, wait = f"{type(exc).__name__}: {exc}", 1.0
        else:
            if r.status_code != 503:
                return r
            why = f"503: {r.text[:200]}"
            try:
                wait = float(r.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
        if attempt + 1 < tries:
            time.sleep(min(max(wait, 0.0), wait_max))
    raise _Transient(why)


def reply_all(
    tickets: list[dict],
    out: Path,
    base_url: str,
    api_key: str = "",
    progress: bool = True,
    tries: int = 5,
    wait_max: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """Reply to every ticket not in ``out`` yet, appending a record per ticket. A ticket the
    server could not take (busy or unreachable after ``tries``) gets no record: counted as
    ``retry``, a rerun asks again."""
    _trim_partial_line(out)
    finished = done_ids(out)
    todo = [t for t in tickets if str(t.get("id")) not in finished]
    counts = {"auto": 0, "human": 0, "retry": 0, "skipped": len(tickets) - len(todo)}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/tickets/reply"
    with (
        open(out, "a", encoding="utf-8") as f,
        httpx.Client(timeout=600, transport=transport) as client,
    ):
        for t in tqdm(todo, desc="tickets", disable=not progress):
            if "_error" in t:
                rec = {"id": str(t["id"]), "error": t["_error"], "decision": "human"}
            else:
                try:
                    r = _post(client, url, t, headers, tries, wait_max)
                    if r.status_code in (401, 403):
                        raise Refused(
                            f"{base_url} refused the request (HTTP {r.status_code}): "
                            + ("a wrong key" if api_key else "it needs a key (--api-key)")
                        )
                    rec = (
                        r.json()
                        if r.status_code == 200
                        else {
                            "id": str(t["id"]),
                            "decision": "human",
                            "error": r.json().get("error", {}).get("message", r.text),
                        }
                    )
                except Refused:
                    raise
                except _Transient as exc:
                    log.warning("ticket %s left for the next run: %s", t.get("id"), exc)
                    counts["retry"] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - the run continues
                    rec = {
                        "id": str(t["id"]),
                        "error": f"{type(exc).__name__}: {exc}",
                        "decision": "human",
                    }
            counts[rec.get("decision", "human")] = counts.get(rec.get("decision", "human"), 0) + 1
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    return counts


def command(
    src: Path = typer.Option(..., "--in", exists=True, help="Tickets: JSONL or a folder."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (resumed if it exists)."),
    index: Optional[Path] = typer.Option(
        None, help="Index to answer from (default retrieval.index_dir)."
    ),
    model: Optional[str] = typer.Option(None, help="Model to serve locally."),
    target: Optional[str] = typer.Option(None, help="A running docqa server URL instead."),
    api_key: str = typer.Option("", envvar="DOCQA_API_KEY", help="Key for --target."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", exists=True, help="YAML settings file (the local server's)."
    ),
):
    """Draft grounded replies for support tickets; decide auto vs human for each."""
    from docqa.logs import setup_logging

    setup_logging("WARNING")
    tickets = read_tickets(src)
    try:
        counts = _run(tickets, out, index, model, target, api_key, config)
    except Refused as exc:
        typer.echo(f"docqa reply: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(
        f"{len(tickets)} tickets: {counts['auto']} auto, {counts['human']} human, "
        f"{counts['skipped']} already done, {counts['retry']} left for the next run (server "
        f"busy or unreachable) -> {out}"
    )


def _run(tickets, out, index, model, target, api_key, config) -> dict:
    if target:
        base = target.rstrip("/") + ("" if target.rstrip("/").endswith("/v1") else "/v1")
        return reply_all(tickets, out, base, api_key)
    else:
        from docqa.settings import load_settings
        from server.launch import local_server

        # the local server runs with these settings whole (YAML, environment), the model and
        # index given here over them, and is called with its own key
        s = load_settings(config, model={"model": model}, retrieval={"index_dir": index})
        if s.retrieval.index_dir is None:
            raise typer.BadParameter("no index: give --index or set retrieval.index_dir")
        key = s.server.api_key.get_secret_value() if s.server.api_key else ""
        with local_server(s.model.model, str(s.retrieval.index_dir), settings=s) as base:
            return reply_all(tickets, out, base, key)
