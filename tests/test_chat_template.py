"""Chat templates: ``model.chat_format`` picks a llama.cpp chat format by name, and messages a
model's template refuses (Mistral's: no system role, strictly alternating turns) are folded
into turns it takes, or refused with a 400 naming the template's reason (before: a 500)."""

from __future__ import annotations

import types

import pytest
from llama_cpp.llama_chat_format import MISTRAL_INSTRUCT_CHAT_TEMPLATE, Jinja2ChatFormatter

from docqa.settings import load_settings
from models.store import ModelStore
from server.engine import named_chat_format
from server.errors import APIError
from server.runtime import ModelRuntime, fold_roles

MISTRAL = Jinja2ChatFormatter(MISTRAL_INSTRUCT_CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")


def _fmt(formatter, messages):
    return ModelRuntime.format_chat(types.SimpleNamespace(formatter=formatter), messages)


def test_fold_roles_joins_system_into_the_first_user_turn_and_same_role_turns():
    got = fold_roles(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which port?"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "3928"},
            {"role": "user", "content": "And the host?"},
        ]
    )
    assert [m["role"] for m in got] == ["user", "assistant", "user"]
    assert got[0]["content"] == "Be brief.\n\nWhich port?"
    assert got[2]["content"] == "3928\n\nAnd the host?"
    assert fold_roles([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


def test_a_template_refusing_a_system_role_gets_it_folded():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    with pytest.raises(Exception, match="alternate"):  # the template itself refuses
        MISTRAL(messages=msgs)
    prompt = _fmt(MISTRAL, msgs)
    assert prompt.startswith("<s>[INST] Be brief.\n\nHi? [/INST]"), prompt


def test_messages_no_folding_helps_are_a_400_naming_the_reason():
    def refuse(messages):
        raise ValueError("this template takes no messages at all")

    with pytest.raises(APIError) as e:
        _fmt(refuse, [{"role": "user", "content": "Hi?"}])
    assert (e.value.status, e.value.param, e.value.code) == (
        400,
        "messages",
        "unsupported_messages",
    )
    assert "takes no messages at all" in str(e.value)


def test_chat_format_by_name_is_used_by_the_runtime():
    assert named_chat_format("llama-2") is named_chat_format("llama2")
    with pytest.raises(ValueError, match="known: .*mistral-instruct"):
        named_chat_format("no-such-format")
    msgs = [{"role": "user", "content": "Which port?"}]
    ms = load_settings(model={"n_ctx": 256, "n_threads": 1, "n_parallel": 1}).model
    resolved = ModelStore(ms.store_dir).resolve(ms.model)
    rt = ModelRuntime(resolved, ms.model_copy(update={"chat_format": "mistral-instruct"}), 4)
    try:
        assert "[INST]" in rt.format_chat(msgs) and "<|im_start|>" not in rt.format_chat(msgs)
    finally:
        rt.close()
    rt = ModelRuntime(resolved, ms, 4)  # the GGUF's own (ChatML) template
    try:
        assert "<|im_start|>user\nWhich port?" in rt.format_chat(msgs)
    finally:
        rt.close()
