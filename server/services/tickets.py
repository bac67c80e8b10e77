"""Support-ticket auto-reply: clean the ticket, answer each question from the docs, and
decide whether the draft can go out ("auto") or a human must look ("human")."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import anyio

from docqa.settings import RetrievalSettings, Settings
from retrieval.bm25 import content_words
from server.engine import Slot
from server.generation import Delta, GenParams
from server.runtime import ModelManager, ModelRuntime
from server.services.generation import with_cad
from server.services.rag import RagService

_QUOTED_HEADER = re.compile(
    r"^\s*(On .{3,200}wrote:|-----\s*Original Message\s*-----|From: .+)$", re.I | re.M
)
_SIGNATURE = re.compile(
    r"^\s*(--\s*|(best|kind|warm)?\s*regards,?|thanks( a lot| again)?,?|"
    r"thank you,?|cheers,?|sent from my .+)\s*$",
    re.I,
)
_GREETING = re.compile(
    r"^\s*(hi|hello|hey|dear|good (morning|afternoon|evening))\b[^\n]{0,40}"
    r"[,!.]?\s*$",
    re.I,
)
_SENT = re.compile(r"(?<=[.!?])\s+")


def clean_ticket(subject: str, body: str) -> str:
    """Strip quoted earlier replies, signatures and greetings."""
    m = _QUOTED_HEADER.search(body)
    if m:
        body = body[: m.start()]
    lines = []
    for line in body.splitlines():
        if line.lstrip().startswith(">"):
            continue
        if _SIGNATURE.match(line):
            break
        if not lines and _GREETING.match(line):
            continue
        lines.append(line)
    text = "\n".join(lines).strip()
    subject = re.sub(r"^\s*((re|fwd?|aw)\s*:\s*)+", "", subject or "", flags=re.I).strip()
    return (
        (subject + "\n" + text).strip() if subject and subject.lower() not in text.lower() else text
    )


def split_questions(text: str, limit: int) -> list[str]:
    flat = " ".join(text.split())
    sents = [s.strip() for s in _SENT.split(flat) if s.strip()]
    qs = [s for s in sents if s.endswith("?")]
    if not qs:
        return [flat] if flat else []
    return qs[:limit]


def support(answer: str, sources_text: str) -> float:
    words = set(content_words(answer))
    if not words:
        return 0.0
    src = set(content_words(sources_text))
    return len(words & src) / len(words)


@dataclass
class Answer:
    question: str
    text: str = ""
    sources: list = field(default_factory=list)
    similarity: float = -1.0
    support: float = 0.0
    reason: str | None = None


def _params(
    rt: ModelRuntime,
    messages,
    max_tokens: int,
    r: RetrievalSettings,
    context_free: list[dict[str, str]] | None = None,
    cad_alpha: float = 0.0,
) -> GenParams:
    """Greedy generation of a grounded answer to ``messages``, with the stop strings and loop
    guard of ``r`` (blocking: templating, tokenization)."""
    tokens = rt.prompt_tokens(rt.format_chat(messages))
    params = GenParams(
        prompt_tokens=tokens,
        max_tokens=max_tokens,
        temperature=0.0,
        stop=list(r.stop),
        loop_repeats=r.loop_repeats,
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
) -> str:
    """Greedy answer to ``messages``; with context-aware decoding against ``context_free`` (the
    question without the excerpts) when ``cad_alpha`` > 0. The prompt is prepared in a worker
    thread; the job runs in ``slot`` (a place reserved in the queue) or in a new one."""
    params = await anyio.to_thread.run_sync(
        _params, rt, messages, max_tokens, r, context_free, cad_alpha
    )
    job = slot.submit(params) if slot is not None else rt.submit(params)
    out = []
    async for ev in job:
        if isinstance(ev, Delta):
            out.append(ev.text)
    return "".join(out).strip()


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
    lowered = f" {text.lower()} "
    scope_hits = [w for w in cfg.out_of_scope if re.search(rf"\b{re.escape(w)}\b", lowered)]
    answers: list[Answer] = []
    alpha = settings.retrieval.cad_alpha
    for q in split_questions(text, cfg.max_questions):
        a = Answer(q)
        messages = [{"role": "user", "content": q}]
        new_messages, grounding = await anyio.to_thread.run_sync(rag.augment, rt, messages)
        a.similarity = grounding.best_sim if grounding.best_sim is not None else -1.0
        if grounding.abstain is not None or a.similarity < cfg.min_similarity:
            a.reason = f"weak retrieval evidence for: {q[:80]}"
            answers.append(a)
            continue
        a.text = await _generate(
            rt,
            new_messages,
            cfg.max_tokens,
            settings.retrieval,
            context_free=rag.context_free(rt, messages) if alpha > 0 else None,
            cad_alpha=alpha,
            slot=slot,
        )
        fields = grounding.finalize(a.text)
        a.sources = fields["sources"]
        a.support = support(a.text, " ".join(s["text"] for s in a.sources))
        if a.support < cfg.min_support:
            a.reason = f"reply not supported by its sources ({a.support:.2f})"
        answers.append(a)
    answered = [a for a in answers if a.text]
    reply = "\n\n".join(a.text for a in answered) or settings.retrieval.abstain_message
    sims = [max(0.0, min(1.0, a.similarity)) for a in answers] or [0.0]
    sups = [a.support for a in answers] or [0.0]
    confidence = round(min(sims) * 0.5 + min(sups) * 0.5, 4)
    reasons = [a.reason for a in answers if a.reason]
    if scope_hits:
        reasons.insert(0, f"out of scope: {', '.join(scope_hits)}")
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
