"""The grounded-answer prompt, shared by the server and by retrieval-augmented finetuning,
so the model is trained on exactly the prompt it is served with."""

from __future__ import annotations

from retrieval.chunking import Chunk


def block(i: int, chunk: Chunk) -> str:
    label = f"[{i}] ({chunk.path}" + (f" > {chunk.heading})" if chunk.heading else ")")
    return f"{label}\n{chunk.text}"


def rag_messages(
    system_prompt: str,
    user_template: str,
    question: str,
    blocks: list[str],
    history: list[dict] | None = None,
    extra_system: list[str] | None = None,
):
    ctx = "\n\n".join(blocks) if blocks else "(no excerpts)"
    system = "\n\n".join([system_prompt, *(extra_system or [])])
    return [
        {"role": "system", "content": system},
        *(history or []),
        {"role": "user", "content": user_template.format(context=ctx, question=question)},
    ]
