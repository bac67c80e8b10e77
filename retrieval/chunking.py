"""Heading-aware chunking by model tokens (default 300 tokens, 30 overlap, as published).

Sections (split at Markdown headings, outside code fences) keep their heading trail. Short
neighbouring sections of one file are packed together up to the budget; a section longer than
the budget is cut into token windows that overlap by ``overlap`` tokens. A chunk id is a hash
of path + content, so re-ingesting the same file never duplicates a chunk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from retrieval.loaders import Document

_HEADING_OPEN = re.compile(r"(#{1,6})\s+")


def heading(line: str) -> tuple[int, str] | None:
    """(level, title) of a Markdown ATX heading line ("## Load model ##" -> (2, "Load model")),
    else None. Parsed in linear time: a regex with a lazy title between optional spaces took
    time cubic in a line's spaces (an uploaded line of 10k spaces held ingest for hours)."""
    m = _HEADING_OPEN.match(line)
    if m is None:
        return None
    title = line[m.end() :].rstrip()
    title = title.rstrip("#").rstrip() or title  # a closing run of #s is not the title
    return (len(m.group(1)), title) if title else None


_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Chunk:
    id: str
    path: str
    heading: str
    text: str
    n_tokens: int
    ord: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def search_text(self) -> str:
        """What the retrievers index: heading trail + text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def chunk_id(path: str, heading: str, text: str) -> str:
    """Stable id of what is indexed (``Chunk.search_text``) at ``path``: a renamed heading is
    a new chunk (its vector, BM25 terms, store row and KV cache entry are made again)."""
    return hashlib.sha256(f"{path}\n{heading}\n{text}".encode()).hexdigest()[:16]


@dataclass
class Section:
    trail: list[str]
    text: str


def split_sections(text: str, title: str = "") -> list[Section]:
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []
    in_fence = False

    def trail() -> list[str]:
        t = [h for _, h in stack]
        return t or ([title] if title else [])

    def flush(final: bool = False):
        body = "\n".join(buf).strip()
        only_headings = all(not ln.strip() or heading(ln) for ln in buf)
        if only_headings and not final:
            return  # a bare heading joins the next section instead of becoming a chunk
        if body:
            sections.append(Section(trail(), body))
        buf.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        h = None if in_fence else heading(line)
        if h:
            flush()
            level = h[0]
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append(h)
        buf.append(line)
    flush(final=True)
    return sections


Tokenize = Callable[[str], list[int]]
Detokenize = Callable[[list[int]], str]


def chunk_document(
    doc: Document, tokenize: Tokenize, detokenize: Detokenize, size: int = 300, overlap: int = 30
) -> list[Chunk]:
    if overlap >= size:
        raise ValueError("chunk overlap must be smaller than the chunk size")
    pieces: list[tuple[list[str], str, int]] = []  # (trail, text, n_tokens)
    pack: list[Section] = []
    pack_tokens = 0

    def flush_pack():
        nonlocal pack_tokens
        if pack:
            text = "\n\n".join(s.text for s in pack)
            pieces.append((pack[0].trail, text, len(tokenize(text))))
        pack.clear()
        pack_tokens = 0

    for sec in split_sections(doc.text, doc.title):
        toks = tokenize(sec.text)
        n = len(toks)
        if n > size:
            flush_pack()
            step = size - overlap
            for start in range(0, n, step):
                window = toks[start : start + size]
                pieces.append((sec.trail, detokenize(window).strip(), len(window)))
                if start + size >= n:
                    break
            continue
        if pack and pack_tokens + n + 2 > size:
            flush_pack()
        pack.append(sec)
        pack_tokens += n + 2
    flush_pack()

    chunks: list[Chunk] = []
    seen: set[str] = set()
    for trail, text, n in pieces:
        if not text:
            continue
        if text in seen:  # the same text twice in a document is indexed once
            continue
        seen.add(text)
        heading = " > ".join(trail)
        chunks.append(
            Chunk(chunk_id(doc.path, heading, text), doc.path, heading, text, n, len(chunks))
        )
    return chunks
