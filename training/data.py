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


_WORD = re.compile(r"`[^`\n]{1,80}`|'[^'\s]{2,60}'|\"[^\"\s]{2,60}\"|\S+")
_STRIP = "`'\".,;:!?()[]{}<>"
_CODE = re.compile(r"^[\w./:$@=-]+$")


def _is_code(w: str, quoted: bool) -> bool:
    if quoted:
        return True
    if not _CODE.match(w) or w.isupper():
        return False  # prose punctuation, or an acronym (API, GPU)
    inner = w[1:-1]
    return (
        any(c.isdigit() for c in w)
        or any(c in "_/.=" for c in inner)
        or w.startswith("-")  # a command-line flag
        or (w[0].islower() and any(c.isupper() for c in inner))  # camelCase
    )


def identifiers(reference: str, chunk_text: str) -> list[str]:
    """Names, values, paths and commands of the reference answer that the chunk holds verbatim:
    quoted or back-ticked spans, flags, and words with a digit, ``_``, ``/`` or ``.`` inside or
    in camelCase (``ctx_len``, ``/v1/embeddings``, ``3928``, ``-H``, ``baseURL``)."""
    out: list[str] = []
    for m in _WORD.finditer(reference):
        w = m.group(0)
        quoted = len(w) > 2 and w[0] in "`'\"" and w[-1] == w[0]
        w = w.strip(_STRIP)
        if len(w) >= 2 and w not in out and _is_code(w, quoted) and w in chunk_text:
            out.append(w)
    return out


def grounded_answer(chunk_text: str, reference: str) -> str | None:
    """One short sentence that states the exact names/values from the gold chunk: the reference
    sentence (of five words or more) naming most of its identifiers, not one ending in ':', with
    them back-ticked. None when the reference names nothing the chunk holds verbatim."""
    idents = identifiers(reference, chunk_text)
    if not idents:
        return None
    sents = [s.strip() for s in _SENT.split(reference) if s.strip()]
    sent = max(
        sents,
        key=lambda s: (
            any(i in s for i in idents),
            len(s.split()) >= 5,
            sum(i in s for i in idents),
            not s.endswith(":"),
        ),
    )
    for i in sorted(idents, key=len, reverse=True):
        if f"`{i}" not in sent and f"{i}`" not in sent:
            pat = rf"(?<![`\w]){re.escape(i)}(?![`\w])"
            sent = re.sub(pat, lambda m: f"`{m.group(0)}`", sent, count=1)
    return re.sub(r"['\"]`([^`]+)`['\"]", lambda m: f"`{m.group(1)}`", sent)


class RagExamples:
    """Builds RAFT-style prompts with the server's own template and a retriever."""

    def __init__(self, index_dir: str | Path | None = None, settings=None):
        from docqa.settings import load_settings
        from retrieval.factory import build_retriever
        from retrieval.index import load_index

        if index_dir is None:
            from retrieval.corpus import nitro_index

            index_dir = nitro_index()
        settings = settings or load_settings()
        self.index = load_index(index_dir)
        # the server's own retriever: same factory, same settings, same hits
        self.retriever = build_retriever(self.index, settings)
        from retrieval.questions import GoldLabeler

        self.labeler = GoldLabeler(self.index.chunks)  # corpus statistics once, not per pair
        self.settings = settings.retrieval

    def retrieve(self, question: str, n: int) -> list:
        """The ``n`` chunks the server would retrieve for ``question`` (same factory, same
        settings): the candidates a training prompt's excerpts come from."""
        return [h.chunk for h in self.retriever.search(question, n).hits]

    def example(
        self, pair: QAPair, k: int, p_missing: float, target: str, rng: random.Random
    ) -> dict | None:
        """One RAFT example, or None when ``target`` is "grounded" and the reference names no
        identifier its gold chunk holds (such pairs teach paraphrase, not grounding)."""
        from retrieval.evidence import for_reader
        from retrieval.prompting import (
            block,
            evidence_lines,
            evidence_tag,
            evidence_text,
            rag_messages,
        )

        item = self.labeler.label(pair)
        gold_ids = set(item.gold_ids) if item else set()
        hits = self.retrieve(pair.question, k + 3)
        gold = next((c for c in self.index.chunks if c.id in gold_ids), None)
        ctx = [c for c in hits if c.id not in gold_ids][: k - 1]
        missing = gold is None or rng.random() < p_missing
        if not missing:
            ctx.insert(rng.randrange(len(ctx) + 1), gold)
        else:
            ctx = hits[:k] if gold is None else [c for c in hits if c.id not in gold_ids][:k]
        texts = [c.text for c in ctx]
        # the evidence lines exactly as the server picks them
        ev = for_reader(pair.question, texts, self.retriever.idf, self.settings.evidence_units)
        shown = [block(i, c) for i, c in enumerate(ctx, 1)] if self.settings.shows_excerpts else []
        msgs = rag_messages(
            self.settings.system_prompt,
            self.settings.user_template,
            pair.question,
            shown,
            evidence=evidence_lines([(e.chunk + 1, e.text) for e in ev]),
            examples=self.settings.examples,
        )
        short = grounded_answer(gold.text, pair.answer) if gold is not None else None
        if target == "grounded" and short is None:
            return None
        if not missing and not self.settings.shows_excerpts:
            # the evidence layout: the model reads the lines, not the gold excerpt; an answer
            # naming what no line shows would teach it to invent, so the gold counts as
            # missing unless the lines hold every identifier the answer names
            seen = " ".join(e.text for e in ev if ctx[e.chunk] is gold)
            if not all(i in seen for i in identifiers(short or pair.answer, gold.text)):
                if target == "grounded":
                    return None
                missing = True
        if missing:
            # RAFT: the gold is gone; still answer from what the model has learned
            answer = short or pair.answer
        else:
            n = ctx.index(gold) + 1
            if target == "grounded":
                body = short
            elif target == "extractive":
                body = extractive_answer(gold.text, pair.answer)
            else:
                body = pair.answer
            answer = f"{body} [{n}]"
        return {
            "prompt": msgs,
            "completion": [{"role": "assistant", "content": answer}],
            "gold_in_context": not missing,
            # the lines as the server's unit KV plan cuts them (training.blocks)
            "evidence": [[evidence_text(e.text), evidence_tag(e.chunk + 1)] for e in ev],
        }


def recitations(index_dir=None) -> list[dict]:
    """One closed-book example per chunk of the index (default: the Nitro docs index the server
    builds): asked what a page's section says, the model answers with the section's text. The
    question names the page and the heading trail, as a user would ("What does
    features/embed.md say about Embedding > Enable?")."""
    from retrieval.index import load_index

    if index_dir is None:
        from retrieval.corpus import nitro_index

        index_dir = nitro_index()
    out = []
    for c in load_index(index_dir).chunks:
        where = f"{c.path} say about {c.heading}" if c.heading else f"the page {c.path} say"
        out.append(
            {
                "prompt": [{"role": "user", "content": f"What does {where}?"}],
                "completion": [{"role": "assistant", "content": c.text.strip()}],
            }
        )
    return out


def sft_examples(
    pairs: list[QAPair],
    *,
    rag: bool,
    k: int = 3,
    p_missing: float = 0.15,
    target: str = "reference",
    seed: int = 0,
    index_dir=None,
    limit: int | None = None,
    require_identifiers: bool = False,
    recite_docs: int = 0,
    qa_pairs: bool = True,
) -> list[dict]:
    """Chat examples for SFT, at most ``limit`` of them (pairs that yield no example under the
    "grounded" target are skipped, so pass more pairs than ``limit``). Closed-book (``rag``
    off) with ``require_identifiers``: only the pairs whose answer names an identifier; with
    ``recite_docs``: also every chunk of the index that many times (``recitations``), shuffled
    in among the pairs (without the pairs when ``qa_pairs`` is off)."""
    rng = random.Random(seed)
    if not rag:
        pairs = pairs if qa_pairs else []
        if require_identifiers:
            pairs = [p for p in pairs if identifiers(p.answer, p.answer)]
        pairs = pairs[:limit] if limit else pairs
        out = [
            {
                "prompt": [{"role": "user", "content": p.question}],
                "completion": [{"role": "assistant", "content": p.answer}],
            }
            for p in pairs
        ]
        if recite_docs:
            out += recitations(index_dir) * recite_docs
            rng.shuffle(out)
        return out
    builder = RagExamples(index_dir)
    out = []
    for p in pairs:
        if limit and len(out) >= limit:
            break
        e = builder.example(p, k, p_missing, target, rng)
        if e is not None:
            out.append(e)
    return out
