"""Prepare chat and text completion requests: model check, prompt, RAG, sampling."""

from __future__ import annotations

from fastapi import Request

from server.errors import APIError, bad_request
from server.generation import GenParams
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.services.generation import Prepared, grammar_for, sampling_params


def resolve_model_id(request: Request, requested: str | None) -> tuple[str, bool]:
    """Return (model id to report, use retrieval) or raise 404."""
    state = request.app.state
    engine = state.engine
    rag_id = state.settings.retrieval.rag_model_id
    has_rag = getattr(state, "rag", None) is not None
    if requested is None or requested == "":
        return (rag_id, True) if has_rag else (engine.model.id, False)
    if requested == engine.model.id:
        return requested, False
    if has_rag and requested == rag_id:
        return requested, True
    known = [engine.model.id] + ([rag_id] if has_rag else [])
    raise APIError(
        404,
        f"The model '{requested}' does not exist. Available: {', '.join(known)}",
        param="model",
        code="model_not_found",
    )


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()})
    return out


async def prepare_chat(request: Request, req: ChatCompletionRequest) -> Prepared:
    state = request.app.state
    engine = state.engine
    model_id, use_rag = resolve_model_id(request, req.model)
    if req.rag is not None:
        use_rag = req.rag and getattr(state, "rag", None) is not None
    messages = _messages(req)
    grounding = None
    if use_rag:
        messages, grounding = await state.rag.augment(messages)
    prompt = engine.format_chat(messages)
    tokens = engine.prompt_tokens(prompt)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params: GenParams = sampling_params(req, state.settings.model, tokens, max_tokens)
    params.grammar = grammar_for(req.response_format, req.grammar)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    params.logprobs = req.logprobs
    params.top_logprobs = req.top_logprobs or 0
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return Prepared(
        "chat",
        model_id,
        params,
        include_usage=include_usage,
        grounding=grounding,
        canned=grounding.abstain if grounding is not None else None,
    )


def prepare_completion(request: Request, req: CompletionRequest) -> Prepared:
    state = request.app.state
    engine = state.engine
    model_id, _ = resolve_model_id(request, req.model)
    if isinstance(req.prompt, str):
        text = req.prompt
        tokens = engine.prompt_tokens(text)
    elif req.prompt and isinstance(req.prompt[0], str):
        text = req.prompt[0]
        tokens = engine.prompt_tokens(text)
    else:
        tokens = [int(t) for t in req.prompt]  # type: ignore[union-attr]
        vocab = engine.model.llm.n_vocab()
        if any(t < 0 or t >= vocab for t in tokens):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        text = engine.detokenize(tokens)
    params = sampling_params(req, state.settings.model, tokens, req.max_tokens or 16)
    params.grammar = grammar_for(req.response_format, req.grammar)
    if req.logprobs is not None:
        params.logprobs = True
        params.top_logprobs = req.logprobs
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return Prepared(
        "text", model_id, params, include_usage=include_usage, echo=text if req.echo else None
    )
