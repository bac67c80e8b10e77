"""Support-ticket auto-reply: clean the ticket, answer each question from the docs, and
decide whether the draft can go out ("auto") or a human must look ("human")."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import anyio

from docqa.settings import RetrievalSettings, Settings, TicketSettings
from retrieval.answers import unsupported_names
from retrieval.bm25 import content_words
from retrieval.evidence import Evidence, coverage
from retrieval.search import SearchResult, rrf
from server.engine import Slot
from server.generation import Delta, Finish, GenParams
from server.runtime import ModelManager, ModelRuntime
from server.services.generation import alternatives, merge_bias, with_cad, with_candidates
from server.services.rag import _FOLLOWUP, RagService

_QUOTED_HEADER = re.compile(
    r"^\s*(On .{3,200}wrote:|-----\s*Original Message\s*-----|From: .+)$", re.I | re.M
)
_SIGNATURE = re.compile(
    r"^\s*(--\s*|(best|kind|warm)?\s*regards,?|thanks( a lot| again)?,?|"
    r"thank you,?|cheers,?|sent from my .+)\s*$",
    re.I,
)
# a salutation and at most three names ("Hi John,", "Dear support team,"), nothing more: a
# line that goes on ("Hi, I need a refund for my invoice.") is kept
_GREETING = re.compile(
    r"^\s*(hi|hello|hey|dear|good (morning|afternoon|evening))\b(\s+[\w.'-]+){0,3}"
    r"\s*[,!.]?\s*$",
    re.I,
)
_SENT = re.compile(r"(?<=[.!?])\s+")


def clean_ticket(subject: str, body: str, greetings: bool = True) -> str:
    """Strip quoted earlier replies, signatures and (with ``greetings``) greetings."""
    m = _QUOTED_HEADER.search(body)
    if m:
        body = body[: m.start()]
    lines = []
    for line in body.splitlines():
        if line.lstrip().startswith(">"):
            continue
        if _SIGNATURE.match(line):
            break
        if greetings and not lines and _GREETING.match(line):
            continue
        lines.append(line)
    text = "\n".join(lines).strip()
    subject = re.sub(r"^\s*((re|fwd?|aw)\s*:\s*)+", "", subject or "", flags=re.I).strip()
    return (
        (subject + "\n" + text).strip() if subject and subject.lower() not in text.lower() else text
    )


def sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s.strip() for s in _SENT.split(flat) if s.strip()]


def split_questions(text: str, limit: int | None = None) -> list[str]:
    flat = " ".join(text.split())
    sents = sentences(flat)
    qs = [s for s in sents if s.endswith("?")]
    if not qs:
        return [flat] if flat else []
    return qs[:limit]


def scope_hits(text: str, words: list[str]) -> list[str]:
    """The out-of-scope ``words`` in ``text``, inflected forms too ("invoices", "charged",
    "refunding"): before, only the exact word counted, and a billing ticket went out."""
    lowered = f" {text.lower()} "
    return [w for w in words if re.search(rf"\b{re.escape(w.lower())}(s|es|d|ed|ing)?\b", lowered)]


def ticket_query(subject: str, text: str, question: str, n_before: int) -> str:
    """``question`` as retrieved inside its ticket (``text``, cleaned): the ticket's subject and
    the ``n_before`` sentences before it, then the question itself; 0: the question alone."""
    if n_before <= 0:
        return question
    sents = sentences(text)
    i = sents.index(question) if question in sents else len(sents)
    before = sents[max(0, i - n_before) : i]
    subject = re.sub(r"^\s*((re|fwd?|aw)\s*:\s*)+", "", subject or "", flags=re.I).strip()
    parts = [*before, question]
    if subject and subject.lower() not in " ".join(parts).lower():
        parts.insert(0, subject)
    return " ".join(parts)


def support(answer: str, sources_text: str) -> float:
    words = set(content_words(answer))
    if not words:
        return 0.0
    src = set(content_words(sources_text))
    return len(words & src) / len(words)


def leans(question: str) -> bool:
    """A question that leans on what comes before it: short, or with a pronoun."""
    return len(question.split()) < 6 or bool(_FOLLOWUP.search(question))


def search_ticket(
    rag: RagService, query: str, r: RetrievalSettings, fuse_dense: bool
) -> SearchResult:
    """The top ``r.top_k`` chunks for a ticket question: the retriever's ranking, or (with
    ``fuse_dense``, a hybrid retriever and no reranker) the reciprocal rank fusion of its
    hybrid and dense-only rankings of ``r.candidates`` chunks each. Blocking."""
    if not fuse_dense or r.mode != "hybrid" or r.reranker:
        return rag.search(query)
    hyb = rag.index.search(query, r.candidates)
    dense = rag.index.search(query, r.candidates, mode="dense")
    by_id = {h.chunk.id: h for h in dense.hits + hyb.hits}
    fused = rrf(
        [[h.chunk.id for h in hyb.hits], [h.chunk.id for h in dense.hits]], [1.0, 1.0], r.rrf_k
    )
    hits = [replace(by_id[cid], score=score) for cid, score in fused[: r.top_k]]
    return SearchResult(hits, hyb.best_sim, hyb.timings_ms)


@dataclass
class Answer:
    question: str
    text: str = ""
    sources: list = field(default_factory=list)
    similarity: float = -1.0
    support: float = 0.0
    coverage: float = 0.0  # of the question by its evidence lines
    evidence_support: float = 0.0  # of the reply by its evidence lines
    reason: str | None = None


def check_reply(
    a: Answer, asked: str, evidence: list[Evidence], idf, cfg: TicketSettings
) -> Answer:
    """Whether ``a`` (its text and sources set) may go out automatically: its words are in its
    sources (``min_support``), the evidence lines picked for ``asked`` (the question with its
    ticket context) speak to it (``min_evidence_coverage``), and the reply's words and every
    name it gives are in those lines (``min_evidence_support``). Sets ``a``'s figures and, on a
    failed check, its ``reason``."""
    ev_text = " ".join(f"{e.context} {e.text}" for e in evidence)
    a.support = support(a.text, " ".join(s["text"] for s in a.sources))
    a.coverage = coverage(asked, evidence, idf)
    a.evidence_support = support(a.text, ev_text)
    missing = unsupported_names(a.text, f"{ev_text} {asked}")
    if a.support < cfg.min_support:
        a.reason = f"reply not supported by its sources ({a.support:.2f})"
    elif a.coverage < cfg.min_evidence_coverage:
        a.reason = f"the evidence lines cover little of the question ({a.coverage:.2f})"
    elif a.evidence_support < cfg.min_evidence_support:
        a.reason = f"reply not supported by its evidence lines ({a.evidence_support:.2f})"
    elif missing:
        a.reason = f"reply names what its evidence lines do not: {', '.join(missing[:3])}"
    return a


def _params(
    rt: ModelRuntime,
    messages,
    max_tokens: int,
    r: RetrievalSettings,
    context_free: list[dict[str, str]] | None = None,
    cad_alpha: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> GenParams:
    """Greedy generation of a grounded answer to ``messages``, with the stop strings and loop
    guard of ``r`` (blocking: templating, tokenization)."""
    tokens = rt.prompt_tokens(rt.format_chat(messages))
    params = GenParams(
        prompt_tokens=tokens,
        max_tokens=max_tokens,
        temperature=0.0,
        seed=0,  # sampled candidates (retrieval.answer_candidates): same ticket, same reply
        stop=list(r.stop),
        loop_repeats=r.loop_repeats,
        drop_scaffolding=r.drop_scaffolding,
        logit_bias=logit_bias,
    )
    params.messages = messages  # what a remote engine sends
    if context_free is not None:
        with_cad(rt, params, context_free, cad_alpha)
    rt.check_fits(params.n_prompt_max, "ticket")
    return params


async def _generate(
    rt: ModelRuntime,
    messages,
    max_tokens: int,
    r: RetrievalSettings,
    context_free: list[dict[str, str]] | None = None,
    cad_alpha: float = 0.0,
    slot: Slot | None = None,
    logit_bias: dict[int, float] | None = None,
    score=None,
) -> tuple[str, str]:
    """Greedy answer to ``messages`` and how it ended (``Finish.reason``: "stop", "length",
    "cancelled", ...); with context-aware decoding against ``context_free`` (the question
    without the excerpts) when ``cad_alpha`` > 0. The prompt is prepared in a worker thread;
    the job runs in ``slot`` (a place reserved in the queue) or in a new one. With a ``score``
    (text -> comparable) and ``r.answer_candidates`` > 1, sampled candidates run beside it in
    spare places and the best scored answer is returned (``BestOfJob``)."""
    params = await anyio.to_thread.run_sync(
        _params, rt, messages, max_tokens, r, context_free, cad_alpha, logit_bias
    )
    job = slot.submit(params) if slot is not None else rt.submit(params)
    if score is not None and r.answer_candidates > 1:
        more = alternatives(params, r.answer_candidates - 1, r.answer_candidate_temperature)
        job = with_candidates(rt, job, more, score)
    out, reason = [], "stop"
    try:
        async for ev in job:
            if isinstance(ev, Delta):
                out.append(ev.text)
            elif isinstance(ev, Finish):
                reason = ev.reason
    except BaseException:  # cancelled (its client left) or failed: the engine stops it too
        job.cancel()
        raise
    return "".join(out).strip(), reason


class TicketService:
    def __init__(self, settings: Settings, models: ModelManager, rag: RagService):
        self.settings = settings
        self.models = models
        self.rag = rag

    async def reply(self, ticket: dict) -> dict:
        """One ticket in, one reply record out, all on one model runtime and one place in its
        queue, reserved before any work (``QueueFull`` at once when there is none); the
        ticket's questions are answered one after the other in that place."""
        held = self.models.acquire()
        try:
            with held.runtime.reserve() as slot:
                return await reply_ticket(self.settings, self.rag, held.runtime, ticket, slot)
        finally:
            held.release()


async def reply_ticket(
    settings: Settings, rag: RagService, rt: ModelRuntime, ticket: dict, slot: Slot | None = None
) -> dict:
    cfg = settings.tickets
    tid = str(ticket.get("id", ""))
    subject, body = str(ticket.get("subject") or ""), str(ticket.get("body") or "")
    text = await anyio.to_thread.run_sync(clean_ticket, subject, body)
    if not re.search(r"[A-Za-z]{3,}", text):
        return {"id": tid, "error": "empty or unreadable ticket", "decision": "human"}
    # the scope check reads the ticket before greetings are dropped: nothing hides from it
    raw = await anyio.to_thread.run_sync(clean_ticket, subject, body, False)
    hits = scope_hits(raw, cfg.out_of_scope)
    answers: list[Answer] = []
    alpha = settings.retrieval.cad_alpha
    asked_all = split_questions(text)
    for q in asked_all[: cfg.max_questions]:
        a = Answer(q)

        def ground(q=q):
            """A question that stands alone is retrieved and read alone; one that leans on its
            ticket ("Which address should it be?"), or finds nothing alone, is retrieved and
            read with the ticket's subject and the sentences before it."""
            res = rag.search(q)
            asked = q
            if leans(q) or res.best_sim < cfg.min_similarity:
                asked = ticket_query(subject, text, q, cfg.context_sentences)
                if asked != q:
                    res = search_ticket(rag, asked, settings.retrieval, cfg.fuse_dense)
            messages = [{"role": "user", "content": asked}]
            return asked, messages, *rag.ground(rt, messages, res, asked, cfg.examples)

        asked, messages, new_messages, grounding = await anyio.to_thread.run_sync(ground)
        a.similarity = grounding.best_sim if grounding.best_sim is not None else -1.0
        if grounding.abstain is not None or a.similarity < cfg.min_similarity:
            a.reason = f"weak retrieval evidence for: {q[:80]}"
            answers.append(a)
            continue
        bias = await anyio.to_thread.run_sync(rag.evidence_bias, rt, grounding, messages)
        if cfg.examples:
            barred = await anyio.to_thread.run_sync(rag.example_bias, rt, grounding, messages)
            bias = merge_bias(bias, barred)

        def passes(text: str, q=q, asked=asked, grounding=grounding) -> tuple:
            """Among candidate replies: one that passes the automatic-reply checks, the best
            supported by its evidence lines, then by its sources."""
            b = Answer(q, text.strip())
            b.sources = grounding.finalize(b.text)["sources"]
            check_reply(b, asked, grounding.evidence, rag.index.retriever.idf, cfg)
            return (b.reason is None, b.evidence_support, b.support)

        a.text, ended = await _generate(
            rt,
            new_messages,
            cfg.max_tokens,
            settings.retrieval,
            rag.context_free(rt, messages) if alpha > 0 else None,
            alpha,
            slot,
            bias,
            passes,
        )
        fields = grounding.finalize(a.text)
        a.sources = fields["sources"]
        check_reply(a, asked, grounding.evidence, rag.index.retriever.idf, cfg)
        if ended != "stop":  # cut off by max_tokens, or cancelled: never sent as it is
            why = f"reply {'cut off' if ended == 'length' else ended}: {q[:80]}"
            a.reason = f"{why}; {a.reason}" if a.reason else why
        answers.append(a)
    answered = [a for a in answers if a.text]
    reply = "\n\n".join(a.text for a in answered) or settings.retrieval.abstain_message
    sims = [max(0.0, min(1.0, a.similarity)) for a in answers] or [0.0]
    sups = [a.support for a in answers] or [0.0]
    confidence = round(min(sims) * 0.5 + min(sups) * 0.5, 4)
    reasons = [a.reason for a in answers if a.reason]
    if len(asked_all) > cfg.max_questions:
        reasons.append(
            f"{len(asked_all)} questions, only {cfg.max_questions} answered (tickets.max_questions)"
        )
    if hits:
        reasons.insert(0, f"out of scope: {', '.join(hits)}")
    if not reasons and confidence < cfg.auto_threshold:
        reasons.append(f"low confidence {confidence:.2f}")
    seen, sources = set(), []
    for a in answers:
        for s in a.sources:
            key = (s["path"], s["heading"])
            if key not in seen:
                seen.add(key)
                sources.append({"path": s["path"], "heading": s["heading"], "score": s["score"]})
    return {
        "id": tid,
        "reply": reply,
        "sources": sources,
        "confidence": confidence,
        "decision": "human" if reasons else "auto",
        "reason": "; ".join(reasons) if reasons else "answered from the documentation",
    }
