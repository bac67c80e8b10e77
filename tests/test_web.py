"""The support agents' page (server/web) in a real browser (Debian's Chromium driven by
Playwright) against a real server with the embedded model and the fixture docs; plus the ticket
queue's storage and HTTP endpoints. Screenshots of the three views go to docs/img/."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from server.errors import APIError
from server.launch import ServerProcess
from server.services.ticket_queue import TicketQueue, parse_upload

from .conftest import FIXTURES, ROOT

CHROMIUM = Path("/usr/bin/chromium")
IMG = ROOT / "docs" / "img"
KEY = "desk-key-20"
CAP = 4096  # server.max_upload_bytes for the browser server: small, to test the cap


# -- the queue's storage (no model) --------------------------------------------------------
def test_queue_storage_roundtrip(tmp_path):
    db = tmp_path / "data" / "q.sqlite3"
    q = TicketQueue(db, None, 0.3)
    a, b = q.add(
        [
            {"id": "t1", "subject": "Port", "body": "Which port?", "customer": "acme"},
            {"subject": "", "body": "no id here"},
        ],
        "x.jsonl",
    )
    assert (a["status"], b["ticket"]["id"]) == ("new", f"web-{b['id']}")
    with pytest.raises(APIError) as e:
        q.update(a["id"], status="approved")  # no reply yet
    assert e.value.status == 400 and e.value.param == "reply"
    a2 = q.update(a["id"], reply="Port 7431.", status="approved", version=a["version"])
    assert a2["version"] == a["version"] + 1
    with pytest.raises(APIError) as e:  # a stale tab
        q.update(a["id"], reply="other", version=a["version"])
    assert e.value.status == 409 and e.value.code == "version_conflict"
    with pytest.raises(APIError) as e:
        q.update(999, reply="x")
    assert e.value.status == 404
    q._claim(b["id"])  # a draft was running when the server stopped
    q.close()
    q = TicketQueue(db, None, 0.3)  # reopened: the same queue, the claim released
    time.sleep(0.35)  # once its lease ran out
    items = {it["id"]: it for it in q.list()}
    assert items[a["id"]]["reply"] == "Port 7431." and items[b["id"]]["status"] == "new"
    [rec] = q.export()
    assert rec["id"] == "t1" and rec["reply"] == "Port 7431." and rec["customer"] == "acme"
    assert rec["edited"] is True  # no draft: the reply is the agent's own
    q.close()


def test_two_servers_sharing_a_queue_do_not_draft_one_item_twice(tmp_path):
    """Each server's queue holds its claims as leases: another server neither releases nor
    drafts an item held by a live one (before: every start released every claim, and a
    draft was stored whoever held the item); a claim that ran out is drafted again, and the
    late draft of its first holder is dropped, not stored over the new one."""
    db = tmp_path / "q.sqlite3"
    a, b = TicketQueue(db, None, 1.0), TicketQueue(db, None, 1.0)
    [item] = a.add([{"id": "t1", "body": "Which port?"}])
    _, ta = a._claim(item["id"])
    c = TicketQueue(db, None, 1.0)  # a third server starting: the live claim stays
    assert c.get(item["id"])["status"] == "drafting"
    with pytest.raises(APIError) as e:
        b._claim(item["id"])
    assert (e.value.status, e.value.code) == (409, "not_new")
    for _ in range(4):  # renewed, the claim outlives its lease
        time.sleep(0.3)
        assert a._renew(item["id"], ta)
    assert b.get(item["id"])["status"] == "drafting"
    time.sleep(1.2)  # a stopped renewing (its server died): the item is new again
    assert b.get(item["id"])["status"] == "new"
    _, tb = b._claim(item["id"])
    assert not a._renew(item["id"], ta)
    late, stored = a._finish(item["id"], {"reply": "from a"}, ta)  # a's draft came too late
    assert not stored and (late["status"], late["draft"]) == ("drafting", None)
    done, stored = b._finish(item["id"], {"reply": "from b"}, tb)
    assert stored and (done["status"], done["reply"]) == ("review", "from b")
    for q in (a, b, c):
        q.close()


def test_a_claim_is_its_own_not_its_servers(tmp_path):
    """Two claims of one server on one item (the first ran out, a second tab drafted it
    again): the first draft's release or result touches neither the second claim nor the
    item; a claim that ran out but that nobody released or took is still stored."""
    db = tmp_path / "q.sqlite3"
    q = TicketQueue(db, None, 0.3)
    [item] = q.add([{"id": "t1", "body": "Which port?"}])
    _, first = q._claim(item["id"])
    time.sleep(0.4)
    assert q.list()[0]["status"] == "new"  # released: its lease ran out
    _, second = q._claim(item["id"])
    assert q._finish(item["id"], None, first)[1] is False  # the first draft failed late
    assert q.get(item["id"])["status"] == "drafting"
    assert not q._renew(item["id"], first) and q._renew(item["id"], second)
    time.sleep(0.4)  # the second ran out too, but nobody looked: its draft is stored
    done, stored = q._finish(item["id"], {"reply": "Port 3928."}, second)
    assert stored and done["status"] == "review"
    q.close()


def test_a_draft_longer_than_the_lease_keeps_its_claim(tmp_path):
    """While a draft runs, its server renews the claim: another server sees the item held
    throughout, and the draft is stored when it ends."""
    import asyncio

    db = tmp_path / "q.sqlite3"
    seen = []

    class SlowTickets:  # the ticket service's part the queue uses: reply(ticket) -> record
        async def reply(self, ticket):
            for _ in range(5):
                await asyncio.sleep(1.0)
                seen.append(other.get(item["id"])["status"])
            return {"id": ticket["id"], "reply": "Port 3928."}

    # a lease of 2 s (renewed every 0.67 s) leaves room for a loaded CI machine: at 0.6 s a
    # renewal's thread was once late enough for the claim to run out
    q, other = TicketQueue(db, SlowTickets(), 2.0), TicketQueue(db, None, 2.0)
    [item] = q.add([{"id": "t1", "body": "Which port?"}])
    done = asyncio.run(q.draft(item["id"]))
    assert seen == ["drafting"] * 5  # 5 s of drafting under a 2 s lease
    assert (done["status"], done["reply"]) == ("review", "Port 3928.")
    q.close()
    other.close()


def test_a_failed_renewal_is_tried_again_and_a_lost_claim_is_a_409(tmp_path, monkeypatch):
    import asyncio
    import sqlite3

    db = tmp_path / "q.sqlite3"
    q = TicketQueue(db, None, 0.6)
    renew, fails = q._renew, []

    def flaky(qid, token):  # the file locked by another server, once
        if not fails:
            fails.append(qid)
            raise sqlite3.OperationalError("database is locked")
        return renew(qid, token)

    monkeypatch.setattr(q, "_renew", flaky)

    class SlowTickets:
        steal = False

        async def reply(self, ticket):
            await asyncio.sleep(1.0)
            if self.steal:  # another server took the item meanwhile
                with sqlite3.connect(db) as other:
                    other.execute("UPDATE queue SET owner='elsewhere' WHERE id=?", (item["id"],))
            return {"id": ticket["id"], "reply": "Port 3928."}

    q.tickets = SlowTickets()
    [item] = q.add([{"id": "t1", "body": "Which port?"}])
    done = asyncio.run(q.draft(item["id"]))  # 1 s under a 0.6 s lease, one renewal failed
    assert fails and done["status"] == "review"
    [item] = q.add([{"id": "t2", "body": "Which port?"}])
    q.tickets.steal = True
    with pytest.raises(APIError) as e:
        asyncio.run(q.draft(item["id"]))
    assert (e.value.status, e.value.code) == (409, "claim_lost")
    assert q.get(item["id"])["draft"] is None  # not stored over the new holder's
    q.close()


def test_a_queue_file_from_before_leases_is_opened_and_its_claims_released(tmp_path):
    import sqlite3

    db = tmp_path / "q.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT NOT NULL, "
        "origin TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT 'new', draft TEXT, "
        "reply TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '', version INTEGER NOT "
        "NULL DEFAULT 1, created REAL NOT NULL, updated REAL NOT NULL);"
        "INSERT INTO queue (ticket, status, created, updated) "
        "VALUES ('{\"id\": \"x\"}', 'drafting', 0, 0);"
    )
    old.commit()
    old.close()
    import threading

    queues = [TicketQueue(db, None, 30) for _ in range(4)]  # servers opening it at once
    gate, errors = threading.Barrier(4), []

    def open_one(q):
        gate.wait()
        try:
            q.list()
        except Exception as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors  # before: "duplicate column name" for all but one
    for extra in queues[1:]:
        extra.close()
    q = queues[0]
    [it] = q.list()
    assert it["status"] == "new" and it["ticket"] == {"id": "x"}
    _, token = q._claim(it["id"])
    assert q._finish(it["id"], {"reply": "r"}, token)[0]["status"] == "review"
    q.close()


def test_parse_upload_reports_bad_input():
    ok = b'{"id": "a", "body": "Which port?"}\n\n{broken\n[1, 2]\n{"subject": "Hi"}\n'
    tickets, errors = parse_upload("t.jsonl", ok, 10_000)
    assert [t["id"] for t in tickets] == ["a", "line-5"]
    assert [e["line"] for e in errors] == [3, 4]
    [t], _ = parse_upload("m.eml", b"Subject: Ports\n\nWhich port is used?\n", 10_000)
    assert t == {"id": "m.eml", "subject": "Ports", "body": "Which port is used?\n"}
    latin = (  # a mail in its own charset is read in it (before: refused as not UTF-8)
        "Subject: Port\nContent-Type: text/plain; charset=iso-8859-1\n\nQuel port, café?\n"
    ).encode("latin-1")
    [t], _ = parse_upload("l.eml", latin, 10_000)
    assert t["body"] == "Quel port, café?\n"
    odd = b"Subject: x\nContent-Type: text/plain; charset=x-nonesuch\n\nhello\n"
    with pytest.raises(APIError) as e:  # an unknown charset: a 400 (before: a 500)
        parse_upload("odd.eml", odd, 10_000)
    assert (e.value.status, e.value.code) == (400, "not_text")
    # found by a review: .json was read line by line (the paste body became one ticket
    # wrapping the others), and a ticket with no text was added
    paste = b'{"tickets": [{"subject": "a", "body": "Which port?"}, {}, {"body": "Logs?"}]}'
    tickets, errors = parse_upload("t.json", paste, 10_000)
    assert [(t["id"], t["subject"] if "subject" in t else None) for t in tickets] == [
        ("ticket-1", "a"),
        ("ticket-3", None),
    ]
    assert errors == [{"line": 2, "message": "a ticket needs a subject or a body"}]
    pretty = b'[\n  {"id": "x", "body": "Which port?"}\n]\n'
    assert [t["id"] for t in parse_upload("p.json", pretty, 10_000)[0]] == ["x"]
    assert parse_upload("e.jsonl", b"{}\n", 10_000) == (
        [],
        [{"line": 1, "message": "a ticket needs a subject or a body"}],
    )
    for name, data, status, code in [
        ("big.txt", b"x" * 101, 413, "file_too_large"),
        ("bin.txt", b"abc\x00def", 400, "not_text"),
        ("latin.txt", "café".encode("latin-1"), 400, "not_text"),
        ("logo.png", b"png", 400, "unsupported_file_type"),
    ]:
        with pytest.raises(APIError) as e:
            parse_upload(name, data, 100)
        assert (e.value.status, e.value.code, e.value.param) == (status, code, "file")


# -- a real server and a real browser -----------------------------------------------------
def _config(docs: Path, data: Path, key: str | None = None) -> dict:
    return {
        "server": {"data_dir": str(data), "max_upload_bytes": CAP, "api_key": key},
        "model": {"n_ctx": 1024, "default_max_tokens": 48},
        "retrieval": {
            "docs_dir": str(docs),
            "index_dir": str(docs.parent / "web-index"),
            "chunk_tokens": 120,
            "chunk_overlap": 20,
            "top_k": 3,
        },
        # as in test_tickets: the tiny fixture docs sit near the default similarity line
        "tickets": {"max_tokens": 48, "min_similarity": 0.3},
    }


@pytest.fixture(scope="module")
def web(server_factory, tmp_path_factory):
    docs = tmp_path_factory.mktemp("webdocs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    data = tmp_path_factory.mktemp("webdata")
    s = server_factory(_config(docs, data), "web")
    s.docs, s.data = docs, data
    return s


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed (apt-get install chromium; make install does it)"
        )
    from playwright.sync_api import sync_playwright  # a dev dependency: missing is an error

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield b
        b.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=120_000)
    return pw_expect(locator)


def _page(browser, url: str, width: int = 1280, height: int = 800):
    """A fresh page (own storage) that records every request leaving the server."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = ctx.new_page()
    page.outside = []
    page.console_errors = []
    page.on(
        "request",
        lambda r: None if r.url.startswith((url, "blob:", "data:")) else page.outside.append(r.url),
    )
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.set_default_timeout(120_000)
    return page


def _shot(page, name: str) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMG / name), full_page=False)


UNLABELLED_JS = """() => [...document.querySelectorAll(
    'main input, main textarea, main select, main button')]
  .filter(e => e.offsetParent !== null && !(e.labels && e.labels.length)
    && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map(e => e.id || e.outerHTML)"""


def _fits(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_page_is_served_offline_and_labelled(browser, web):
    r = httpx.get(web.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(web.url + "/web/../app.py").status_code == 404
    cfg = httpx.get(web.url + "/web/config.json").json()
    assert (
        cfg["auth"] is False and cfg["max_upload_bytes"] == CAP and ".md" in cfg["document_types"]
    )
    page = _page(browser, web.url)
    page.goto(web.url + "/")
    for view in ("ask", "tickets", "documents"):
        page.goto(f"{web.url}/#{view}")
        page.wait_for_selector(f"#view-{view}:not([hidden])")
        unlabelled = page.evaluate(UNLABELLED_JS)
        assert unlabelled == [], view
        assert _fits(page), f"{view} overflows at 1280 px"
    page.set_viewport_size({"width": 380, "height": 800})
    for view in ("ask", "tickets", "documents"):
        page.goto(f"{web.url}/#{view}")
        assert _fits(page), f"{view} overflows at 380 px"
    assert page.outside == [] and page.console_errors == []
    page.context.close()


def test_ask_streams_answer_with_highlighted_evidence(browser, web):
    page = _page(browser, web.url)
    page.goto(web.url + "/")
    # keyboard only: Tab from the top reaches the question box, Enter asks
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
        if order[-1] == "question":
            break
    assert order[-1] == "question", order
    assert order.index("nav-ask") < order.index("nav-tickets") < order.index("question")
    page.keyboard.type("Which port does the Zephyrd HTTP API listen on?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#answer-box.answered", timeout=120_000)
    assert page.inner_text("#answer").strip()
    assert page.inner_text("#answer-kind").startswith("Grounded in")
    paths = page.eval_on_selector_all("#sources .path", "els => els.map(e => e.textContent)")
    assert "guide/install.md" in paths
    marks = page.eval_on_selector_all(
        "#sources details[open] mark", "els => els.map(e => e.textContent)"
    )
    all_marks = page.eval_on_selector_all("#sources mark", "els => els.map(e => e.textContent)")
    assert marks and any("7431" in m for m in all_marks), all_marks
    # every source opens (keyboard: its summary is focusable) to its excerpt
    n = page.locator("#sources summary").count()
    for i in range(n):
        page.locator("#sources summary").nth(i).focus()
        if not page.locator("#sources details").nth(i).evaluate("d => d.open"):
            page.keyboard.press("Enter")
        assert page.locator("#sources details").nth(i).evaluate("d => d.open")
    for i in range(1, n):  # back to the first excerpt only, for the screenshot
        page.locator("#sources summary").nth(i).focus()
        page.keyboard.press("Enter")
    page.focus("#question")
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, "ask.png")
    page.focus("#copy-md")
    page.keyboard.press("Enter")
    expect(page.locator("#copy-status")).not_to_be_empty()
    md = page.evaluate("navigator.clipboard.readText()")
    assert md.startswith("**Question:** Which port") and "**Sources**" in md
    assert "[1] `" in md and "guide/install.md" in md and "7431" in md
    # an answer the docs do not hold is shown as an abstention, not as an answer
    page.fill("#question", "What is a good recipe for chocolate cake?")
    page.click("#ask-btn")
    page.wait_for_selector("#answer-box.abstained", timeout=120_000)
    assert page.inner_text("#answer-kind") == "Not in the documentation"
    assert page.is_visible("#sources-empty") and page.locator("#sources li").count() == 0
    assert page.outside == [] and page.console_errors == []
    page.context.close()


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_ask_flags_what_the_answer_names_without_a_source(browser, web):
    """The rendering of a grounded answer's ``unsupported`` names and of a source the answer
    did not cite (``cited: false``), from a canned stream in the server's shape (the server's
    side: tests/test_api_rag.py and tests/test_reader.py); a real answer clears the flag."""
    src = {"path": "guide/config.md", "heading": "Threads", "score": 0.9, "evidence": []}
    final = {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "sources": [
            {**src, "index": 1, "id": "a", "text": "Chat.", "cited": True},
            {**src, "index": 2, "id": "b", "text": "Set thread_num.", "cited": False},
        ],
        "unsupported": ["fast_threads"],
    }
    body = _sse({"choices": [{"index": 0, "delta": {"content": "Set `fast_threads` [1]."}}]}, final)
    page = _page(browser, web.url)
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    page.goto(web.url + "/")
    page.fill("#question", "How many threads?")
    page.click("#ask-btn")
    page.wait_for_selector("#answer-box.answered")
    expect(page.locator("#unsupported")).to_be_visible()
    assert page.eval_on_selector_all("#unsupported code", "els => els.map(e => e.textContent)") == [
        "fast_threads"
    ]
    badges = page.eval_on_selector_all("#sources summary", "els => els.map(e => e.textContent)")
    assert "not cited" not in badges[0] and "holds the answer, not cited" in badges[1]
    page.unroute("**/v1/chat/completions")
    page.fill("#question", "What is a good recipe for chocolate cake?")  # the real server
    page.click("#ask-btn")
    page.wait_for_selector("#answer-box.abstained")
    assert not page.is_visible("#unsupported")
    assert page.outside == [] and page.console_errors == []
    page.context.close()


TICKETS_JSONL = (
    json.dumps(
        {
            "id": "t1",
            "subject": "Port question",
            "customer": "acme",
            "body": "Hi team,\n\nWhich port does the Zephyrd HTTP API listen on by default?",
        }
    )
    + "\n{this line is not json\n"
    + json.dumps(
        {
            "id": "t3",
            "subject": "Refund",
            "customer": "initech",
            "body": "I was charged twice on my invoice. Please refund my credit card.",
        }
    )
    + "\n"
)


def test_tickets_upload_draft_approve_export(browser, web):
    page = _page(browser, web.url)
    other = _page(browser, web.url)  # a second window on the same queue
    page.goto(web.url + "/#tickets")
    other.goto(web.url + "/#tickets")
    page.select_option("#queue-filter", "")  # all, not only the open ones
    page.set_input_files(
        "#ticket-files",
        [
            {
                "name": "batch.jsonl",
                "mimeType": "application/x-ndjson",
                "buffer": TICKETS_JSONL.encode(),
            },
            {"name": "scan.txt", "mimeType": "text/plain", "buffer": b"%PDF\x00\x01\x02binary"},
            {"name": "huge.txt", "mimeType": "text/plain", "buffer": b"word " * CAP},
            {
                "name": "mail.eml",
                "mimeType": "message/rfc822",
                "buffer": b"Subject: Config file\n\nWhere does the configuration file live?\n",
            },
        ],
    )
    page.click("#ticket-upload-form button[type=submit]")
    res = page.locator("#ticket-upload-results")
    expect(res.locator("li[data-file]")).to_have_count(4)
    expect(res.locator("li[data-file]", has_text="uploading")).to_have_count(0)
    rows = {li.get_attribute("data-file"): li for li in res.locator("li[data-file]").all()}
    assert "2 tickets added" in rows["batch.jsonl"].inner_text()
    assert "line 2" in rows["batch.jsonl"].inner_text()
    assert "not a text file" in rows["scan.txt"].inner_text()
    assert rows["scan.txt"].get_attribute("class") == "err"
    assert "too large" in rows["huge.txt"].inner_text()
    assert "1 ticket added" in rows["mail.eml"].inner_text()
    # every ticket gets a draft with confidence, decision and reason
    expect(page.locator("#queue .qitem")).to_have_count(3)
    expect(page.locator("#queue .qitem.status-review")).to_have_count(3, timeout=180_000)
    items = {
        it["ticket"]["id"]: it for it in httpx.get(web.url + "/v1/tickets/queue").json()["data"]
    }
    assert set(items) == {"t1", "t3", "mail.eml"}
    assert (
        items["t3"]["draft"]["decision"] == "human"
        and "out of scope" in items["t3"]["draft"]["reason"]
    )
    t1 = items["t1"]
    card = page.locator(f"#q-{t1['id']}")
    assert "confidence" in card.inner_text() and "decision:" in card.inner_text()
    assert "Why:" in card.inner_text()
    # the agent edits and approves t1 (keyboard), escalates t3
    edited = "Zephyrd's HTTP API listens on port 7431 by default. [edited by agent]"
    card.locator("textarea").fill(edited)
    card.locator("button", has_text="Approve").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#q-{t1['id']}.status-approved", state="attached")
    t3 = page.locator(f"#q-{items['t3']['id']}")
    t3.locator("input").fill("billing: hand to the accounts team")
    t3.locator("button", has_text="Escalate").click()
    page.wait_for_selector(f"#q-{items['t3']['id']}.status-escalated", state="attached")
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, "tickets.png")
    # the other window sees the same queue (it polls)
    other.select_option("#queue-filter", "")
    other.wait_for_selector(f"#q-{t1['id']}.status-approved", state="attached", timeout=15_000)
    assert other.locator(f"#q-{t1['id']} textarea").input_value() == edited
    other.wait_for_selector(f"#q-{items['t3']['id']}.status-escalated", state="attached")
    # export: the approved reply, as edited
    with page.expect_download() as dl:
        page.click("#queue-export")
    lines = Path(dl.value.path()).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["id"] for r in recs] == ["t1"]
    assert recs[0]["reply"] == edited and recs[0]["edited"] is True
    assert recs[0]["customer"] == "acme" and recs[0]["decision"] in ("auto", "human")
    assert page.outside == [] and page.console_errors == [] and other.console_errors == []
    page.context.close()
    other.context.close()


def test_a_busy_server_gets_the_draft_asked_again(browser, web):
    """Found by a review: after a 503 the page waited its Retry-After, then skipped the item
    for good (it stayed "new" until the agent reloaded)."""
    r = httpx.post(
        web.url + "/v1/tickets/queue",
        json={"id": "busy-1", "subject": "Port", "body": "Which port does the API listen on?"},
    )
    assert r.status_code == 200, r.text
    qid = r.json()["data"][0]["id"]
    page = _page(browser, web.url)
    calls = []

    def draft(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body=json.dumps(
                    {
                        "error": {
                            "message": "queue full",
                            "type": "server_error",
                            "param": None,
                            "code": "queue_full",
                        }
                    }
                ),
            )
        else:
            route.continue_()

    page.route("**/v1/tickets/queue/*/draft", draft)
    page.goto(web.url + "/#tickets")
    page.select_option("#queue-filter", "")
    page.wait_for_selector(f"#q-{qid}.status-review", state="attached", timeout=180_000)
    assert len(calls) >= 2 and page.console_errors == []
    page.context.close()


def test_queue_http_errors(web):
    url = web.url + "/v1/tickets/queue"
    item = httpx.post(url, json={"subject": "Stale", "body": "Which port?"}).json()["data"][0]
    one = f"{url}/{item['id']}"
    bad = [
        (httpx.patch(url + "/999999", json={"reply": "x"}), 404, "id"),
        (httpx.patch(one, json={"status": "sent"}), 400, "status"),
        (httpx.patch(one, json={"version": 0}), 400, "version"),
        (httpx.patch(one, json={"status": "approved"}), 400, "reply"),
        (httpx.get(url, params={"status": "nope"}), 400, "status"),
        (httpx.post(url, json={"tickets": []}), 400, "tickets"),
        (httpx.post(url, json={"tickets": [{"body": "  "}]}), 400, "tickets.0"),
        (httpx.post(url, files={"file": ("x.png", b"png", "image/png")}), 400, "file"),
        (httpx.post(url, files={"upload": ("x.txt", b"Which port?")}), 400, "file"),
        (httpx.post(web.url + "/v1/documents", files={"upload": ("x.md", b"# A")}), 400, "file"),
        (httpx.post(url, files={"file": ("x.txt", b"a" * (CAP + 1), "text/plain")}), 413, "file"),
        (
            httpx.post(web.url + "/v1/documents", files={"file": ("x.md", b"a" * (CAP + 1))}),
            413,
            "file",
        ),
    ]
    for r, status, param in bad:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    # a list of tickets is read as an upload's .json file is
    two = [{"subject": "A", "body": "Which port?"}, {"subject": "B", "body": "Which host?"}]
    r = httpx.post(url, json=two)
    assert r.status_code == 200 and [t["ticket"]["subject"] for t in r.json()["data"]] == ["A", "B"]
    v = item["version"]
    assert httpx.patch(one, json={"note": "a", "version": v}).status_code == 200
    r = httpx.patch(one, json={"note": "b", "version": v})  # a tab that did not reload
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict"
    r = httpx.post(one + "/draft", json={}, timeout=120)  # as POST /v1/tickets/reply drafts
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "review" and r.json()["draft"]["decision"] in ("auto", "human")
    r = httpx.post(one + "/draft", json={})  # not new any more
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_new"


def test_documents_upload_and_delete(browser, web):
    page = _page(browser, web.url)
    page.goto(web.url + "/#documents")
    page.wait_for_selector("#doc-table tbody tr")
    before = page.locator("#doc-table tbody tr").count()
    page.set_input_files(
        "#doc-files",
        [
            {
                "name": "flux.md",
                "mimeType": "text/markdown",
                "buffer": b"# Flux module\n\nThe flux capacitor of Zephyrd needs exactly "
                b"1.21 gigawatts, set with `flux_power_gw`.\n",
            },
            {"name": "logo.md", "mimeType": "text/markdown", "buffer": b"\x89PNG\x00\x00binary"},
            {"name": "big.md", "mimeType": "text/markdown", "buffer": b"# Big\n" + b"words " * CAP},
        ],
    )
    page.focus("#doc-upload-form button[type=submit]")
    page.keyboard.press("Enter")
    page.wait_for_selector("#doc-table tbody tr[data-path='flux.md']")
    rows = {
        li.get_attribute("data-file"): li.inner_text()
        for li in page.locator("#doc-upload-results li").all()
    }
    assert "indexed as flux.md" in rows["flux.md"]
    assert "binary" in rows["logo.md"] and "too large" in rows["big.md"]
    assert page.locator("#doc-table tbody tr").count() == before + 1
    chunks = page.inner_text("#doc-table tbody tr[data-path='flux.md'] td.num")
    assert int(chunks) >= 1
    _shot(page, "documents.png")
    # delete with the keyboard: Enter arms the button, Enter again deletes
    page.focus("button[aria-label='Delete flux.md']")
    page.keyboard.press("Enter")
    page.wait_for_selector("button[aria-label='Confirm delete flux.md']")
    page.keyboard.press("Enter")
    page.wait_for_selector("#doc-table tbody tr[data-path='flux.md']", state="detached")
    assert "flux.md" not in [d["path"] for d in httpx.get(web.url + "/v1/documents").json()["data"]]
    assert page.outside == [] and page.console_errors == []
    page.context.close()


def test_restart_with_api_key_keeps_queue(browser, web):
    """The queue survives a restart; with server.api_key set, the page asks for the key once
    and nothing works without it."""
    url = web.url + "/v1/tickets/queue"
    [kept] = httpx.post(url, json={"id": "r1", "body": "Where is the config file?"}).json()["data"]
    httpx.patch(f"{url}/{kept['id']}", json={"reply": "In /etc/zephyrd.", "status": "approved"})
    before = httpx.get(url).json()["data"]
    web.stop()
    s = ServerProcess(
        _config(web.docs, web.data, KEY), workdir=web.workdir, name="web-key", cwd=web.cwd
    )
    s.start()
    try:
        s.wait_ready(timeout=120)
        assert httpx.get(s.url + "/v1/tickets/queue").status_code == 401
        page = _page(browser, s.url)
        page.goto(s.url + "/#tickets")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert page.evaluate("document.activeElement.id") == "key-input"
        assert page.locator("#queue .qitem").count() == 0  # nothing without the key
        page.keyboard.type("wrong-key")
        page.keyboard.press("Enter")
        expect(page.locator("#key-error")).to_contain_text("refused")
        page.fill("#key-input", KEY)
        page.keyboard.press("Enter")
        dialog.wait_for(state="hidden")
        page.select_option("#queue-filter", "")
        expect(page.locator("#queue .qitem")).to_have_count(len(before))
        approved = [it for it in before if it["status"] == "approved"]
        assert kept["id"] in [it["id"] for it in approved]
        for it in approved:
            assert (
                page.locator(f"#q-{it['id']}.status-approved textarea").input_value() == it["reply"]
            )
        # asked once: the other views work with the stored key, no second prompt
        page.goto(s.url + "/#documents")
        page.wait_for_selector("#doc-table tbody tr")
        assert not dialog.is_visible()
        assert page.outside == [] and page.console_errors == []
        page.context.close()
    finally:
        s.stop()


def test_a_json_body_nested_too_deep_is_a_400():
    """Nesting under the body limit can still exhaust the parser's recursion: a 400, not a
    500."""
    from server.routes.ticket_queue import _tickets_from_json

    with pytest.raises(APIError) as e:
        _tickets_from_json(b"[" * 100_000 + b"]" * 100_000)
    assert (e.value.status, e.value.code) == (400, "invalid_json")
