"""Prepare chat and text completion requests: model check, prompt, RAG, sampling. Every
step runs on the one runtime the request holds a lease on. Preparation is blocking work
(retrieval, chat template, tokenization): the router runs it in a worker thread, after the
request has its place in the engine's queue."""

from __future__ import annotations

from docqa.settings import Settings
from server.errors import APIError, bad_request
from server.generation import GenParams
from server.runtime import ModelManager, ModelRuntime
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.services.generation import Prepared, grammar_for, sampling_params, with_cad
from server.services.rag import RagService


class ChatService:
    def __init__(self, settings: Settings, models: ModelManager, rag: RagService | None):
        self.settings = settings
        self.models = models
        self.rag = rag

    def resolve_model_id(self, rt: ModelRuntime, requested: str | None) -> tuple[str, bool]:
        """Return (model id to report, use retrieval) or raise 404."""
        rag_id = self.settings.retrieval.rag_model_id
        has_rag = self.rag is not None
        if requested is None or requested == "":
            return (rag_id, True) if has_rag else (rt.id, False)
        if requested == rt.id:
            return requested, False
        if has_rag and requested == rag_id:
            return requested, True
        known = [rt.id] + ([rag_id] if has_rag else [])
        raise APIError(
            404,
            f"The model '{requested}' does not exist. Available: {', '.join(known)}",
            param="model",
            code="model_not_found",
        )

    def prepare_chat(self, rt: ModelRuntime, req: ChatCompletionRequest) -> Prepared:
        model_id, use_rag = self.resolve_model_id(rt, req.model)
        if req.rag is not None:
            use_rag = req.rag and self.rag is not None
        original = messages = _messages(req)
        grounding = None
        if use_rag:
            messages, grounding = self.rag.augment(rt, messages)
        tokens = rt.prompt_tokens(rt.format_chat(messages))
        max_tokens = req.max_completion_tokens or req.max_tokens
        params: GenParams = sampling_params(req, self.settings.model, tokens, max_tokens)
        params.grammar = grammar_for(req.response_format, req.grammar)
        if grounding is not None:
            params.stop = [*params.stop, *self.settings.retrieval.stop]
            alpha = self.settings.retrieval.cad_alpha if req.cad_alpha is None else req.cad_alpha
            if grounding.hits and alpha > 0:  # contrast with the chat without the excerpts
                with_cad(rt, params, self.rag.context_free(rt, original), alpha)
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

    def prepare_completion(self, rt: ModelRuntime, req: CompletionRequest) -> Prepared:
        model_id, _ = self.resolve_model_id(rt, req.model)
        if isinstance(req.prompt, str):
            text = req.prompt
            tokens = rt.prompt_tokens(text)
        elif req.prompt and isinstance(req.prompt[0], str):
            text = req.prompt[0]
            tokens = rt.prompt_tokens(text)
        else:
            tokens = [int(t) for t in req.prompt]  # type: ignore[union-attr]
            if any(t < 0 or t >= rt.n_vocab for t in tokens):
                raise bad_request(f"prompt token ids must be in [0, {rt.n_vocab})", "prompt")
            text = rt.detokenize(tokens)
        params = sampling_params(req, self.settings.model, tokens, req.max_tokens or 16)
        params.grammar = grammar_for(req.response_format, req.grammar)
        if req.logprobs is not None:
            params.logprobs = True
            params.top_logprobs = req.logprobs
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Prepared(
            "text", model_id, params, include_usage=include_usage, echo=text if req.echo else None
        )


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()})
    return out
