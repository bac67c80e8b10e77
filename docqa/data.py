"""Shared data helpers: the Q&A pairs and the deterministic held-out split.

The split is a pure function of the question text (a hash), so training and evaluation agree
on it without sharing state, and adding pairs never moves an existing pair across the line.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QA = (
    Path(__file__).resolve().parents[1].parent / "shared/data/nitro-qa/training_qa_pairs.csv"
)
DEFAULT_DOCS = Path(__file__).resolve().parents[1].parent / "shared/data/nitro-docs"
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


def load_qa(path: str | Path = DEFAULT_QA, duplicates: bool = False) -> list[QAPair]:
    """Q&A pairs from a CSV (``question,answer``) or a JSONL of such objects (synth output).

    A question asked of several chunks ("What is Nitro?" has 30 answers in the Nitro CSV)
    keeps its first answer only, unless ``duplicates``: then every distinct (question, answer)
    pair is kept (retrieval uses them all: each answer's chunk answers the question)."""
    with open(path, newline="", encoding="utf-8") as f:
        if str(path).endswith((".jsonl", ".json")):
            import json

            rows = [json.loads(x) for x in f if x.strip()]
        else:
            rows = csv.DictReader(f)
        out, seen = [], set()
        for r in rows:
            q, a = (r.get("question") or "").strip(), (r.get("answer") or "").strip()
            key = (q, a) if duplicates else q
            if q and a and key not in seen:
                seen.add(key)
                out.append(QAPair(q, a))
    return out


def is_heldout(question: str, percent: int = HELDOUT_PERCENT) -> bool:
    h = int(hashlib.sha256(" ".join(question.lower().split()).encode()).hexdigest()[:8], 16)
    return h % 100 < percent


_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def question_key(question: str) -> str:
    """A question as wording twins share it: lowercase, no punctuation or quote marks, no
    articles ("What is the role of the '-H' flag?" ~ "What is role of -H flag")."""
    t = _PUNCT.sub(" ", question.lower().replace("\u2019", "'"))
    return " ".join(_ARTICLES.sub(" ", t).split())


def split_qa(pairs: list[QAPair], percent: int = HELDOUT_PERCENT):
    """-> (train, heldout). Never train on the held-out part: a train question that is a
    held-out one in other punctuation, quotes or articles (the hash split sends such twins
    either way: 14 of the Nitro pairs) is left out of train as well."""
    held = [p for p in pairs if is_heldout(p.question, percent)]
    twins = {question_key(p.question) for p in held}
    train = [
        p
        for p in pairs
        if not is_heldout(p.question, percent) and question_key(p.question) not in twins
    ]
    return train, held
