"""Dev sets built from the held-out Q&A pairs.

Retrieval gold: the chunks that hold the answer, found by how much of the question's and the
reference answer's content (words and word pairs, weighted by rarity in the corpus) a chunk
contains; the best chunk and any within ``tolerance`` of it are gold. Pairs whose best chunk
holds too little (the answer is general knowledge, not the docs) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from docqa.data import QAPair
from retrieval.bm25 import content_words
from retrieval.chunking import Chunk


@dataclass
class RetrievalItem:
    question: str
    gold_ids: list[str]
    gold_paths: list[str]
    containment: float


def _grams(words: list[str]) -> set:
    return set(words) | {(a, b) for a, b in zip(words, words[1:])}


class GoldLabeler:
    """Corpus statistics computed once; ``label`` finds the gold chunks of one pair."""

    def __init__(self, chunks: list[Chunk], tolerance: float = 0.9, min_containment: float = 0.35):
        from collections import Counter

        self.chunks = chunks
        self.tolerance = tolerance
        self.min_containment = min_containment
        self.chunk_grams = [_grams(content_words(c.search_text)) for c in chunks]
        self.df = Counter(g for cg in self.chunk_grams for g in cg)

    def _w(self, g) -> float:
        import math

        return math.log((len(self.chunks) + 1) / (self.df.get(g, 0) + 0.5))

    def label(self, p: QAPair) -> RetrievalItem | None:
        g = _grams(content_words(p.question + " " + p.answer))
        g = {x for x in g if self.df.get(x)}  # only what the corpus can contain
        if not g:
            return None
        total = sum(self._w(x) for x in g)
        scores = [sum(self._w(x) for x in g & cg) / total for cg in self.chunk_grams]
        best = max(scores)
        if best < self.min_containment:
            return None
        gold = [i for i, s in enumerate(scores) if s >= best * self.tolerance]
        return RetrievalItem(
            p.question,
            [self.chunks[i].id for i in gold],
            sorted({self.chunks[i].path for i in gold}),
            best,
        )


def retrieval_devset(
    pairs: list[QAPair], chunks: list[Chunk], tolerance: float = 0.9, min_containment: float = 0.35
) -> list[RetrievalItem]:
    labeler = GoldLabeler(chunks, tolerance, min_containment)
    return [it for it in map(labeler.label, pairs) if it is not None]
