"""`docqa reply --in FILE --out FILE`: draft replies for a batch of tickets, resumably."""

from __future__ import annotations

import contextlib
import json
import logging
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


def reply_all(
    tickets: list[dict], out: Path, base_url: str, api_key: str = "", progress: bool = True
) -> dict:
    finished = done_ids(out)
    todo = [t for t in tickets if str(t.get("id")) not in finished]
    counts = {"auto": 0, "human": 0, "skipped": len(tickets) - len(todo)}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with open(out, "a", encoding="utf-8") as f, httpx.Client(timeout=600) as client:
        for t in tqdm(todo, desc="tickets", disable=not progress):
            if "_error" in t:
                rec = {"id": str(t["id"]), "error": t["_error"], "decision": "human"}
            else:
                try:
                    r = client.post(
                        base_url.rstrip("/") + "/tickets/reply", json=t, headers=headers
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
    index: Optional[Path] = typer.Option(None, help="Index to answer from (default var/index)."),
    model: Optional[str] = typer.Option(None, help="Model to serve locally."),
    target: Optional[str] = typer.Option(None, help="A running docqa server URL instead."),
    api_key: str = typer.Option("", envvar="DOCQA_API_KEY", help="Key for --target."),
):
    """Draft grounded replies for support tickets; decide auto vs human for each."""
    from docqa.logs import setup_logging

    setup_logging("WARNING")
    tickets = read_tickets(src)
    if target:
        base = target.rstrip("/") + ("" if target.rstrip("/").endswith("/v1") else "/v1")
        counts = reply_all(tickets, out, base, api_key)
    else:
        from server.launch import local_server

        with local_server(model or "smollm2-135m-instruct", str(index or "var/index")) as base:
            counts = reply_all(tickets, out, base)
    typer.echo(
        f"{len(tickets)} tickets: {counts['auto']} auto, {counts['human']} human, "
        f"{counts['skipped']} already done -> {out}"
    )
