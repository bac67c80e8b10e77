"""End-to-end: the real server with the real SmolLM2 GGUF, called with the openai SDK."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import AsyncOpenAI

from .conftest import SERVED

Q = [{"role": "user", "content": "Name three colors."}]


def test_models_have_clean_ids(client):
    ids = [m.id for m in client.models.list().data]
    assert SERVED in ids
    for i in ids:
        assert "/" not in i and not i.endswith(".gguf")


def test_chat_whole(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=Q, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == model_id
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content.strip()
    assert ch.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_whole_and_usage(client, model_id):
    kw = dict(model=model_id, messages=Q, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_streams(server, model_id):
    async def run():
        ac = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = await ac.chat.completions.create(
            model=model_id, messages=Q, max_tokens=12, temperature=0, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream]
        await ac.close()
        return "".join(parts)

    assert asyncio.run(run()).strip()


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_limits_length(client, model_id, field):
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0,
        **{field: 5},
    )
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_output(client, model_id):
    kw = dict(model=model_id, messages=Q, max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    r = client.chat.completions.create(**kw, stop=[stop])
    out = r.choices[0].message.content
    assert stop not in out
    assert full.startswith(out)
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client, model_id):
    kw = dict(model=model_id, messages=Q, max_tokens=25, temperature=1.2)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    assert a == b
    others = {
        client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)
    }
    assert len(others | {a}) > 1


def test_top_p_tiny_is_greedy(client, model_id):
    kw = dict(model=model_id, messages=Q, max_tokens=15)
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    nucleus = client.chat.completions.create(**kw, temperature=1.0, top_p=1e-6, seed=7)
    assert nucleus.choices[0].message.content == greedy


def test_json_object(client, model_id):
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Give a JSON object with keys color and size."}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema(client, model_id):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        max_tokens=80,
        temperature=0.8,
        seed=3,
    )
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"}
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)


def test_logprobs(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=Q, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.token == t.top_logprobs[0].token  # greedy picks the most likely token


def test_unknown_fields_are_ignored(server, model_id):
    import httpx

    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "hi", "some_future_field": 1}],
        "max_tokens": 3,
        "parallel_tool_calls": False,
        "store": True,
        "metadata": {"a": "b"},
        "reasoning_effort": "low",
        "service_tier": "auto",
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_developer_role_and_content_parts(client, model_id):
    r = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]},
        ],
        max_tokens=8,
    )
    assert r.choices[0].message.content
