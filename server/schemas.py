"""Request bodies of the OpenAI endpoints. Unknown fields are accepted and ignored."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit ``null`` for an optional field means its default, as OpenAI's API
        takes it (``"stream": null``, ``"n": null``, ``"logprobs": null``); before, such a
        field typed ``bool`` or ``int`` refused it with a 400."""
        if not isinstance(data, dict):
            return data
        drop = [
            key
            for name, f in cls.model_fields.items()
            if not f.is_required()
            and f.default is not None
            and data.get(key := f.alias or name, ...) is None
        ]
        return {k: v for k, v in data.items() if k not in drop} if drop else data


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # assistant turns: the calls it made; tool turns: the call answered (server.tools)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, c in enumerate(v or []):
            fn = c.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tool_calls[{i}].function must be an object with a name")
            if not isinstance(fn.get("arguments", "{}"), str | dict):
                raise ValueError(f"tool_calls[{i}].function.arguments must be a JSON string")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if p.type == "text" and p.text)


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaSpec(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp-style shortcut


Stop = str | list[str] | None
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only: a logit_bias key


class _Sampling(_Lenient):
    model: str | None = Field(None, description="Model id; omitted = the server's default.")
    max_tokens: int | None = Field(None, ge=1, le=262144)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: Stop = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # OpenAI: {token id: bias in -100..100} added to the logits; -100 bans the token.
    logit_bias: dict[str, float] | None = Field(None, max_length=4096)
    # llama.cpp-server extension: a GBNF grammar the output must follow.
    grammar: str | None = Field(None, max_length=100_000)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        if v == "":  # would match before the first token: every answer empty
            raise ValueError("stop sequences must be non-empty")
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        seen: set[int] = set()
        for k, b in (v or {}).items():
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if int(k) in seen:
                raise ValueError(f"logit_bias names token {int(k)} twice")
            seen.add(int(k))
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=262144)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # docqa extension: force retrieval on/off regardless of the model id.
    rag: bool | None = None
    # docqa extension: context-aware decoding strength for a grounded answer (None: the
    # retrieval.cad_alpha setting; 0 = off). Ignored when the answer is not grounded.
    cad_alpha: float | None = Field(None, ge=0, le=5)
    # docqa extension: logit bias on the evidence lines' tokens for a grounded answer (None:
    # the retrieval.evidence_bias setting; 0 = off). Ignored when the answer is not grounded.
    evidence_bias: float | None = Field(None, ge=0, le=10)
    # docqa extension: answers generated for a grounded question, the best grounded returned
    # (the retrieval.answer_candidates setting; 1 = off). Ignored when not grounded.
    answer_candidates: int | None = Field(None, ge=1, le=8)
    # Tool calling (server.tools): checked there, so errors name tools[i] and tool_choice.
    tools: list[Any] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if v == "" or (isinstance(v, list) and v and v[0] == ""):
            raise ValueError("prompt must not be empty")
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str) and len(v) > 1:
                raise ValueError("only one prompt per request is supported")
        return v


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be empty")
            if len(v) > 2048:
                raise ValueError("at most 2048 inputs per request")
            ids = v if isinstance(v[0], int) else [i for x in v if isinstance(x, list) for i in x]
            if any(i < 0 for i in ids):
                raise ValueError("token ids must not be negative")
            if any(isinstance(x, list) and not x for x in v):
                raise ValueError("token id lists must not be empty")
        return v


class RerankRequest(_Lenient):
    """POST /v1/rerank in the Jina/Cohere shape."""

    model: str | None = None
    query: str = Field(..., min_length=1)
    documents: list[str] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
