"""Training data: the train split of the Q&A pairs, turned into chat examples. With
``rag`` on (retrieval-augmented finetuning) each question gets the chunks docqa's retriever
returns for it, the gold chunk placed among distractors (and sometimes missing), in exactly
the prompt the server uses. Never multiple-choice formatted data."""

from __future__ import annotations

import random
import re
from pathlib import Path

from docqa.data import DEFAULT_QA, QAPair, load_qa, split_qa

_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def train_pairs(csv: str | None = None, limit: int | None = None, seed: int = 0) -> list[QAPair]:
    train, _ = split_qa(load_qa(csv or DEFAULT_QA))
    if limit:
        train = random.Random(seed).sample(train, min(limit, len(train)))
    return train


def extractive_answer(chunk_text: str, reference: str, max_sents: int = 2) -> str:
    """The gold chunk's sentences that best cover the reference answer, verbatim, in order:
    teaches the model to copy exact names, values and commands from its context."""
    from retrieval.bm25 import content_words

    ref = set(content_words(reference))
    sents = [s.strip() for s in _SENT.split(chunk_text) if len(s.strip()) > 20]
    if not sents or not ref:
        return reference
    scored = sorted(range(len(sents)), key=lambda i: -len(ref & set(content_words(sents[i]))))
    keep = sorted(scored[:max_sents])
    return " ".join(sents[i] for i in keep)


class RagExamples:
    """Builds RAFT-style prompts with the server's own template and a retriever."""

    def __init__(self, index_dir: str | Path | None = None):
        from docqa.settings import Settings
        from retrieval.embedder import Embedder
        from retrieval.index import load_index
        from retrieval.search import Retriever

        if index_dir is None:
            from eval.resources import nitro_index

            index_dir = nitro_index()
        self.index = load_index(index_dir)
        self.retriever = Retriever(self.index, Embedder())
        from eval.devsets import GoldLabeler

        self.labeler = GoldLabeler(self.index.chunks)  # corpus statistics once, not per pair
        self.settings = Settings().retrieval

    def example(
        self, pair: QAPair, k: int, p_missing: float, target: str, rng: random.Random
    ) -> dict:
        from retrieval.prompting import block, rag_messages

        item = self.labeler.label(pair)
        gold_ids = set(item.gold_ids) if item else set()
        hits = [h.chunk for h in self.retriever.search(pair.question, k + 3).hits]
        gold = next((c for c in self.index.chunks if c.id in gold_ids), None)
        ctx = [c for c in hits if c.id not in gold_ids][: k - 1]
        missing = gold is None or rng.random() < p_missing
        if not missing:
            ctx.insert(rng.randrange(len(ctx) + 1), gold)
        else:
            ctx = hits[:k] if gold is None else [c for c in hits if c.id not in gold_ids][:k]
        msgs = rag_messages(
            self.settings.system_prompt,
            self.settings.user_template,
            pair.question,
            [block(i, c) for i, c in enumerate(ctx, 1)],
        )
        if missing:
            answer = pair.answer  # RAFT: still answer, from what the model has learned
        else:
            n = ctx.index(gold) + 1
            body = (
                extractive_answer(gold.text, pair.answer) if target == "extractive" else pair.answer
            )
            answer = f"{body} [{n}]"
        return {
            "prompt": msgs,
            "completion": [{"role": "assistant", "content": answer}],
            "gold_in_context": not missing,
        }


def sft_examples(
    pairs: list[QAPair],
    *,
    rag: bool,
    k: int = 3,
    p_missing: float = 0.15,
    target: str = "reference",
    seed: int = 0,
    index_dir=None,
) -> list[dict]:
    rng = random.Random(seed)
    if not rag:
        return [
            {
                "prompt": [{"role": "user", "content": p.question}],
                "completion": [{"role": "assistant", "content": p.answer}],
            }
            for p in pairs
        ]
    builder = RagExamples(index_dir)
    return [builder.example(p, k, p_missing, target, rng) for p in pairs]
