"""The manual audit of the retrieval dev set.

The dev set itself (``retrieval.questions.retrieval_devset``) labels the held-out Q&A pairs
automatically, with the labeller that attaches known questions to chunks: the chunks holding
most of the question's and the reference answer's content are gold. The audit
(``eval/data/nitro_retrieval_audit.yaml``) corrects those labels where a reviewer judged them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from retrieval.chunking import Chunk
from retrieval.questions import RetrievalItem

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
