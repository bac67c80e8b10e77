"""Answer and retrieval metrics, and round statistics."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

# what counts as echoed scaffolding is the reader's (the server avoids it when it chooses
# among candidate answers): one definition for both
from retrieval.answers import scaffolding, strip_scaffolding  # noqa: F401

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    t = text.lower()
    t = _PUNCT.sub(" ", t)
    t = _ARTICLES.sub(" ", t)
    return t.split()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (beta = 1) on normalized tokens."""
    p, r = normalize(pred), normalize(ref)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def has_facts(answer: str, facts: list[str]) -> bool:
    """Every fact in the answer (case-insensitive), not counting echoed scaffolding: a fact
    found only inside a pasted excerpt header does not count."""
    a = strip_scaffolding(answer).lower()
    return all(f.lower() in a for f in facts)


def recall_at_k(ranked: list[str], gold: set[str], k: int) -> float:
    return float(bool(set(ranked[:k]) & gold))


def reciprocal_rank(ranked: list[str], gold: set[str]) -> float:
    for i, x in enumerate(ranked, 1):
        if x in gold:
            return 1.0 / i
    return 0.0


@dataclass
class Summary:
    mean: float
    std: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def summarize(values: list[float]) -> Summary:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return Summary(float(v.mean()), std, float(v.min()), float(v.max()), int(v.size))


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test (unequal variances) between two systems' per-round accuracies."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"t": float("nan"), "p": float("nan"), "df": float("nan")}
    res = stats.ttest_ind(a, b, equal_var=False)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else np.nan
    return {"t": float(res.statistic), "p": float(res.pvalue), "df": float(df)}


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of two systems' per-question correctness on the same questions:
    ``only_a``/``only_b`` count the discordant questions; ``p`` is the two-sided binomial
    probability of a split at least this uneven if neither system were better."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired results of different lengths")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(min(1.0, 2 * stats.binom.cdf(min(only_a, only_b), n, 0.5)))
    return {"n": len(a), "only_a": only_a, "only_b": only_b, "p": p}
