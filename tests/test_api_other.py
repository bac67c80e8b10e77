"""End-to-end: completions, embeddings, errors, auth, concurrency, queue, disconnects."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest
from openai import APIStatusError, AuthenticationError, NotFoundError, OpenAI

from .conftest import SERVED


def test_completions_whole_stream_echo(client, model_id):
    kw = dict(model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text
    echo = client.completions.create(**kw, echo=True, logprobs=2)
    assert echo.choices[0].text == kw["prompt"] + whole.choices[0].text
    lp = echo.choices[0].logprobs
    assert len(lp.tokens) == 6 and all(len(t) == 2 for t in lp.top_logprobs)


def test_streamed_logprobs_offsets_match_the_whole_answer(server, model_id):
    """With stop strings, text is held back until it cannot start one; the streamed chunks'
    ``text_offset`` still count every token's text, as the whole answer's do (before: they
    counted the text sent so far, and went wrong after each held-back piece)."""
    stop = [f"{c} zzq" for c in "eaostnrdy"]  # most words end in one of these: held back
    body = {
        "model": model_id,
        "prompt": "Once upon a time there was",
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": 1,
        "stop": stop,
    }
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    wl = whole["choices"][0]["logprobs"]
    text, tokens, offsets = "", [], []
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            if ch["logprobs"]:
                tokens += ch["logprobs"]["tokens"]
                offsets += ch["logprobs"]["text_offset"]
    assert text == whole["choices"][0]["text"] and tokens == wl["tokens"]
    assert offsets == wl["text_offset"]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_completion_token_prompt(client, model_id, server):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": model_id, "prompt": [504, 3575, 282], "max_tokens": 3},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        server.url + "/v1/completions", json={"model": model_id, "prompt": [10**9], "max_tokens": 3}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_embeddings_float_and_base64(client, server):
    texts = ["How do I start the server?", "How can I launch the server?", "Bananas are yellow."]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # SDK asks base64
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}
    ).json()
    b64 = httpx.post(
        server.url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}
    ).json()
    dec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(dec, raw["data"][0]["embedding"], atol=1e-6)
    assert raw["usage"]["prompt_tokens"] > 0
    small = client.embeddings.create(model="all-minilm-l6-v2", input="x y", dimensions=64)
    assert len(small.data[0].embedding) == 64


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_shapes(server, model_id):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    _err(r, 400)
    err = _err(httpx.post(url, json={"model": model_id}), 400)
    assert err["param"] == "messages"
    msgs = [{"role": "user", "content": "hi"}]
    err = _err(httpx.post(url, json={"model": model_id, "messages": msgs, "temperature": 5}), 400)
    assert err["param"] == "temperature"
    err = _err(httpx.post(url, json={"model": "gpt-17", "messages": msgs}), 404)
    assert err["code"] == "model_not_found"
    err = _err(httpx.post(url, json={"model": model_id, "messages": msgs, "n": 2}), 400)
    assert err["param"] == "n"
    long = [{"role": "user", "content": "word " * 5000}]
    err = _err(httpx.post(url, json={"model": model_id, "messages": long}, timeout=60), 400)
    assert err["code"] == "context_length_exceeded" and "2048" in err["message"]
    _err(httpx.get(server.url + "/v1/nothing-here"), 404)


def test_sdk_raises_typed_errors(client):
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def _stream_text(url: str, model: str, prompt: str, n: int, out: list, idx: int, **extra):
    c = OpenAI(base_url=url + "/v1", api_key=extra.pop("key", "x"), max_retries=0, timeout=120)
    s = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=n,
        temperature=0,
        stream=True,
    )
    parts, fin = [], None
    for ch in s:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            fin = ch.choices[0].finish_reason or fin
    out[idx] = ("".join(parts), fin)


def test_two_concurrent_streams_complete_intact(server, model_id):
    prompts = ["Tell me about the sea.", "Tell me about mountains."]
    solo = [None, None]
    for i, p in enumerate(prompts):
        _stream_text(server.url, model_id, p, 40, solo, i)
    both = [None, None]
    ts = [
        threading.Thread(target=_stream_text, args=(server.url, model_id, p, 40, both, i))
        for i, p in enumerate(prompts)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert both == solo
    assert all(f in ("stop", "length") for _, f in both)


def _busy(url: str) -> int:
    return httpx.get(url + "/health").json()["busy"]


def test_disconnect_frees_engine(server, model_id):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=60,
        json={
            "model": model_id,
            "stream": True,
            "max_tokens": 1900,
            "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write an endless story."}],
        },
    ) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert _busy(server.url) == 1
    # 1900 tokens would keep the engine busy for many seconds; a cancelled one frees it now.
    for _ in range(50):
        if _busy(server.url) == 0:
            break
        time.sleep(0.1)
    assert _busy(server.url) == 0


def test_a_whole_answer_whose_client_left_frees_the_engine(server, model_id):
    """A non-streamed answer: uvicorn does not cancel the handler when its client leaves, so
    the server watches for it; the job is cancelled, and the engine is free long before 1,900
    tokens could be generated (its end-of-text tokens are banned)."""
    body = {
        "model": model_id,
        "max_tokens": 1900,
        "temperature": 1.0,
        "logit_bias": {"0": -100, "2": -100},  # no end of text: it would run all 1,900
        "messages": [{"role": "user", "content": "Write an endless story."}],
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.5)
    for _ in range(50):
        if _busy(server.url) == 0:
            break
        time.sleep(0.1)
    assert _busy(server.url) == 0


@pytest.fixture(scope="module")
def small_server(server_factory):
    return server_factory(
        {
            "server": {
                "max_queue": 1,
                "api_key": "sekret",
                "admin_key": "adm-sekret",
                "retry_after_s": 3,
            },
            "embedder": {"enabled": False},
            "model": {"n_ctx": 1024},
        },
        "small",
    )


def test_auth(small_server):
    c = OpenAI(base_url=small_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        c.models.list()
    r = httpx.get(small_server.url + "/v1/models")
    assert _err(r, 401)["code"] == "invalid_api_key"
    ok = OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0)
    assert ok.models.list().data
    assert httpx.get(small_server.url + "/health").status_code == 200  # health needs no key


def test_queue_full_gives_503(small_server):
    mid = SERVED
    out = [None]
    t = threading.Thread(
        target=_stream_text,
        args=(small_server.url, mid, "Write a long essay.", 400, out, 0),
        kwargs={"key": "sekret"},
    )
    t.start()
    for _ in range(100):
        if _busy(small_server.url) == 1:
            break
        time.sleep(0.02)
    r = httpx.post(
        small_server.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer sekret"},
        json={"model": mid, "messages": [{"role": "user", "content": "hi"}]},
    )
    err = _err(r, 503)
    # at least server.retry_after_s (3), more once requests have been taking longer
    assert 3 <= int(r.headers["retry-after"]) <= 30 and err["code"] == "server_busy"
    c = OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0)
    with pytest.raises(APIStatusError):
        c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "x"}])
    t.join()
    assert out[0][1] in ("stop", "length") and out[0][0]  # the running stream was not cut off


def test_admin_reload_swaps_model_without_downtime(small_server):
    from models.store import ModelStore

    store = ModelStore(small_server.store)
    src = store.resolve("smollm2-135m-instruct").path
    store.publish(src, "docqa-published-test", {"note": "test"})
    h = {"Authorization": "Bearer adm-sekret"}
    assert httpx.post(small_server.url + "/admin/reload", json={"model": "x"}).status_code == 401
    api = {"Authorization": "Bearer sekret"}  # the API key is not an admin key
    r = httpx.post(small_server.url + "/admin/reload", headers=api, json={"model": "x"})
    assert r.status_code == 401
    r = httpx.post(small_server.url + "/admin/reload", headers=h, json={"model": "nope"})
    assert r.status_code == 404
    r = httpx.post(
        small_server.url + "/admin/reload",
        headers=h,
        json={"model": "docqa-published-test"},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["model"] == "docqa-published-test"
    c = OpenAI(base_url=small_server.url + "/v1", api_key="sekret", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["docqa-published-test"]
    out = c.chat.completions.create(
        model="docqa-published-test", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    assert out.choices[0].message.content


def test_rerank_orders_documents_and_rejects_bad_input(server):
    docs = [
        "Bananas are yellow fruit rich in potassium.",
        "The HTTP API listens on port 7431 by default.",
        "Set the port in the server section of the config file.",
    ]
    r = httpx.post(
        server.url + "/v1/rerank",
        json={"query": "Which port does the API listen on?", "documents": docs, "top_n": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 2 and res[0]["index"] == 1 and res[1]["index"] == 2
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in res)
    assert res[0]["relevance_score"] >= res[1]["relevance_score"]
    assert res[0]["document"]["text"] == docs[1]
    r = httpx.post(
        server.url + "/v1/rerank",
        json={"query": "port", "documents": docs, "return_documents": False},
        timeout=60,
    )
    assert len(r.json()["results"]) == 3 and "document" not in r.json()["results"][0]
    for bad, param in (
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": ["ok", 5]}, "documents"),
        ({"query": "q", "documents": ["x"] * 300}, "documents"),
        ({"query": "q", "documents": ["ok", " "]}, "documents"),
    ):
        r = httpx.post(server.url + "/v1/rerank", json=bad, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and {"message", "type", "param", "code"} <= set(err), r.text
        assert err["param"].startswith(param), err
