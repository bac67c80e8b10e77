"""Answer quality: held-out Q&A (F1, ROUGE-L, citation precision), abstain rates, and
grounded facts (exact key facts in the answer, right document among sources)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from eval.metrics import has_facts, rouge_l, scaffolding, token_f1
from retrieval.answers import unsupported_names

DATA = Path(__file__).resolve().parent / "data"
_ABSTAIN = re.compile(
    r"(not (in|covered by) the documentation|documentation does not cover|"
    r"could not find this in the documentation|don't know|do not know)",
    re.I,
)


@dataclass
class FactItem:
    question: str
    facts: list[str]
    doc: str


# The grounded-fact dev sets: "1", the first 34 questions; "2", 66 more written later and
# independently of the first (so that what was tuned on set 1 can be checked on set 2);
# "all", both in that order.
FACT_SETS = {"1": ["grounded_facts.yaml"], "2": ["grounded_facts_2.yaml"]}
FACT_SETS["all"] = FACT_SETS["1"] + FACT_SETS["2"]
DEFAULT_FACT_SET = "all"


def load_facts(path: str | Path = DATA / "grounded_facts.yaml") -> list[FactItem]:
    return [
        FactItem(d["q"], list(d["facts"]), d["doc"]) for d in yaml.safe_load(Path(path).read_text())
    ]


def fact_set(name: str) -> list[FactItem]:
    """The fact questions of the named set (``FACT_SETS``)."""
    if name not in FACT_SETS:
        raise ValueError(f"unknown fact set {name!r}: one of {', '.join(FACT_SETS)}")
    return [it for f in FACT_SETS[name] for it in load_facts(DATA / f)]


def load_offtopic(path: str | Path = DATA / "offtopic.txt") -> list[str]:
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]


def abstained(reply) -> bool:
    """The reply declines: docqa's configured ``retrieval.abstain_message`` (the served one,
    in this process's settings), or a usual way of saying it (any target, curly quotes too)."""
    if reply.error:
        return False
    from docqa.settings import load_settings

    text = reply.text.replace("\u2019", "'")
    own = load_settings().retrieval.abstain_message.replace("\u2019", "'")
    return own.lower() in text.lower() or bool(_ABSTAIN.search(text))


def _ask(target, q: str, max_tokens: int):
    return target.chat(
        [{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0, seed=0
    )


def _unsupported(reply, question: str) -> list[str]:
    """What the answer names (code spans, identifiers, paths, numbers) that none of its
    sources nor the question holds: made up, or taken from an excerpt it does not list
    (``retrieval.answers.unsupported_names``, the check a ticket reply must pass)."""
    text = "\n".join([question] + [s.get("text", "") for s in reply.sources])
    return unsupported_names(reply.text, text)


def run_facts(target, items: list[FactItem], max_tokens: int = 96, progress=True) -> dict:
    rows = []
    for it in tqdm(items, desc=f"facts {target.name}", disable=not progress):
        r = _ask(target, it.question, max_tokens)
        rows.append(
            {
                "question": it.question,
                "facts": it.facts,
                "answer": r.text,
                "correct": (not r.error) and has_facts(r.text, it.facts),
                "doc_in_sources": any(s.get("path") == it.doc for s in r.sources),
                "scaffolding": scaffolding(r.text),
                "unsupported": _unsupported(r, it.question),
                "error": r.error,
            }
        )
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "doc_in_sources": sum(r["doc_in_sources"] for r in rows) / n,
        "unclean": sum(bool(r["scaffolding"]) for r in rows),
        "unsupported": sum(bool(r["unsupported"]) for r in rows),
        "errors": sum(bool(r["error"]) for r in rows),
        "per_question": rows,
    }


def run_qa(
    target, pairs, gold: dict[str, set[str]] | None = None, max_tokens: int = 160, progress=True
) -> dict:
    rows = []
    for p in tqdm(pairs, desc=f"qa {target.name}", disable=not progress):
        r = _ask(target, p.question, max_tokens)
        cited = [s["id"] for s in r.sources if "id" in s]
        g = (gold or {}).get(p.question)
        prec = (sum(c in g for c in cited) / len(cited)) if (g and cited) else None
        rows.append(
            {
                "question": p.question,
                "answer": r.text,
                "f1": token_f1(r.text, p.answer),
                "rouge_l": rouge_l(r.text, p.answer),
                "citation_precision": prec,
                "abstained": abstained(r),
                "scaffolding": scaffolding(r.text),
                "unsupported": _unsupported(r, p.question),
                "error": r.error,
            }
        )
    n = len(rows)
    precs = [r["citation_precision"] for r in rows if r["citation_precision"] is not None]
    return {
        "n": n,
        "f1": sum(r["f1"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "citation_precision": sum(precs) / len(precs) if precs else None,
        "abstain_in_corpus": sum(r["abstained"] for r in rows) / n,
        "unclean": sum(bool(r["scaffolding"]) for r in rows),
        "unsupported": sum(bool(r["unsupported"]) for r in rows),
        "errors": sum(bool(r["error"]) for r in rows),
        "per_question": rows,
    }


def run_abstain(target, questions: list[str], max_tokens: int = 64, progress=True) -> dict:
    rows = []
    for q in tqdm(questions, desc=f"off-topic {target.name}", disable=not progress):
        r = _ask(target, q, max_tokens)
        rows.append({"question": q, "answer": r.text, "abstained": abstained(r), "error": r.error})
    return {
        "n": len(rows),
        "abstain_rate": sum(r["abstained"] for r in rows) / len(rows),
        "per_question": rows,
    }
