"""Prepare chat and text completion requests: model check, prompt, RAG, sampling. Every
step runs on the one runtime the request holds a lease on. Preparation is blocking work
(retrieval, chat template, tokenization): the router runs it in a worker thread, after the
request has its place in the engine's queue."""

from __future__ import annotations

from docqa.settings import Settings
from server import tools
from server.errors import bad_request
from server.generation import GenParams
from server.grammar import GrammarLimits
from server.runtime import ModelManager, ModelRuntime
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.services.generation import (
    Prepared,
    grammar_for,
    merge_bias,
    request_bias,
    sampling_params,
    with_cad,
)
from server.services.generation import alternatives as gen_alternatives
from server.services.models import ModelNames
from server.services.rag import RagService


class ChatService:
    def __init__(self, settings: Settings, models: ModelManager, rag: RagService | None):
        self.settings = settings
        self.models = models
        self.rag = rag
        self.grammar_limits = GrammarLimits.from_settings(settings.server.limits)
        self.names = ModelNames(settings, rag is not None)

    def resolve_model_id(self, rt: ModelRuntime, requested: str | None) -> tuple[str, bool]:
        """Return (model id to report, use retrieval) or raise 404."""
        return self.names.chat(rt, requested)

    def prepare_chat(self, rt: ModelRuntime, req: ChatCompletionRequest) -> Prepared:
        model_id, use_rag = self.resolve_model_id(rt, req.model)
        if req.rag is not None:
            use_rag = req.rag and self.rag is not None
        limit = self.settings.server.limits.max_messages
        if len(req.messages) > limit:
            raise bad_request(
                f"at most {limit} messages per request (server.limits.max_messages)",
                "messages",
                "too_many_messages",
            )
        plan = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls, self.grammar_limits)
        calling = plan is not None and plan.active
        original = messages = _messages(req)
        grounding = None
        # a turn answering a tool result is not a new question: no retrieval for it
        if use_rag and req.messages[-1].role not in ("tool", "function"):
            messages, grounding = self.rag.augment(rt, messages)
        if calling:
            messages = tools.with_system(messages, plan.system_text())
        prompt = rt.format_chat(messages)
        tokens = rt.prompt_tokens(prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None and grounding is not None:
            max_tokens = self.settings.retrieval.answer_max_tokens
        params: GenParams = sampling_params(req, self.settings.model, tokens, max_tokens)
        params.logit_bias = request_bias(req, _vocab_size(rt))
        params.grammar = grammar_for(req.response_format, req.grammar, self.grammar_limits)
        if calling:
            if params.grammar is not None:
                raise bad_request(
                    "response_format and grammar cannot be combined with tools (unless "
                    "tool_choice is 'none')",
                    "tool_choice",
                )
            params.grammar = plan.grammar()
        params.messages = messages  # what a remote engine sends
        if grounding is not None:
            params.stop = [*params.stop, *self.settings.retrieval.stop]
            if params.grammar is None:  # never cut a tool call or a structured output
                params.loop_repeats = self.settings.retrieval.loop_repeats
                params.drop_scaffolding = self.settings.retrieval.drop_scaffolding
            alpha = self.settings.retrieval.cad_alpha if req.cad_alpha is None else req.cad_alpha
            # (not with tools: the context-free prompt would not describe them)
            if grounding.hits and alpha > 0 and not calling:
                with_cad(rt, params, self.rag.context_free(rt, original), alpha)
            if not calling:
                params.logit_bias = merge_bias(
                    params.logit_bias,
                    self.rag.evidence_bias(rt, grounding, original, req.evidence_bias),
                )
                params.logit_bias = merge_bias(
                    params.logit_bias, self.rag.example_bias(rt, grounding, original)
                )
            if not params.cad and not calling:  # excerpts from chunk KV caches, if kept
                params.kv_plan = self.rag.kv_plan(rt, prompt, tokens, grounding)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        params.logprobs = req.logprobs
        params.top_logprobs = req.top_logprobs or 0
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        alternatives: list[GenParams] = []
        evidence: list[str] = []
        if grounding is not None and grounding.evidence and not calling and not req.logprobs:
            r = self.settings.retrieval
            n = r.answer_candidates if req.answer_candidates is None else req.answer_candidates
            if n > 1 and params.grammar is None:
                alternatives = gen_alternatives(params, n - 1, r.answer_candidate_temperature)
                evidence = [e.text for e in grounding.evidence]
        return Prepared(
            "chat",
            model_id,
            params,
            include_usage=include_usage,
            grounding=grounding,
            canned=grounding.abstain if grounding is not None and not calling else None,
            tools=plan if calling else None,
            alternatives=alternatives,
            evidence=evidence,
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
        params.logit_bias = request_bias(req, _vocab_size(rt))
        params.grammar = grammar_for(req.response_format, req.grammar, self.grammar_limits)
        params.prompt_text = text  # what a remote engine sends
        if req.logprobs is not None:
            params.logprobs = True
            params.top_logprobs = req.logprobs
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Prepared(
            "text", model_id, params, include_usage=include_usage, echo=text if req.echo else None
        )


def _vocab_size(rt: ModelRuntime) -> int | None:
    """The served model's vocabulary size, None when this runtime counts tokens with another
    model's (a remote model docqa does not have)."""
    return rt.n_vocab if rt.same_vocab else None


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The chat as role/content pairs: past tool calls written as the model writes them,
    tool results as a user turn (consecutive results in one)."""
    out: list[dict[str, str]] = []
    for m in req.messages:
        role, content = ("system" if m.role == "developer" else m.role), m.text()
        if role == "assistant" and m.tool_calls:
            calls = tools.call_text(m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        elif role in ("tool", "function"):
            content = tools.result_text(content)
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + content
                continue
            out.append({"role": "user", "content": content, "tool": "1"})
            continue
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("tool", None)
    return out
