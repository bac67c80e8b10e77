"""Support-ticket replies: cleaning, decisions, sources, resume, CLI over a real server."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from server.services.tickets import clean_ticket, split_questions, support
from server.tickets_cli import read_tickets, reply_all

from .conftest import FIXTURES

TICKETS = FIXTURES / "tickets" / "tickets.jsonl"


def test_clean_ticket_strips_quotes_signatures_greetings():
    body = (
        "Hi team,\n\nHow do I set the port?\n\nBest regards,\nAlice\n\n"
        "On Tue, Bob wrote:\n> old stuff?\n"
    )
    assert clean_ticket("Re: Re: Setup", body) == "Setup\nHow do I set the port?"
    assert "old stuff" not in clean_ticket("", "Q?\n> quoted?\n> more")
    assert clean_ticket("", "Q here?\n-- \nsig line") == "Q here?"


def test_split_questions():
    assert split_questions("Where is it? Also, how do I stop it? Thanks.", 4) == [
        "Where is it?",
        "Also, how do I stop it?",
    ]
    assert split_questions("Please describe the install", 4) == ["Please describe the install"]
    assert split_questions("", 4) == []


def test_support_score():
    assert support("uses port 7431", "Zephyrd listens on port 7431") == pytest.approx(2 / 3)
    assert support("", "x") == 0.0


def test_read_tickets_handles_bad_lines(tmp_path):
    ts = read_tickets(TICKETS)
    assert len(ts) == 8 and "_error" in ts[-1]
    d = tmp_path / "mail"
    d.mkdir()
    (d / "a.txt").write_text("How do I install it?")
    (d / "b.eml").write_text("Subject: Ports\nFrom: x@y.z\n\nWhich port is used?\n")
    got = {t["id"]: t for t in read_tickets(d)}
    assert got["b.eml"]["subject"] == "Ports" and "port" in got["b.eml"]["body"]


@pytest.fixture(scope="module")
def ticket_server(server_factory, tmp_path_factory):
    docs = tmp_path_factory.mktemp("tdocs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    return server_factory(
        {
            "model": {"n_ctx": 2048},
            "retrieval": {
                "docs_dir": str(docs),
                "chunk_tokens": 120,
                "chunk_overlap": 20,
                "top_k": 3,
            },
            # the fixture docs are tiny: t7's "how do I cancel a job?" scores 0.355 (fp32 query)
            # / 0.350 (int8 query) against them, on the default 0.35 line; these tests check
            # ticket handling, not that threshold (calibrated on the Nitro docs)
            "tickets": {"max_tokens": 60, "min_similarity": 0.3},
        },
        "tickets",
    )


def test_http_reply_one_ticket(ticket_server):
    r = httpx.post(
        ticket_server.url + "/v1/tickets/reply",
        timeout=120,
        json={
            "id": 1,
            "subject": "Port",
            "body": "Which port does the Zephyrd HTTP API use?",
            "team": "eu",
        },
    )
    rec = r.json()
    assert r.status_code == 200, rec
    assert {"id", "reply", "sources", "confidence", "decision", "reason"} <= set(rec)
    assert rec["team"] == "eu" and rec["reply"]
    assert "guide/install.md" in [s["path"] for s in rec["sources"]]
    assert 0 <= rec["confidence"] <= 1
    r = httpx.post(ticket_server.url + "/v1/tickets/reply", json={"subject": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "id"


def test_batch_decisions_and_resume(ticket_server, tmp_path):
    out = tmp_path / "out.jsonl"
    tickets = read_tickets(TICKETS)
    # an interrupted run: only the first three were written
    reply_all(tickets[:3], out, ticket_server.url + "/v1", progress=False)
    counts = reply_all(tickets, out, ticket_server.url + "/v1", progress=False)
    assert counts["skipped"] == 3
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [str(t["id"]) for t in tickets]  # input order, no dupes
    by = {r["id"]: r for r in recs}
    assert "guide/install.md" in [s["path"] for s in by["t1"]["sources"]]
    assert "guide/config.md" in [s["path"] for s in by["t2"]["sources"]]
    assert "refund" not in by["t2"]["reason"]  # the quoted history was stripped
    assert by["t3"]["decision"] == "human" and "out of scope" in by["t3"]["reason"]
    assert by["t4"]["decision"] == "human" and "error" in by["t4"]
    assert by["t5"]["decision"] == "human" and "error" in by["t5"]
    assert by["t6"]["decision"] == "human" and by["t6"]["sources"] == []
    paths7 = {s["path"] for s in by["t7"]["sources"]}
    assert {"guide/config.md", "api/openapi.yaml"} & paths7
    assert by["line-8"]["decision"] == "human" and "error" in by["line-8"]
