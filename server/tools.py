"""Tool (function) calling, Hermes style, for any chat model.

The tools are described to the model in a system message (their JSON schemas inside
``<tools></tools>``); the model calls one by answering ``<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>``. A llama.cpp grammar built from each function's JSON schema (with
llama.cpp's own schema converter) constrains the call, so the arguments always parse and
validate: ``required`` and a named function allow only calls; ``auto`` allows either plain
text (not starting with ``<``) or calls, the first character deciding; ``none`` sends no
tools. Past calls (``assistant.tool_calls``) and results (``role: tool``) go back into the
prompt in the same tags, results as a user turn (``<tool_response>``), which every chat
template accepts.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema_rs
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from server.errors import bad_request
from server.grammar import GrammarError, GrammarLimits, json_schema_grammar

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN = "<tool_call>"
_CLOSE = "</tool_call>"
MAX_PARALLEL = 8  # calls one answer may hold (a small model can loop otherwise)

_PROMPT = (
    "You can call functions to help answer the user. The functions you may call are "
    "described, as JSON schemas, inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": "<function-name>", "arguments": {{<arguments>}}}}\n</tool_call>\n'
    "Function results come back inside <tool_response></tool_response> tags; answer the user "
    "with them."
)


@dataclass
class ToolPlan:
    """What a request's tools mean for its prompt and its output."""

    choice: str  # "auto" | "required" | "none" | "named"
    functions: list[dict[str, Any]]  # [{"name", "description", "parameters"}]
    allowed: list[str] = field(default_factory=list)  # names the grammar allows
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.functions)

    def system_text(self) -> str:
        lines = [
            json.dumps({"type": "function", "function": f}, ensure_ascii=False)
            for f in self.functions
        ]
        return _PROMPT.format(tools="\n".join(lines))

    def grammar(self) -> LlamaGrammar:
        schemas = {f["name"]: f["parameters"] for f in self.functions}
        return _grammar(
            json.dumps([[n, schemas[n]] for n in self.allowed], sort_keys=True),
            self.choice == "auto",
            self.parallel,
        )


def _call_schema(name: str, params: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
    }


def _rules(schema: dict) -> str:
    """GBNF of ``schema`` with its root renamed ``call``."""
    gbnf = json_schema_to_gbnf(json.dumps(schema))
    return re.sub(r"^root ::=", "call ::=", gbnf, flags=re.M)


@lru_cache(maxsize=64)
def _grammar(allowed_json: str, auto: bool, parallel: bool) -> LlamaGrammar:
    allowed = json.loads(allowed_json)
    alts = [_call_schema(n, p) for n, p in allowed]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    one = '"<tool_call>\\n" call "\\n</tool_call>"'
    more = ""
    for _ in range(MAX_PARALLEL - 1 if parallel else 0):  # nested: one parse per count
        more = f'("\\n" {one} {more})?'
    root = "calls | plain\nplain ::= [^<] [^\\x00]*" if auto else "calls"
    text = f"root ::= {root}\ncalls ::= {one} {more}\n{_rules(schema)}"
    return LlamaGrammar.from_string(text, verbose=False)


def plan(
    tools: list[dict] | None,
    tool_choice: Any,
    parallel: bool | None,
    limits: GrammarLimits | None = None,
) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice`` (400 naming the bad one) -> the plan, or None when
    the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    functions: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        functions.append(_function(i, t, limits))
    names = [f["name"] for f in functions]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise bad_request(f"tools: function {dup!r} is defined twice", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    allowed = names
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request(
                "tool_choice must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in names:
            raise bad_request(
                f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})",
                "tool_choice",
            )
        choice, allowed = "named", [name]
    elif choice not in ("none", "auto", "required"):
        raise bad_request(
            f"tool_choice {choice!r} is not 'none', 'auto', 'required' or a function",
            "tool_choice",
        )
    # a named function is called once; otherwise up to MAX_PARALLEL calls unless
    # parallel_tool_calls is false
    p = ToolPlan(choice, functions, allowed, parallel is not False and choice != "named")
    if p.active:
        try:
            p.grammar()
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise bad_request(f"tools: cannot build the call grammar: {exc}", "tools") from exc
    return p


def _function(i: int, tool: Any, limits: GrammarLimits | None) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad_request(f"{where}: only tools of type 'function' are supported", where)
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad_request(f"{where}.function must be an object", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(
            f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'",
            f"{where}.function.name",
        )
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    where_p = f"{where}.function.parameters"
    if not isinstance(params, dict):
        raise bad_request(f"{where_p} must be a JSON Schema object", where_p)
    try:
        jsonschema_rs.meta.validate(params)
    except jsonschema_rs.ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise bad_request(f"{where_p} is not a valid JSON Schema: {first}", where_p) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable $ref
        raise bad_request(f"{where_p} is not a valid JSON Schema: {exc}", where_p) from exc
    try:  # checked as response_format schemas are: llama.cpp crashes on e.g. an empty enum
        json_schema_grammar(_call_schema(name, params), limits)
    except GrammarError as exc:
        raise bad_request(f"{where_p}: {exc}", where_p, "invalid_schema") from exc
    out = {"name": name, "parameters": params}
    if isinstance(fn.get("description"), str):
        out = {"name": name, "description": fn["description"], "parameters": params}
    return out


# -- history -------------------------------------------------------------------------
def call_text(calls: list[dict]) -> str:
    """An assistant turn's ``tool_calls`` as the model writes them."""
    out = []
    for c in calls:
        fn = c.get("function") or {}
        args = fn.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            pass
        call = {"name": fn.get("name", ""), "arguments": args}
        out.append(f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
    return "\n".join(out)


def result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``messages`` with ``text`` put first in the system message (one made when none)."""
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# -- output --------------------------------------------------------------------------
def _bodies(matches) -> list[str]:
    return [" ".join(m.group(1).split()) for m in matches]


def repeated(text: str) -> bool:
    """True when the last complete call of ``text`` repeats an earlier one: a small model
    loops on its calls, so the answer ends there (the repeat is dropped)."""
    bodies = _bodies(_CALL.finditer(text))
    return len(bodies) > 1 and bodies[-1] in bodies[:-1]


def looped(text: str) -> bool:
    """True when some call of ``text`` repeats an earlier one (``repeated`` caught late: the
    engine may run on for a few tokens, up to ``max_tokens``, before the stop reaches it),
    the unfinished last one included when what it has so far is an earlier call's start."""
    done = list(_CALL.finditer(text))
    bodies = _bodies(done)
    if len(set(bodies)) < len(bodies):
        return True
    tail = text[done[-1].end() :] if done else ""
    at = tail.find(OPEN)
    if not bodies or at < 0:
        return False
    part = tail[at + len(OPEN) :]
    for k in range(len(_CLOSE), 0, -1):  # a closing tag cut short
        if part.rstrip().endswith(_CLOSE[:k]):
            part = part.rstrip()[:-k]
            break
    part = " ".join(part.split())
    return len(part) >= 16 and any(b.startswith(part) for b in bodies)


def parse_calls(text: str) -> list[dict] | None:
    """The OpenAI ``tool_calls`` of a model answer made of calls (repeats dropped), or None
    (plain text, or no complete call)."""
    if not text.lstrip().startswith(OPEN):
        return None
    calls, seen = [], set()
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        key = json.dumps(obj, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": obj["name"],
                    "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False),
                },
            }
        )
    return calls or None
