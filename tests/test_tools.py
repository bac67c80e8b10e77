"""Tool calling: the request checks and the call grammar (fast, no model), then real loops
through the unmodified ``openai`` SDK (sync, async, streaming) against a real server with the
real SmolLM2 GGUF: the model calls a tool, the client returns a result, the model answers."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema_rs
import pytest
from openai import AsyncOpenAI, OpenAI

from server import tools
from server.errors import APIError

from .conftest import SERVED, serving

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MODEL = SERVED


# -- checks and grammar (no model) ---------------------------------------------------
def _bad(tools_, choice=None) -> APIError:
    with pytest.raises(APIError) as ei:
        tools.plan(tools_, choice, None)
    assert ei.value.status == 400
    return ei.value


def test_plan_rejects_bad_tools_naming_them():
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    e = _bad([WEATHER, bad_schema])
    assert e.param == "tools[1].function.parameters" and "tools[1]" in e.message
    e = _bad([{"type": "function", "function": {"name": "has space"}}])
    assert e.param == "tools[0].function.name"
    assert _bad([{"type": "retrieval"}]).param == "tools[0]"
    assert "twice" in _bad([ADD, ADD]).message
    e = _bad(TOOLS, {"type": "function", "function": {"name": "nope"}})
    assert e.param == "tool_choice" and "nope" in e.message
    assert _bad(TOOLS, "sometimes").param == "tool_choice"
    assert _bad(None, "required").param == "tool_choice"


def test_plan_choices():
    assert tools.plan(None, None, None) is None
    assert not tools.plan(TOOLS, "none", None).active
    p = tools.plan(TOOLS, {"type": "function", "function": {"name": "add"}}, None)
    assert p.allowed == ["add"] and not p.parallel
    p = tools.plan(TOOLS, "required", False)
    assert p.allowed == ["get_weather", "add"] and not p.parallel
    assert tools.plan([{"type": "function", "function": {"name": "ping"}}], "auto", None).active
    assert "get_weather" in tools.plan(TOOLS, None, None).system_text()


def test_parse_calls_and_repeats():
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    calls = tools.parse_calls(one + "\n" + one)
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert tools.repeated(one + "\n" + one) and not tools.repeated(one)
    # a repeat noticed late: more text (and another call) came before generation stopped
    two = one.replace('"b": 2', '"b": 3')
    late = "\n".join([one, two, one, "<tool_"])
    assert tools.looped(late) and not tools.looped(one + two)
    assert len(tools.parse_calls(late)) == 2
    # cut by max_tokens inside a repeat of the first call: a loop too; a new call is not
    assert tools.looped("\n".join([one, two, one[:-5]])) and tools.looped(one + "\n" + one[:40])
    other = '<tool_call>\n{"name": "add", "arguments": {"a": 7'
    assert not tools.looped("\n".join([one, two, other]))
    assert tools.parse_calls("plain answer") is None
    assert tools.parse_calls('<tool_call>\n{"name": "add", "argu') is None
    back = tools.call_text(calls)
    assert tools.parse_calls(back)[0]["function"]["name"] == "add"


# -- a real server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, fixture_index):
    config = {
        "server": {"max_queue": 8},
        "model": {"n_ctx": 2048},
        "retrieval": {
            "index_dir": str(fixture_index(chunk_tokens=120)),  # the fixture docs
            "chunk_tokens": 120,
            "top_k": 2,
        },
    }
    with serving(tmp_path_factory, {"tools": config}, timeout=400) as (s,):  # a loaded machine
        yield s


@pytest.fixture(scope="module")
def tc(tool_server):
    return OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=180)


def _valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema_rs.validate(SCHEMAS[call.function.name], args)
    return args


def _answer(messages, call, result: str) -> list:
    """The history after the model's call and the client's result."""
    return [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]


def test_sync_loop_required_then_answer(tc):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = tc.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    calls = ch.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        _valid(c)
    call = calls[0]
    assert call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    history = _answer(messages, call, '{"temperature_c": 22, "sky": "sunny"}')
    final = tc.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=60,
        temperature=0,
    )
    fc = final.choices[0]
    assert fc.finish_reason in ("stop", "length") and not fc.message.tool_calls
    assert fc.message.content.strip()
    base = tc.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    # the call and its result went into the prompt, and the model answers with the result
    assert final.usage.prompt_tokens > base.usage.prompt_tokens + 20
    assert "22" in fc.message.content, fc.message.content


def test_async_loop_named_function(tool_server):
    ac = AsyncOpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=180)
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]

    async def main():
        r = await ac.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=TOOLS,
            max_tokens=60,
            temperature=0,
            tool_choice={"type": "function", "function": {"name": "add"}},
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        call = ch.message.tool_calls[0]
        args = _valid(call)
        assert call.function.name == "add"
        history = _answer(messages, call, str(args["a"] + args["b"]))
        return await ac.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=TOOLS,
            max_tokens=40,
            temperature=0,
            tool_choice="none",
        )

    final = asyncio.run(main())
    assert final.choices[0].message.content.strip()


def test_streaming_tool_calls(tc):
    """A streamed tool call: the raw chunks carry the call in deltas (id, name, argument
    pieces) and end with finish_reason tool_calls; the SDK's stream helper assembles the same
    calls from the same stream (one request: two greedy requests may round differently once
    the server has cached the prompt)."""
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    calls: dict[int, dict] = {}
    reasons, content = [], []
    with tc.chat.completions.stream(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    ) as stream:
        for event in stream:
            if event.type != "chunk":
                continue
            for ch in event.chunk.choices:
                d = ch.delta
                content.append(d.content or "")
                for tcd in d.tool_calls or []:
                    c = calls.setdefault(tcd.index, {"id": None, "name": "", "arguments": ""})
                    c["id"] = tcd.id or c["id"]
                    if tcd.function:
                        c["name"] += tcd.function.name or ""
                        c["arguments"] += tcd.function.arguments or ""
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
        done = stream.get_final_completion()
    assert reasons == ["tool_calls"] and not "".join(content)
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    for c in calls.values():
        jsonschema_rs.validate(SCHEMAS[c["name"]], json.loads(c["arguments"]))
    got = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in got] == [
        (c["id"], c["name"], c["arguments"]) for c in calls.values()
    ]
    # the answer to the result streams as text
    call = got[0]
    history = _answer(messages, call, '{"temperature_c": 18, "sky": "rain"}')
    text = []
    for chunk in tc.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=40,
        temperature=0,
        stream=True,
    ):
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            if ch.delta.tool_calls:
                text.append("<call>")
    assert "".join(text).strip()


def test_auto_and_parallel_off(tc):
    r = tc.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello! Who are you?"}],
        tools=TOOLS,
        max_tokens=30,
        temperature=0,
    )
    ch = r.choices[0]
    if ch.finish_reason == "tool_calls":  # auto lets the model choose; a call still validates
        for c in ch.message.tool_calls:
            _valid(c)
    else:
        assert ch.message.content and not ch.message.tool_calls
    r = tc.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Rome and in Oslo?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(r.choices[0].message.tool_calls) == 1


def test_grounded_chat_accepts_tools(tc):
    messages = [{"role": "user", "content": "Which port does the Zephyrd HTTP API listen on?"}]
    r = tc.chat.completions.create(
        model="docqa",
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    assert r.model == "docqa" and r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    _valid(call)
    final = tc.chat.completions.create(
        model="docqa",
        messages=_answer(messages, call, "no weather data"),
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert final.model == "docqa" and final.choices[0].message.content.strip()
    plain = tc.chat.completions.create(
        model="docqa",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert plain.choices[0].message.content and plain.model_extra.get("sources") is not None


def test_bad_tool_requests_are_400(tool_server):
    url = tool_server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
    r = httpx.post(url, json={"model": MODEL, "messages": msgs, "tools": [ADD, bad]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tools[1].function.parameters" and "tools[1]" in err["message"]
    choice = {"type": "function", "function": {"name": "missing"}}
    r = httpx.post(
        url, json={"model": MODEL, "messages": msgs, "tools": TOOLS, "tool_choice": choice}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(
        url,
        json={
            "model": MODEL,
            "messages": msgs,
            "tools": TOOLS,
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
    )
    assert r.status_code == 400


def test_metrics_count_retrieval_and_index(tool_server, tc):
    tc.chat.completions.create(
        model="docqa",
        messages=[{"role": "user", "content": "What port does Zephyrd use?"}],
        max_tokens=5,
        temperature=0,
    )
    t = httpx.get(tool_server.url + "/metrics").text  # no api_key: open
    values = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in t.splitlines()
        if line and not line.startswith("#")
    }
    assert values["docqa_retrieval_seconds_count"] >= 1
    assert values["docqa_index_documents"] >= 3
    assert values["docqa_index_chunks"] >= values["docqa_index_documents"]


def test_calls_cut_by_max_tokens_come_back_as_calls(tc, tool_server):
    """A forced call answer that runs into max_tokens after a complete call (the model starts
    another): the complete calls come back as tool_calls with finish_reason "length", whole
    and streamed, never the call markup as text (before: content "<tool_call>\\n{...")."""
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and in Rome, please."}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    r = tc.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason in ("tool_calls", "length"), ch
    assert ch.message.tool_calls and not ch.message.content, ch.message
    for call in ch.message.tool_calls:
        _valid(call)
    streamed, reasons, content = [], [], []
    for c in tc.chat.completions.create(**kw, stream=True):
        for d in c.choices:
            reasons += [d.finish_reason] if d.finish_reason else []
            content.append(d.delta.content or "")
            streamed += [t.function.name for t in d.delta.tool_calls or [] if t.function.name]
    assert reasons == [ch.finish_reason] and not "".join(content)
    assert streamed == [c.function.name for c in ch.message.tool_calls]


def test_odd_but_valid_fields_and_a_malformed_call_history(tool_server):
    url = tool_server.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    # null means the default, as OpenAI's API takes it (before: 400 for each)
    nulls = {"n": None, "stream": None, "logprobs": None, "stream_options": None}
    r = httpx.post(url, json=base | nulls, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    bad = base | {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": "x"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    r = httpx.post(url, json=bad, timeout=120)  # before: a 500 (AttributeError)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith("messages.1.tool_calls") and "function" in err["message"]
