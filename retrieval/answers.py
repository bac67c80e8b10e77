"""What the reader's answers are judged by, in the server and in the evaluation alike: the
prompt scaffolding an answer must never echo, and how well an answer is grounded in the
evidence lines it was given (``grounding_score``: used to choose among candidate answers,
``retrieval.answer_candidates``), and which excerpts hold an answer's words (``words_held``: its
sources, ``retrieval.sources``; ``unsupported_names``: what it names that none of them holds)."""

from __future__ import annotations

import re

from docqa.settings import BUILTIN_EXAMPLE_IDS
from retrieval.bm25 import STOPWORDS

# prompt scaffolding an answer must never echo: excerpt labels (old "[1] (path > heading)" and
# current "[1] Heading" lines), the template's section titles, and empty code blocks
_SCAFFOLD = [
    ("excerpt header", re.compile(r"\[\d{1,3}\]\s*\([^)\n]*(?:>|\.mdx?\b)[^)\n]*\)")),
    ("excerpt header", re.compile(r"(?<!\])\((?:[\w.-]+/)*[\w.-]+\.mdx?\s*>[^)\n]*\)")),
    # a line that is only an excerpt label: "[2] Load model" (a short title, no sentence end)
    (
        "excerpt label line",
        re.compile(r"^[^\S\n]*#*[^\S\n]*\[\d{1,3}\](?:[^\S\n]+[\w`'-]+){1,6}[^\S\n]*$", re.M),
    ),
    (
        "template title",
        re.compile(r"(documentation excerpts|most relevant lines|relevant lines)\s*:", re.I),
    ),
    ("question template", re.compile(r"^\s*question\s*:", re.I | re.M)),
    # the built-in worked example's made-up product and option (retrieval.examples)
    (
        "worked example",
        re.compile("|".join(rf"\b{re.escape(n)}\b" for n in BUILTIN_EXAMPLE_IDS), re.I),
    ),
]


_FENCE = re.compile(r"^[^\S\n]*```", re.M)


def code_blocks(
    text: str, final: bool = True, pending: tuple[str, ...] = ()
) -> tuple[list[tuple[int, int]], int | None]:
    """Empty fenced code blocks of ``text``: (start, end) of every closed block holding
    nothing but blank lines and ``#`` comment lines (``"```bash [1]\n```"``, a block holding
    only an excerpt header), and the start of a last block that is still open with nothing
    in it yet (None when there is none). Fences are paired in order (a fence line opens a
    block, the next one closes it), so the closing fence of one block and the opening fence
    of the next are never taken for an empty block between them. Unless ``final`` (the
    whole answer), a closing fence with no line end yet leaves its block open, and so does
    a last line that may still become one of ``pending`` (stop strings: they end the answer
    there)."""
    empty: list[tuple[int, int]] = []
    start: int | None = None
    for m in _FENCE.finditer(text):
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end + 1
        if start is None:
            if "```" in text[m.end() : line_end]:  # "```x```" on one line: inline code
                continue
            start, body_from = m.start(), line_end
            continue
        if not final and not text.endswith("\n", 0, line_end):  # a fence still growing
            break
        body = text[body_from : m.start()]
        if not any(ln.strip() and not ln.strip().startswith("#") for ln in body.split("\n")):
            empty.append((start, line_end))
        start = None
    if start is not None:
        *lines, last = text[body_from:].split("\n")
        # the last line may still be growing: code once it starts with neither "#" (a
        # comment) nor "`" (the closing fence) and is not the start of a stop string
        grown = last.strip()
        if any(ln.strip() and not ln.strip().startswith("#") for ln in lines) or (
            grown and grown[0] not in "#`" and not any(s.strip().startswith(grown) for s in pending)
        ):
            start = None
    return empty, start


def drop_empty_code(
    text: str, final: bool = False, since: int = 0, pending: tuple[str, ...] = ()
) -> tuple[str, int, list[int]]:
    """``text`` without its closed empty code blocks that start at ``since`` or later
    (``code_blocks``; with ``final``, also an open one at its end) -> (text, where the text
    still to be held back starts: an open block with nothing in it yet, or the text's
    length; where each block was taken out, in the returned text)."""
    empty, open_at = code_blocks(text, final, pending)
    if final and open_at is not None:
        empty.append((open_at, len(text)))
        open_at = None
    # a block whose indentation only was sent already: the rest of it goes
    empty = [(max(a, since), b) for a, b in empty if b > since and not text[a:since].strip()]
    for a, b in reversed(empty):
        text = text[:a] + text[b:]
    if open_at is not None:
        open_at -= sum(b - a for a, b in empty if b <= open_at)
    cuts, gone = [], 0
    for a, b in empty:
        cuts.append(a - gone)
        gone += b - a
    return text, len(text) if open_at is None else open_at, cuts


def drop_echo(text: str, labels: list[str], final: bool = False) -> tuple[str, int]:
    """``text`` (an answer's start, nothing sent yet) without a first line that echoes the
    prompt's question line (it starts with one of ``labels``, such as "Question:") and the
    blank lines after it, and any blank line the text starts with -> (text, where the text to
    hold back starts: 0 while the first line may still become such an echo)."""
    lead = text.lstrip()
    for label in labels:
        if not final and len(lead) < len(label) and label.startswith(lead):
            return text, 0  # "Ques": may become the label
        if lead.startswith(label):
            nl = lead.find("\n")
            if nl < 0 and final:  # one line in all: only the label goes
                rest = lead[len(label) :].lstrip()
                return rest, len(rest)
            if nl < 0:
                return text, 0
            rest = lead[nl + 1 :].lstrip("\n")
            return drop_echo(rest, labels, final) if rest else (rest, 0)
    text = text.lstrip("\n")  # blank lines before the answer (after a dropped echo)
    return text, len(text)


def scaffolding(answer: str) -> list[tuple[str, str]]:
    """(kind, matched text) of every piece of prompt scaffolding the answer echoes."""
    found = [(kind, m.group(0)) for kind, rx in _SCAFFOLD for m in rx.finditer(answer)]
    return found + [("empty code block", answer[a:b]) for a, b in code_blocks(answer)[0]]


def strip_scaffolding(answer: str) -> str:
    answer = drop_empty_code(answer, True)[0]
    for _, rx in _SCAFFOLD:
        answer = rx.sub(" ", answer)
    return answer


_WORD = re.compile(r"[\w/.-]{3,}")


def grounding_score(answer: str, evidence: list[str]) -> int:
    """How well ``answer`` keeps to the ``evidence`` lines: its distinct words (3+ characters
    of letters, digits, ``_``, ``/``, ``.``, ``-``; lower-cased) found in them, minus those of
    its identifiers (words with ``_`` or ``/``: parameters, endpoints, paths) found nowhere in
    them, minus 5 for any echoed scaffolding."""
    ev = "\n".join(evidence).lower()
    words = set(_WORD.findall(answer.lower()))
    found = sum(w in ev for w in words)
    invented = sum(w not in ev and ("_" in w or "/" in w) for w in words)
    return found - invented - 5 * bool(scaffolding(answer))


# a citation tag "[n]" (the excerpt's number captured)
CITE = re.compile(r"\[(\d{1,3})\]")


def claims(answer: str, question: str = "") -> set[str]:
    """The answer's own words: its distinct words as ``grounding_score`` reads them (ends'
    dots stripped), not stop words, not the question's words and not citation tags."""
    asked = {w.strip(".") for w in _WORD.findall(question.lower())}
    out = set()
    for w in _WORD.findall(CITE.sub(" ", strip_scaffolding(answer)).lower()):
        w = w.strip(".")
        if len(w) >= 3 and w not in STOPWORDS and w not in asked:
            out.add(w)
    return out


def words_held(answer: str, texts: list[str], question: str = "") -> list[int]:
    """For each of ``texts``, how many of the answer's ``claims`` it holds."""
    words = claims(answer, question)
    lowered = [t.lower() for t in texts]
    return [sum(w in t for w in words) for t in lowered]


_LIST_MARK = re.compile(r"^\s*\d{1,2}[.)]\s", re.M)
_NAMED = re.compile(r"`([^`\n]{1,80})`|[A-Za-z0-9_.:/-]*(?:[_/]|\d)[A-Za-z0-9_.:/-]*")


def named(answer: str) -> list[str]:
    """What an answer names exactly: code spans, identifiers, paths, URLs and numbers
    (citation tags and list numbers left out)."""
    out = []
    for m in _NAMED.finditer(_LIST_MARK.sub(" ", CITE.sub(" ", answer))):
        tok = (m.group(1) or m.group(0)).strip().strip(".,:;-/")
        if tok and tok not in out:
            out.append(tok)
    return out


def unsupported_names(answer: str, text: str) -> list[str]:
    """The names in ``answer`` (``named``) that ``text`` (its evidence lines or sources, with
    the question) does not contain: made up, or taken from elsewhere. A ticket reply naming
    one goes to a human; the evaluation counts the answers that do."""
    low = text.lower()
    return [n for n in named(answer) if n.lower() not in low]
