"""Dev sets built from the held-out Q&A pairs.

Retrieval gold: the chunks that hold the answer, found by how much of the question's and the
reference answer's content (words and word pairs, weighted by rarity in the corpus) a chunk
contains; the best chunk and any within ``tolerance`` of it are gold. Pairs whose best chunk
holds too little (the answer is general knowledge, not the docs), and pairs whose reference
answer says the docs don't cover it, are left out. The labeller
is ``retrieval.questions.AnswerLabeler``, the one that attaches known questions to chunks. A
question with several reference answers gets the gold chunks of all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

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


AUDIT = Path(__file__).resolve().parent / "data" / "nitro_retrieval_audit.yaml"


def question_key(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:10]


def load_audit(path: str | Path = AUDIT) -> dict:
    return yaml.safe_load(Path(path).read_text())


def audited_devset(
    items: list[RetrievalItem], chunks: list[Chunk], audit: dict
) -> list[RetrievalItem]:
    """The dev set after a manual audit (``eval/data/nitro_retrieval_audit.yaml``): questions
    judged unanswerable from the docs are dropped, and chunks of the sections judged to hold an
    answer join its gold. Questions the audit does not name keep their automatic labels."""
    verdicts = audit.get("misses", {})
    out = []
    for it in items:
        v = verdicts.get(question_key(it.question))
        if v is None:
            out.append(it)
            continue
        if v["verdict"] == "unanswerable":
            continue
        sections = {tuple(s) for s in v.get("sections", [])}
        extra = [c for c in chunks if (c.path, c.heading) in sections]
        ids = list(dict.fromkeys([*it.gold_ids, *(c.id for c in extra)]))
        paths = sorted({*it.gold_paths, *(c.path for c in extra)})
        out.append(RetrievalItem(it.question, ids, paths, it.containment))
    return out
