"""Grounded answers: retrieval, context block within the budget, citations, abstain."""

from __future__ import annotations

import logging
import re

from docqa.settings import RetrievalSettings
from retrieval.answers import CITE, unsupported_names, words_held
from retrieval.evidence import Evidence, for_reader
from retrieval.prompting import block as format_block
from retrieval.prompting import evidence_lines, evidence_tag, evidence_text, rag_messages
from retrieval.search import Hit, SearchResult
from server import kvcache
from server.errors import APIError
from server.runtime import ModelRuntime
from server.services.index import IndexService

log = logging.getLogger(__name__)
_FOLLOWUP = re.compile(r"\b(it|its|that|this|those|these|they|them|there|he|she|one)\b", re.I)


def fold_query(messages: list[dict[str, str]]) -> str:
    """The retrieval query: the latest user turn, with the previous one folded in when the
    latest looks like a follow-up (short, or leaning on a pronoun)."""
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    if not users:
        return ""
    q = users[-1]
    if len(users) > 1 and (len(q.split()) < 6 or _FOLLOWUP.search(q)):
        q = f"{users[-2]} {q}"
    return q


def cited(text: str, n: int) -> list[int]:
    out = []
    for m in CITE.finditer(text):
        i = int(m.group(1))
        if 1 <= i <= n and i not in out:
            out.append(i)
    return out


def source(i: int, h: Hit) -> dict:
    c = h.chunk
    return {
        "index": i,
        "id": c.id,
        "path": c.path,
        "heading": c.heading,
        "score": round(h.score, 6),
        "text": c.text,
    }


class RagService:
    """Grounds a chat: retrieval from the served index, then the prompt with as many excerpts
    as fit the current model's context."""

    def __init__(self, settings: RetrievalSettings, index: IndexService):
        self.settings = settings
        self.index = index

    def search(self, query: str) -> SearchResult:
        return self.index.search(query)

    def build_messages(
        self,
        rt: ModelRuntime,
        messages: list[dict[str, str]],
        hits: list[Hit],
        evidence: list[Evidence],
        examples: bool = True,
    ) -> tuple[list, list, list[Evidence]]:
        """Replace the last user turn by the template with as many chunks as fit the budget,
        and those chunks' lines of ``evidence``, after ``retrieval.examples`` unless
        ``examples`` is false. -> (messages, hits used, evidence kept)."""
        r = self.settings
        question = messages[-1]["content"]
        history = [m for m in messages[:-1] if m["role"] != "system"]
        extra_system = [m["content"] for m in messages if m["role"] == "system"]

        def render(blocks: list[str], ev: list[Evidence]) -> list[dict[str, str]]:
            lines = evidence_lines([(e.chunk + 1, e.text) for e in ev])
            return rag_messages(
                r.system_prompt,
                r.user_template,
                question,
                blocks,
                history,
                extra_system,
                lines,
                examples=r.examples if examples else (),
            )

        def n_tokens(msgs) -> int:
            return len(rt.prompt_tokens(rt.format_chat(msgs)))

        if not r.shows_excerpts:
            # the evidence layout: the lines alone, tagged [n] by the excerpt they come from;
            # the excerpts themselves are the answer's sources, not part of the prompt
            return render([], evidence), list(hits), evidence
        budget = rt.n_ctx - min(r.answer_reserve, rt.n_ctx // 4)
        room = budget - n_tokens(render([], evidence))
        blocks: list[str] = []
        used: list[Hit] = []
        for h in hits:
            block = format_block(len(blocks) + 1, h.chunk)
            ids = rt.tokenize(block, special=False)
            cost = len(ids) + 4
            if cost > room:
                ids = ids[: max(0, room - 8)]
                if len(ids) >= 48:  # a trimmed chunk still worth reading
                    blocks.append(rt.detokenize(ids))
                    used.append(h)
                break
            blocks.append(block)
            used.append(h)
            room -= cost
        evidence = [e for e in evidence if e.chunk < len(used)]
        return render(blocks, evidence), used, evidence

    def evidence(self, question: str, hits: list[Hit]) -> list[Evidence]:
        if not self.settings.evidence_units or not hits:
            return []
        retriever = self.index.retriever
        texts = [h.chunk.text for h in hits]
        return for_reader(question, texts, retriever.idf, self.settings.evidence_units)

    def context_free(
        self, rt: ModelRuntime, messages: list[dict[str, str]]
    ) -> list[dict[str, str]]:
        """The chat that context-aware decoding contrasts a grounded prompt with (the user's
        ``messages`` without the excerpts): as sent, or the grounded template rendered with
        no excerpts (``retrieval.cad_context_free``)."""
        if self.settings.cad_context_free == "template":
            return self.build_messages(rt, messages, [], [])[0]
        return messages

    def evidence_bias(
        self,
        rt: ModelRuntime,
        grounding: Grounding,
        messages: list[dict[str, str]],
        bias: float | None = None,
    ) -> dict[int, float] | None:
        """``retrieval.evidence_bias`` (or a request's ``bias``) as a logit bias for the answer
        to ``messages`` grounded by ``grounding``: each token of the evidence lines' own text
        that the grounded prompt without them (system prompt, template, question) does not
        hold, code fences aside, so that the answer leans towards what the lines say, not
        towards the scaffolding, the tags or the question's words. None when off or without
        evidence. Blocking."""
        bias = self.settings.evidence_bias if bias is None else bias
        if bias <= 0 or not grounding.evidence or not rt.same_vocab:
            return None
        bare = rt.prompt_tokens(rt.format_chat(self.build_messages(rt, messages, [], [])[0]))
        toks: set[int] = set()
        for e in grounding.evidence:
            toks.update(rt.tokenize(evidence_text(e.text), add_bos=False, special=False))
        # not code fences: a fence copied from a line opens an empty code block (an echo)
        keep = [t for t in sorted(toks - set(bare)) if "``" not in rt.detokenize([t])]
        return {t: float(bias) for t in keep} or None

    def example_bias(
        self, rt: ModelRuntime, grounding: Grounding, messages: list[dict[str, str]]
    ) -> dict[int, float] | None:
        """The worked examples' own names and values (``retrieval.examples[].names``) barred
        from the answer: their tokens (3+ characters, or digits) that neither the evidence
        lines, the question nor the system prompt hold. None without examples or evidence.
        Blocking."""
        names = [n for ex in self.settings.examples for n in ex.names]
        if not names or not grounding.evidence or not rt.same_vocab:
            return None
        held = "\n".join(
            [self.settings.system_prompt, messages[-1]["content"]]
            + [evidence_text(e.text) for e in grounding.evidence]
        )
        allowed = set(rt.tokenize(held, add_bos=False, special=False))
        banned: set[int] = set()
        for name in names:
            for form in (name, " " + name, "`" + name):
                banned.update(rt.tokenize(form, add_bos=False, special=False))
        keep = []
        for t in sorted(banned - allowed):
            text = rt.detokenize([t]).strip()
            if len(text) >= 3 or text.isdigit():
                keep.append(t)
        return {t: -100.0 for t in keep} or None

    def kv_plan(self, rt: ModelRuntime, prompt: str, tokens: list[int], grounding: Grounding):
        """The grounded ``prompt`` cut for chunk KV caches (``server.kvcache``), or None: no
        cache on this runtime, no excerpts, a prompt of another shape (history, an extra
        system message, a trimmed excerpt) or one whose pieces tokenize differently from the
        whole (the answer must not depend on the cache being there)."""
        if getattr(rt, "kv", None) is None or not grounding.hits:  # (a remote runtime: none)
            return None
        prefix_text = kvcache.prefix_text(rt, self.settings)
        if prefix_text is None:
            return None

        def tokenize(text: str) -> list[int]:
            return rt.tokenize(text, add_bos=False, special=True)

        if self.settings.shows_excerpts:
            blocks = [
                (h.chunk.id, f"[{i}]", format_block(i, h.chunk))
                for i, h in enumerate(grounding.hits, 1)
            ]
            plan = kvcache.build_plan(prompt, prefix_text, blocks, tokenize, rt.prompt_tokens)
        else:
            lines = [(evidence_text(e.text), evidence_tag(e.chunk + 1)) for e in grounding.evidence]
            plan = kvcache.build_unit_plan(prompt, prefix_text, lines, tokenize, rt.prompt_tokens)
        if plan is None or plan.tokens != tokens:
            log.debug("grounded prompt not cut for chunk KV caches: plain prefill")
            return None
        plan.recompute = self.settings.kv_recompute
        return plan

    def augment(self, rt: ModelRuntime, messages: list[dict[str, str]]):
        """-> (messages for the model, Grounding). Blocking (retrieval, tokenization): call it
        in a worker thread."""
        if not messages or messages[-1]["role"] != "user":
            return messages, Grounding([], None)
        query = fold_query(messages)
        return self.ground(rt, messages, self.search(query), query)

    def ground(
        self,
        rt: ModelRuntime,
        messages: list[dict[str, str]],
        res: SearchResult,
        query: str,
        examples: bool = True,
    ):
        """``augment`` for a search already made: the prompt for ``messages`` grounded on
        ``res``, with the evidence lines picked for ``query`` (or the abstain decision); the
        worked examples unless ``examples`` is false."""
        r = self.settings
        if not res.hits or res.best_sim < r.abstain_threshold:
            log.info("abstain: best similarity %.3f < %.3f", res.best_sim, r.abstain_threshold)
            return messages, Grounding([], r.abstain_message, res.best_sim)
        evidence = self.evidence(query, res.hits)
        new_messages, used, evidence = self.build_messages(
            rt, messages, res.hits, evidence, examples
        )
        if not used and not evidence:  # the conversation leaves no room for any excerpt
            raise APIError(
                400,
                f"the conversation leaves no room for the documentation excerpts in the "
                f"model's context ({rt.n_ctx} tokens, {min(r.answer_reserve, rt.n_ctx // 4)} "
                "kept for the answer): shorten the conversation",
                param="messages",
                code="context_length_exceeded",
            )
        return new_messages, Grounding(
            used, None, res.best_sim, evidence, question=query, sources=r.sources
        )


class Grounding:
    """What retrieval decided for one request; ``finalize`` makes the ``sources`` field."""

    def __init__(
        self,
        hits: list[Hit],
        abstain: str | None,
        best_sim: float | None = None,
        evidence: list[Evidence] | None = None,
        question: str = "",
        sources: str | None = None,
    ):
        self.hits = hits
        self.abstain = abstain
        self.best_sim = best_sim
        self.evidence = evidence or []
        self.question = question
        self.policy = sources  # retrieval.sources of the request (None: the cited ones)

    def pick(self, text: str) -> list[tuple[int, bool]]:
        """(excerpt number, cited) of the excerpts ``text`` names as its sources: the ones it
        cites (all when it cites none); with ``retrieval.sources: supported`` also the one
        holding most of its words when that is more than any cited one holds."""
        n = len(self.hits)
        tags = cited(text, n)
        if not tags:
            return [(i, False) for i in range(1, n + 1)]
        out = [(i, True) for i in tags]
        if self.policy == "supported":
            sup = words_held(text, [h.chunk.text for h in self.hits], self.question)
            best = max(range(1, n + 1), key=lambda i: sup[i - 1])
            if sup[best - 1] > max(sup[i - 1] for i in tags):
                out.append((best, False))
        return out

    def finalize(self, text: str) -> dict:
        """``sources``: the excerpts the answer names (``pick``), each with the evidence lines
        found in it (offsets into its ``text``) and whether the answer cites it;
        ``unsupported``: what the answer names (code spans, identifiers, paths, numbers) that
        none of those sources nor the question holds, for a client to flag."""
        if self.abstain is not None or not self.hits:
            return {"sources": [], "unsupported": []}
        out = []
        for i, was_cited in self.pick(text):
            src = source(i, self.hits[i - 1])
            src["cited"] = was_cited
            src["evidence"] = [
                e.to_dict()
                for e in sorted(self.evidence, key=lambda e: e.start)
                if e.chunk == i - 1
            ]
            out.append(src)
        held = "\n".join([self.question] + [src["text"] for src in out])
        return {"sources": out, "unsupported": unsupported_names(text, held)}
