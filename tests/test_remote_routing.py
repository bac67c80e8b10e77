"""The remote endpoint pool's routing against scripted OpenAI-route servers on loopback (fast;
the real-backend tests are tests/test_remote.py): which failures move a job to another
endpoint, which reach the client and with which status, a cancel closing the request at
once, the served counts, and the served name checked once an endpoint lists its models."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from docqa.settings import load_settings
from server.errors import APIError
from server.generation import Delta, Finish, GenParams
from server.remote import EndpointPool, RemoteRuntime


class Scripted:
    """GET /v1/models lists ``models`` (503 while ``down``); POST .../completions answers as
    ``mode`` says: "ok" (a streamed 3-piece answer), "slow" (headers after ``delay`` s),
    an HTTP status (int), or "timeout" (a first line only after ``delay`` s)."""

    def __init__(self, mode="ok", models=("remote-m",), delay=5.0):
        self.mode, self.models, self.delay, self.down = mode, list(models), delay, False
        self.posts = 0
        self.closed_early = threading.Event()
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if me.down:
                    return self._send(503, b'{"error": {"message": "starting"}}')
                data = {"data": [{"id": m} for m in me.models]}
                self._send(200, json.dumps(data).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                me.posts += 1
                if isinstance(me.mode, int):
                    msg = {"error": {"message": f"scripted {me.mode}", "code": "x"}}
                    return self._send(me.mode, json.dumps(msg).encode())
                if me.mode == "slow":
                    time.sleep(me.delay)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    if me.mode == "timeout":
                        time.sleep(me.delay)
                    for piece in ("Port", " 3928", "."):
                        self._chunk({"choices": [{"delta": {"content": piece}}]})
                    self._chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]})
                    self._chunk("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    me.closed_early.set()

            def _chunk(self, obj):
                line = obj if isinstance(obj, str) else json.dumps(obj)
                data = f"data: {line}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()  # refused from now on


@pytest.fixture
def scripted():
    made = []

    def make(*a, **kw):
        made.append(Scripted(*a, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _pool(*servers, timeout=30.0, health=30.0) -> EndpointPool:
    ms = load_settings(
        model={
            "endpoints": [s.url for s in servers],
            "endpoint_timeout_s": timeout,
            "endpoint_health_s": health,
        }
    ).model
    return EndpointPool(ms, "remote-m", 8, lambda text: text.split())


def _params() -> GenParams:
    p = GenParams([1, 2, 3], 16, temperature=0.0)
    p.messages = [{"role": "user", "content": "Which port?"}]
    return p


async def _collect(job):
    text, fin = [], None
    async for ev in job:
        if isinstance(ev, Delta):
            text.append(ev.text)
        elif isinstance(ev, Finish):
            fin = ev
    return "".join(text), fin


def test_a_failing_endpoint_sends_the_job_elsewhere_without_being_marked_down(scripted):
    bad, good = scripted(500), scripted("ok")
    pool = _pool(bad, good)
    try:
        for _ in range(2):  # whichever is picked first, the answer comes from the good one
            text, fin = asyncio.run(_collect(pool.submit(_params())))
            assert (text, fin.reason) == ("Port 3928.", "stop")
        assert bad.posts >= 1 and all(e.healthy for e in pool.endpoints)
        assert [e.served for e in pool.endpoints] == [0, 2]
    finally:
        pool.close()


def test_every_endpoint_failing_is_a_502_and_4xx_are_mapped(scripted):
    a, b = scripted(500), scripted(500)
    pool = _pool(a, b)
    try:
        with pytest.raises(APIError) as e:
            asyncio.run(_collect(pool.submit(_params())))
        assert (e.value.status, e.value.code) == (502, "upstream_error")
        assert (a.posts, b.posts) == (1, 1)
        a.mode = b.mode = 401  # docqa's own key refused: not the client's fault
        with pytest.raises(APIError) as e:
            asyncio.run(_collect(pool.submit(_params())))
        assert (e.value.status, e.value.code) == (502, "upstream_error")
        assert "HTTP 401" in str(e.value)
        a.mode = b.mode = 400  # the request's own fault: passed through
        with pytest.raises(APIError) as e:
            asyncio.run(_collect(pool.submit(_params())))
        assert e.value.status == 400 and "scripted 400" in str(e.value)
    finally:
        pool.close()


def test_every_endpoint_unreachable_is_a_503_with_retry_after(scripted):
    """Endpoints found dead on the way (not by a health check yet) are unavailable, not failing:
    a 503 the client may retry after, as when none was healthy at submit."""
    a, b = scripted("ok"), scripted(500)
    pool = _pool(a, b)
    try:
        a.close()
        b.close()
        assert all(e.healthy for e in pool.endpoints)  # no health check ran since
        with pytest.raises(APIError) as e:
            asyncio.run(_collect(pool.submit(_params())))
        assert (e.value.status, e.value.code) == (503, "endpoints_unavailable")
        assert "Retry-After" in e.value.headers
        assert not any(ep.healthy for ep in pool.endpoints)
    finally:
        pool.close()


def test_a_timeout_is_a_504_and_is_not_sent_again(scripted):
    slow, other = scripted("timeout", delay=3.0), scripted("ok")
    pool = _pool(slow, other, timeout=0.5)
    try:
        other.posts = 0
        with pytest.raises(APIError) as e:
            for _ in range(2):  # the first pick may be the other one
                asyncio.run(_collect(pool.submit(_params())))
        assert (e.value.status, e.value.code) == (504, "upstream_timeout")
        assert slow.posts == 1 and pool.endpoints[0].healthy  # not marked, not repeated
    finally:
        pool.close()


def test_a_cancel_closes_the_request_at_once(scripted):
    slow = scripted("slow", delay=5.0)
    pool = _pool(slow)

    async def main():
        job = pool.submit(_params())
        asyncio.get_running_loop().call_later(0.3, job.cancel)
        t0 = time.perf_counter()
        text, fin = await _collect(job)
        return time.perf_counter() - t0, fin

    try:
        took, fin = asyncio.run(main())
        assert fin.reason == "cancelled" and took < 2.0, took  # before: the 5 s of the backend
        assert pool.busy == 0 and pool.endpoints[0].busy == 0
    finally:
        pool.close()


def test_the_served_name_is_checked_once_an_endpoint_lists_its_models(scripted):
    late = scripted("ok", models=["qwen-remote"])
    late.down = True  # docqa starts before its endpoint
    ms = load_settings(model={"endpoints": [late.url], "endpoint_health_s": 0.2}).model
    rt = RemoteRuntime(ms, 8)
    try:
        assert rt.id == ms.model  # nothing listed yet: the configured (default) name
        late.down = False
        deadline = time.time() + 10
        while rt.id != "qwen-remote" and time.time() < deadline:
            time.sleep(0.1)
        assert rt.id == rt.engine.model == "qwen-remote"
    finally:
        rt.close()
