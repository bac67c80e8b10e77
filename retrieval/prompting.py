"""The grounded-answer prompt, shared by the server and by retrieval-augmented finetuning,
so the model is trained on exactly the prompt it is served with.

Layout (user turn, from ``retrieval.user_template``): the numbered excerpts, then the evidence
lines (the units of the excerpts that best match the question, each tagged with its excerpt
number: next to the question the 135M model reads them best, docs/benchmarks.md), then the
question. Excerpt labels are plain ``[n]`` with the section title: no file paths or markup a
small model might copy into its answer."""

from __future__ import annotations

from retrieval.chunking import Chunk


def block(i: int, chunk: Chunk, text: str | None = None) -> str:
    title = f" {chunk.heading}" if chunk.heading else ""
    return f"[{i}]{title}\n{chunk.text if text is None else text}"


def evidence_text(text: str) -> str:
    """An evidence unit as the prompt shows it: whitespace collapsed (code kept as written)."""
    return " ".join(text.split()) if "```" not in text else text.strip()


def evidence_tag(n: int) -> str:
    """The tag after an evidence line: its excerpt's number, `` [n]``."""
    return f" [{n}]"


def evidence_lines(evidence: list[tuple[int, str]]) -> str:
    """``(excerpt number, text)`` pairs as the prompt's evidence block: each line is the
    unit's ``evidence_text`` then its ``evidence_tag``, one line each."""
    return "\n".join(evidence_text(text) + evidence_tag(n) for n, text in evidence)


def rag_messages(
    system_prompt: str,
    user_template: str,
    question: str,
    blocks: list[str],
    history: list[dict] | None = None,
    extra_system: list[str] | None = None,
    evidence: str = "",
    examples=(),
):
    """The grounded chat: the system prompt (and the request's own system messages), the worked
    ``examples`` (``PromptExample``: each an earlier user turn in the same template, its lines
    as both excerpts and evidence, and the answer), the conversation so far, the question."""
    ctx = "\n\n".join(blocks) if blocks else "(no excerpts)"
    system = "\n\n".join([system_prompt, *(extra_system or [])])
    user = user_template.format(context=ctx, question=question, evidence=evidence or "(none)")
    shown = []
    for ex in examples:
        turn = user_template.format(context=ex.evidence, question=ex.question, evidence=ex.evidence)
        shown += [{"role": "user", "content": turn}, {"role": "assistant", "content": ex.answer}]
    return [
        {"role": "system", "content": system},
        *shown,
        *(history or []),
        {"role": "user", "content": user},
    ]
