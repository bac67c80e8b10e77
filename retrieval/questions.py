"""Question-augmented indexing: Q&A pairs (synthesized from the docs, e.g. by ``docqa train
synth``, or the Nitro CSV) are attached to the chunk that holds their answer. BM25 indexes
each chunk together with its attached questions (doc2query style) and the dense retriever
scores a chunk by the best of its own vector and its questions' vectors (multi-vector), so a
user question phrased like a known question finds its chunk even when it shares few words
with the chunk itself.

A pair is attached to the chunk holding most of the question's and answer's content (words
and word pairs weighted by rarity in the corpus); pairs whose best chunk holds too little
(general knowledge, not the docs), and pairs whose reference answer says the docs don't
cover it, stay unattached. The same labeller gives the retrieval dev set (the held-out pairs)
its gold chunks: the best chunk and any within ``tolerance`` of it (``retrieval_devset``; a
question with several reference answers gets the gold chunks of all of them).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from docqa.data import QAPair
from retrieval.bm25 import content_words
from retrieval.chunking import Chunk

# A reference answer that says the docs don't hold it ("the context does not provide specific
# information about ...", "without further context, it's hard to ...") has no chunk holding
# its answer: such a pair is neither attached nor given gold chunks.
NON_ANSWER = re.compile(
    r"""\b(?:does\s+not|doesn't|do\s+not|don't|did\s+not|didn't)\s+(?:\w+\s+)?
        (?:provide|specify|mention|include|contain|say|state|explain|detail|describe|give)\b
        [^.]*\b(?:information|details|context|explanation|description|mention)\b
    |\b(?:not|isn't|aren't)\s+(?:explicitly\s+)?
        (?:specified|mentioned|provided|stated|described|explained|detailed)\s+in\s+the\s+
        (?:given|provided)?\s*
        (?:context|document|documentation|text|page|content|code|snippet|information|metadata)
    |\bwithout\s+(?:further|more|additional|specific)\s+(?:information|context|details)
    |\b(?:impossible|not\s+possible)\s+to\s+(?:provide|determine|say|know)
    |\bno\s+(?:specific\s+)?(?:information|details|mention)\s+(?:is\s+)?
        (?:provided|given|about|on|regarding)""",
    re.I | re.X,
)


def is_non_answer(answer: str) -> bool:
    """True when the reference answer itself says the documentation does not cover it."""
    return NON_ANSWER.search(answer) is not None


def _grams(words: list[str]) -> set:
    return set(words) | {(a, b) for a, b in zip(words, words[1:])}


@dataclass
class Label:
    chunk_idx: list[int]  # the best chunk first, then any within tolerance of it
    containment: float


class AnswerLabeler:
    """Corpus statistics computed once; ``label`` finds the chunks that hold one pair's answer."""

    def __init__(self, chunks: list[Chunk], tolerance: float = 0.9, min_containment: float = 0.35):
        self.chunks = chunks
        self.tolerance = tolerance
        self.min_containment = min_containment
        self.chunk_grams = [_grams(content_words(c.search_text)) for c in chunks]
        self.df = Counter(g for cg in self.chunk_grams for g in cg)

    def _w(self, g) -> float:
        return math.log((len(self.chunks) + 1) / (self.df.get(g, 0) + 0.5))

    def label(self, question: str, answer: str) -> Label | None:
        if is_non_answer(answer):
            return None
        g = _grams(content_words(question + " " + answer))
        g = {x for x in g if self.df.get(x)}  # only what the corpus can contain
        if not g:
            return None
        # fsum: exactly rounded whatever the set's iteration order (which changes with the
        # process's hash seed), so near-ties resolve the same way in every run
        total = math.fsum(self._w(x) for x in g)
        scores = [math.fsum(self._w(x) for x in g & cg) / total for cg in self.chunk_grams]
        best = max(scores)
        if best < self.min_containment:
            return None
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return Label([i for i in order if scores[i] >= best * self.tolerance], best)


@dataclass
class RetrievalItem:
    """A dev-set question and the chunks that hold its answer."""

    question: str
    gold_ids: list[str]
    gold_paths: list[str]
    containment: float


class GoldLabeler(AnswerLabeler):
    """``AnswerLabeler`` over Q&A pairs, giving ``RetrievalItem``s."""

    def label(self, p: QAPair) -> RetrievalItem | None:  # type: ignore[override]
        got = super().label(p.question, p.answer)
        if got is None:
            return None
        gold = sorted(got.chunk_idx)
        return RetrievalItem(
            p.question,
            [self.chunks[i].id for i in gold],
            sorted({self.chunks[i].path for i in gold}),
            got.containment,
        )


def retrieval_devset(
    pairs: list[QAPair], chunks: list[Chunk], tolerance: float = 0.9, min_containment: float = 0.35
) -> list[RetrievalItem]:
    """One item per distinct question. A question with several reference answers (pairs
    generated from different chunks, kept by ``load_qa(..., duplicates=True)``) has the union
    of their gold chunks: any chunk holding one of its answers answers it."""
    labeler = GoldLabeler(chunks, tolerance, min_containment)
    by_q: dict[str, list[RetrievalItem]] = {}
    for it in map(labeler.label, pairs):
        if it is not None:
            by_q.setdefault(it.question, []).append(it)
    return [
        RetrievalItem(
            q,
            list(dict.fromkeys(g for it in its for g in it.gold_ids)),
            sorted({p for it in its for p in it.gold_paths}),
            max(it.containment for it in its),
        )
        for q, its in by_q.items()
    ]


@dataclass
class Questions:
    """The pool of Q&A pairs and where each is attached (``chunk_id`` None = unattached).
    ``embeddings`` has one L2-normalized row per pair, attached or not, so re-attaching after
    the docs change embeds nothing."""

    rows: list[dict]  # {"question", "answer", "chunk_id"}
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_attached(self) -> int:
        return sum(r["chunk_id"] is not None for r in self.rows)

    def by_chunk(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.rows:
            if r["chunk_id"] is not None:
                out.setdefault(r["chunk_id"], []).append(r["question"])
        return out

    def reattach(self, chunks: list[Chunk]) -> Questions:
        """Attach the same pool to a new chunk list (after ingest/delete)."""
        lab = AnswerLabeler(chunks) if chunks else None
        rows = []
        for r in self.rows:
            got = lab.label(r["question"], r["answer"]) if lab else None
            rows.append({**r, "chunk_id": chunks[got.chunk_idx[0]].id if got else None})
        return Questions(rows, self.embeddings)


def attach_questions(pairs, chunks: list[Chunk], embedder, progress: bool = False) -> Questions:
    """``pairs``: objects with ``question`` and ``answer``; a question given with several
    answers (``load_qa(..., duplicates=True)``) is attached to each answer's chunk."""
    seen: set[tuple[str, str]] = set()
    pool = []
    for p in pairs:  # a question with several answers is attached once per answer's chunk
        if (p.question, p.answer) not in seen:
            seen.add((p.question, p.answer))
            pool.append({"question": p.question, "answer": p.answer, "chunk_id": None})
    vecs = (
        embedder.embed([r["question"] for r in pool], progress=progress)
        if pool
        else np.zeros((0, embedder.dim), dtype=np.float32)
    )
    return Questions(pool, vecs).reattach(chunks)
