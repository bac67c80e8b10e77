"""Bad input gets a 4xx in OpenAI's shape from the real server, never a 500 (issue 17):
an empty prompt, lone surrogates, embedding token ids out of range, a non-ASCII bearer token,
too many messages, bodies and documents over the limits."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import KEY, H
from tests.conftest import api_error as _err

from .conftest import SERVED


def _raw(url: str, path: str, body: str, headers: dict | None = None) -> httpx.Response:
    """POST ``body`` as written (JSON escapes such as \\ud800 go through untouched)."""
    h = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=body.encode(), headers=h, timeout=120)


def test_empty_prompt_is_400(server, model_id):
    for prompt in ("", [""]):
        r = httpx.post(
            server.url + "/v1/completions", json={"model": model_id, "prompt": prompt}, timeout=60
        )
        assert _err(r, 400)["param"] == "prompt"


def test_an_empty_stop_string_is_400(server, model_id):
    """``stop: ""`` would match before the first token and end every answer empty (before: a
    200 with no text); it is refused like ``[""]``."""
    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ),
    ):
        for stop in ("", [""], ["ok", ""]):
            r = httpx.post(server.url + path, json={"model": model_id, **body, "stop": stop})
            assert _err(r, 400)["param"] == "stop", (path, stop)


def test_lone_surrogates_are_400_everywhere(server, guarded_server, model_id):
    chat = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800"}]}'
    cases = [
        (server.url, "/v1/chat/completions", chat % model_id, {}),
        (server.url, "/v1/completions", '{"prompt": "a\\udfff b", "max_tokens": 2}', {}),
        (server.url, "/v1/embeddings", '{"input": ["ok", "a\\ud800"]}', {}),
        (server.url, "/v1/rerank", '{"query": "\\ud83d", "documents": ["x"]}', {}),
        (guarded_server.url, "/v1/tickets/reply", '{"id": 1, "body": "a\\ud800"}', H),
        (guarded_server.url, "/v1/documents", '{"path": "s.md", "content": "# T\\n\\udc00"}', H),
    ]
    for url, path, body, headers in cases:
        err = _err(_raw(url, path, body, headers), 400)
        assert err["code"] == "invalid_unicode", (path, err)
    # a valid pair and an escaped backslash are text
    ok = (
        '{"model": "%s", "max_tokens": 2, '
        '"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}]}'
    )
    assert _raw(server.url, "/v1/chat/completions", ok % model_id).status_code == 200
    assert server.proc.poll() is None and guarded_server.proc.poll() is None


def test_embedding_token_ids_out_of_range_are_400(server):
    for bad in ([-5], [10**9], [[1, 2], [99_999_999]], [[]]):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": bad}, timeout=60)
        assert _err(r, 400)["param"] == "input", bad
    r = httpx.post(server.url + "/v1/embeddings", json={"input": [101, 2000, 102]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_non_ascii_bearer_token_is_401(guarded_server):
    for token in ("clé", "k-17é", "\u00ff"):
        r = httpx.get(
            guarded_server.url + "/v1/models",
            headers={"Authorization": b"Bearer " + token.encode("utf-8")},
        )
        assert _err(r, 401)["code"] == "invalid_api_key"
    assert httpx.get(guarded_server.url + "/v1/models", headers=H).status_code == 200


def test_too_many_messages_is_400(guarded_server):
    msgs = [{"role": "user", "content": "hi"}] * 9
    r = httpx.post(
        guarded_server.url + "/v1/chat/completions",
        headers=H,
        json={"model": SERVED, "messages": msgs, "max_tokens": 2},
        timeout=60,
    )
    err = _err(r, 400)
    assert err["param"] == "messages" and err["code"] == "too_many_messages"


def test_body_over_the_limit_is_413(guarded_server):
    big = {"model": "x", "messages": [{"role": "user", "content": "a" * 70_000}]}
    r = httpx.post(guarded_server.url + "/v1/chat/completions", headers=H, json=big, timeout=60)
    assert _err(r, 413)["code"] == "request_too_large"
    assert r.headers["connection"] == "close"


def test_body_limit_holds_while_streaming(guarded_server):
    """A chunked body with no length is refused once 64 KB have arrived: the 413 comes back
    while the client is still sending (the server never waits for the whole body)."""
    host, port = "127.0.0.1", guarded_server.port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * 16384
        for _ in range(6):  # 96 KB sent, the final 0-length chunk never is
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert httpx.get(guarded_server.url + "/health").status_code == 200


def test_document_limits_are_413(guarded_server):
    url = guarded_server.url + "/v1/documents"
    before = httpx.get(url, headers=H).json()["data"]
    big = "# Big\n\n" + "word " * 1000  # 5 KB > 4000 bytes
    r = httpx.post(url, headers=H, json={"path": "big.md", "content": big}, timeout=120)
    assert _err(r, 413)["code"] == "document_too_large"
    r = httpx.post(
        url, headers=H, files={"file": ("big.md", big.encode(), "text/markdown")}, timeout=120
    )
    assert _err(r, 413)["code"] == "document_too_large"
    sections = "\n\n".join(f"# Part {i}\n\n" + f"term{i} " * 120 for i in range(3))  # 3 chunks
    assert len(sections.encode()) < 4000
    r = httpx.post(url, headers=H, json={"path": "many.md", "content": sections}, timeout=120)
    err = _err(r, 413)
    assert "chunks" in err["message"] and err["code"] == "document_too_large"
    assert httpx.get(url, headers=H).json()["data"] == before  # nothing was added
    r = httpx.post(
        url, headers=H, json={"path": "small.md", "content": "# Small\n\nfits."}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert httpx.delete(url + "/small.md", headers=H, timeout=120).status_code == 200


@pytest.mark.parametrize("given, cap", [(None, 7), (12, 12)])
def test_grounded_answer_max_tokens_default(guarded_server, given, cap):
    body = {
        "model": "docqa",
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "Which port does the Zephyrd HTTP API listen on? Explain."}
        ],
    }
    if given is not None:
        body["max_tokens"] = given
    r = httpx.post(guarded_server.url + "/v1/chat/completions", headers=H, json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "could not find" not in out["choices"][0]["message"]["content"]  # not the abstain
    if out["choices"][0]["finish_reason"] == "length":
        assert out["usage"]["completion_tokens"] == cap
    else:
        assert out["usage"]["completion_tokens"] <= cap


def test_document_body_not_utf8_is_400(guarded_server):
    """Found by the schemathesis run: JSON bytes that are not UTF-8 were a 500."""
    r = httpx.post(
        guarded_server.url + "/v1/documents",
        content=b"\xa6\xce+",
        headers={"Content-Type": "application/json", **H},
    )
    assert _err(r, 400)["code"] == "invalid_json"
