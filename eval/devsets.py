"""Dev sets built from the held-out Q&A pairs.

Retrieval gold: the chunks that hold the answer, found by how much of the question's and the
reference answer's content (words and word pairs, weighted by rarity in the corpus) a chunk
contains; the best chunk and any within ``tolerance`` of it are gold. Pairs whose best chunk
holds too little (the answer is general knowledge, not the docs) are left out. The labeller
is ``retrieval.questions.AnswerLabeler``, the one that attaches known questions to chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from docqa.data import QAPair
from retrieval.chunking import Chunk
from retrieval.questions import AnswerLabeler


@dataclass
class RetrievalItem:
    question: str
    gold_ids: list[str]
    gold_paths: list[str]
    containment: float


class GoldLabeler(AnswerLabeler):
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
    labeler = GoldLabeler(chunks, tolerance, min_containment)
    return [it for it in map(labeler.label, pairs) if it is not None]
