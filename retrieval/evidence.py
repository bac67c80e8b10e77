"""Evidence selection: the lines of retrieved chunks that answer a question.

A chunk is cut into units a reader can quote: a prose sentence, a list item, a table row (read
with its header), a fenced code block. Each unit is scored against the question by the
corpus IDF of the content words (lightly stemmed) they share, with a bonus for shared word
pairs; the best units become ``Evidence`` with offsets into the chunk text, so a client can
highlight them, and the prompt puts them first for the model to read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from retrieval.bm25 import STOPWORDS

_IDENT = re.compile(r"[A-Za-z0-9_]+")
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(\[])")
_FENCE = re.compile(r"^\s*(```|~~~)")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}")
# question words that say what kind of answer is wanted, not what it is about
_QUESTION_NOISE = frozenset(
    """which what how does do is are can could should would where when who why nitro please
    tell explain use using used""".split()
)


@dataclass
class Unit:
    start: int
    end: int
    kind: str  # "sentence" | "item" | "row" | "code" | "heading"
    context: str = ""  # for a table row: its header row


@dataclass
class Evidence:
    chunk: int  # position of the chunk among the retrieved hits (0-based)
    start: int
    end: int
    text: str
    score: float
    kind: str
    context: str = ""

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end}


def stem(w: str) -> str:
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def terms(text: str) -> list[str]:
    """Content words, stemmed; an identifier also gives its parts (``llama_log_folder`` ->
    ``llama``, ``log``, ``folder``; ``modelStatus`` -> ``model``, ``status``)."""
    out = []
    for raw in _IDENT.findall(text):
        for w in [raw, *_parts_of(raw)]:
            w = w.lower()
            if w not in STOPWORDS and len(w) > 1:
                out.append(stem(w))
    return out


def _parts_of(raw: str) -> list[str]:
    parts = [p for p in re.split(r"_|(?<=[a-z])(?=[A-Z])", raw) if p]
    return parts if len(parts) > 1 else []


def units(text: str) -> list[Unit]:
    """Quotable units of a chunk, with character offsets into ``text``."""
    out: list[Unit] = []
    pos = 0
    lines = text.splitlines(keepends=True)
    i = 0
    header = ""
    while i < len(lines):
        line = lines[i]
        start, stripped = pos, line.strip()
        if _FENCE.match(line):  # a fenced block is one unit, fences included
            j = i + 1
            end = pos + len(line)
            while j < len(lines):
                end += len(lines[j])
                if _FENCE.match(lines[j]):
                    break
                j += 1
            block = text[start:end].rstrip()
            out.append(Unit(start, start + len(block), "code"))
            pos = end
            i = j + 1
            continue
        pos += len(line)
        i += 1
        if not stripped:
            header = ""
            continue
        lead = len(line) - len(line.lstrip())
        s0, s1 = start + lead, start + lead + len(stripped)
        if stripped.startswith("|"):
            if _TABLE_SEP.match(stripped):
                continue
            nxt = lines[i].strip() if i < len(lines) else ""
            if not header and _TABLE_SEP.match(nxt):
                header = stripped
                continue
            out.append(Unit(s0, s1, "row", header))
            continue
        header = ""
        if stripped.startswith("#"):
            out.append(Unit(s0, s1, "heading"))
            continue
        kind = "item" if re.match(r"([-*+]|\d+[.)])\s", stripped) else "sentence"
        cut = s0
        for m in _SENT_END.finditer(text, s0, s1):
            out.append(Unit(cut, m.start(), kind))
            cut = m.end()
        out.append(Unit(cut, s1, kind))
    out = [u for u in out if text[u.start : u.end].strip()]
    # a sentence introducing a code block or a list ("To check the server is running:")
    # reads with what it introduces (a code block, or up to four list items)
    merged: list[Unit] = []
    intro: Unit | None = None
    n_items = 0
    for u in out:
        gap = not text[merged[-1].end : u.start].strip() if merged else False
        if (
            intro is not None
            and gap
            and n_items < 4
            and ((u.kind == "code" and n_items == 0) or u.kind == "item")
        ):
            merged[-1] = Unit(merged[-1].start, u.end, u.kind, text[intro.start : intro.end])
            n_items = n_items + 1 if u.kind == "item" else 4
            continue
        merged.append(u)
        ends_colon = text[u.start : u.end].rstrip().endswith(":")
        intro = u if (u.kind in ("sentence", "item") and ends_colon) else None
        n_items = 0
    return merged


def _pairs(ws: list[str]) -> set[tuple[str, str]]:
    return set(zip(ws, ws[1:]))


# what a question asks for, and what a unit holding such an answer looks like
_WANTS = [
    (re.compile(r"\b(endpoint|url|route|path)\b", re.I), re.compile(r"/[A-Za-z_]\w*(/\w+)*")),
    (
        re.compile(r"\b(parameter|field|setting|option|flag|argument|key)s?\b", re.I),
        re.compile(r"`[^`]+`|\b[a-z]+_[a-z_]+\b|--?[a-z][\w-]+"),
    ),
    (
        re.compile(r"\b(port|how (many|large|big|much)|number|size|default)\b", re.I),
        re.compile(r"\d"),
    ),
    (re.compile(r"\b(command|run|install|start)\b", re.I), re.compile(r"```|`[^`]+`")),
]


def answer_shapes(question: str) -> list[re.Pattern]:
    return [shape for asks, shape in _WANTS if asks.search(question)]


def score_unit(q_terms: list[str], text: str, idf: Callable[[str], float], shapes=()) -> float:
    u_terms = terms(text)
    if not u_terms:
        return 0.0
    shared = set(q_terms) & set(u_terms)
    s = sum(idf(w) for w in shared)
    s += 0.5 * sum(idf(a) + idf(b) for a, b in _pairs(q_terms) & _pairs(u_terms))
    if s > 0 and any(shape.search(text) for shape in shapes):
        s *= 1.5  # it holds the kind of thing asked for (a path, a name, a number)
    return s / (1.0 + 0.02 * max(0, len(u_terms) - 25))  # long units dilute the evidence


def select(
    question: str,
    chunk_texts: list[str],
    idf: Callable[[str], float],
    max_units: int = 3,
    min_share: float = 0.34,
) -> list[Evidence]:
    """The best ``max_units`` units over the chunks, best first; a unit scoring under
    ``min_share`` of the best one is left out."""
    q_terms = [w for w in terms(question) if w not in _QUESTION_NOISE]
    if not q_terms:
        return []
    shapes = answer_shapes(question)
    cands: list[Evidence] = []
    for ci, text in enumerate(chunk_texts):
        for u in units(text):
            if u.kind == "heading":
                continue
            body = text[u.start : u.end]
            s = score_unit(q_terms, body + " " + u.context, idf, shapes)
            s -= 0.01 * ci  # on a tie, the better-ranked chunk
            if s > 0:
                cands.append(Evidence(ci, u.start, u.end, body, s, u.kind, u.context))
    cands.sort(key=lambda e: -e.score)
    if not cands:
        return []
    best = cands[0].score
    return [e for e in cands[:max_units] if e.score >= min_share * best]


def for_reader(
    question: str, chunk_texts: list[str], idf: Callable[[str], float], max_units: int
) -> list[Evidence]:
    """The evidence lines a grounded prompt shows: ``select``'s, or, when no unit shares a
    content word with the question, the first units of the best-ranked chunk (a prompt made of
    evidence lines alone must never be empty)."""
    ev = select(question, chunk_texts, idf, max_units) if max_units else []
    if ev or not max_units or not chunk_texts:
        return ev
    text = chunk_texts[0]
    lead = [u for u in units(text) if u.kind != "heading"][:max_units]
    return [
        Evidence(0, u.start, u.end, text[u.start : u.end], 0.0, u.kind, u.context) for u in lead
    ]


def coverage(question: str, evidence: list[Evidence], idf: Callable[[str], float]) -> float:
    """How much of ``question`` the ``evidence`` lines speak to: the IDF-weighted share of its
    content terms (question words such as "which", "how" left out) found in the lines or their
    table headers. 0 when the question has no content term."""
    q_terms = {w for w in terms(question) if w not in _QUESTION_NOISE}
    total = sum(idf(w) for w in q_terms)
    if not total:
        return 0.0
    found: set[str] = set()
    for e in evidence:
        found |= set(terms(e.text + " " + e.context))
    return sum(idf(w) for w in q_terms & found) / total


def idf_from_bm25(bm25) -> Callable[[str], float]:
    """IDF of a (stemmed) term from an index's BM25 postings; unknown terms count as rare."""
    n = max(1, bm25.n_docs)
    df: dict[str, int] = {}
    ptr = bm25.term_ptr
    for term, i in bm25.vocab.items():
        k = stem(term)
        df[k] = max(df.get(k, 0), int(ptr[i + 1] - ptr[i]))

    def idf(w: str) -> float:
        return math.log(1 + (n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5))

    return idf
