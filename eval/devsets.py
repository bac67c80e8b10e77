"""Dev sets built from the held-out Q&A pairs.

Retrieval gold: the chunks that hold the answer, found by how much of the question's and the
reference answer's content (words and word pairs, weighted by rarity in the corpus) a chunk
contains; the best chunk and any within ``tolerance`` of it are gold. Pairs whose best chunk
holds too little (the answer is general knowledge, not the docs) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docqa.data import QAPair
from retrieval.bm25 import STOPWORDS
from retrieval.chunking import Chunk

_W = re.compile(r"[a-z0-9_]+")


def content_words(text: str) -> list[str]:
    return [w for w in _W.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]


@dataclass
class RetrievalItem:
    question: str
    gold_ids: list[str]
    gold_paths: list[str]
    containment: float


def _grams(words: list[str]) -> set:
    return set(words) | {(a, b) for a, b in zip(words, words[1:])}


def retrieval_devset(
    pairs: list[QAPair], chunks: list[Chunk], tolerance: float = 0.9, min_containment: float = 0.35
) -> list[RetrievalItem]:
    import math
    from collections import Counter

    chunk_grams = [_grams(content_words(c.search_text)) for c in chunks]
    df = Counter(g for cg in chunk_grams for g in cg)
    n = len(chunks)

    def w(g) -> float:
        return math.log((n + 1) / (df.get(g, 0) + 0.5))

    items = []
    for p in pairs:
        g = _grams(content_words(p.question + " " + p.answer))
        g = {x for x in g if df.get(x)}  # only what the corpus can contain
        if not g:
            continue
        total = sum(w(x) for x in g)
        scores = [sum(w(x) for x in g & cg) / total for cg in chunk_grams]
        best = max(scores)
        if best < min_containment:
            continue
        gold = [i for i, s in enumerate(scores) if s >= best * tolerance]
        items.append(
            RetrievalItem(
                p.question,
                [chunks[i].id for i in gold],
                sorted({chunks[i].path for i in gold}),
                best,
            )
        )
    return items
