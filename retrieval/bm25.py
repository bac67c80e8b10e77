"""Vectorized BM25 (Okapi) whose scores equal rank-bm25's ``BM25Okapi``.

Per-(term, doc) weights are precomputed into CSR-by-term arrays (``term_ptr``, ``doc_ids``,
``weights``), so a query costs O(postings of its terms) in NumPy instead of O(N) in Python.
The arrays are plain ``.npy`` files, loadable with mmap.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

_TOKEN = re.compile(r"[a-z0-9_]+")
STOPWORDS = frozenset(
    """a an and are as at be but by can do does for from has have how i if in into is it its
    me my of on or our so that the their them then there these they this to was we what when
    where which who why will with you your""".split()
)


def content_words(text: str) -> list[str]:
    """Lowercase words without stopwords or single characters (answer/support overlap)."""
    return [w for w in _TOKEN.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


class BM25:
    def __init__(self, vocab: dict[str, int], term_ptr, doc_ids, weights, n_docs: int, params):
        self.vocab = vocab
        self.term_ptr = term_ptr
        self.doc_ids = doc_ids
        self.weights = weights
        self.n_docs = n_docs
        self.params = params

    @classmethod
    def build(
        cls, corpus: list[list[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25
    ) -> BM25:
        n = len(corpus)
        doc_len = np.array([len(d) for d in corpus], dtype=np.float64)
        avgdl = float(doc_len.mean()) if n else 0.0
        df: Counter[str] = Counter()
        tfs = []
        for doc in corpus:
            c = Counter(doc)
            tfs.append(c)
            df.update(c.keys())
        terms = sorted(df)
        vocab = {t: i for i, t in enumerate(terms)}
        # idf exactly as rank_bm25.BM25Okapi._calc_idf
        idf = {}
        idf_sum = 0.0
        negative = []
        for t in terms:
            v = math.log(n - df[t] + 0.5) - math.log(df[t] + 0.5)
            idf[t] = v
            idf_sum += v
            if v < 0:
                negative.append(t)
        eps = epsilon * (idf_sum / len(idf)) if idf else 0.0
        for t in negative:
            idf[t] = eps
        postings: list[list[tuple[int, float]]] = [[] for _ in terms]
        for d, c in enumerate(tfs):
            norm = k1 * (1 - b + b * doc_len[d] / avgdl) if avgdl else k1
            for t, tf in c.items():
                postings[vocab[t]].append((d, idf[t] * tf * (k1 + 1) / (tf + norm)))
        term_ptr = np.zeros(len(terms) + 1, dtype=np.int64)
        for i, p in enumerate(postings):
            term_ptr[i + 1] = term_ptr[i] + len(p)
        doc_ids = np.fromiter(
            (d for p in postings for d, _ in p), dtype=np.int32, count=int(term_ptr[-1])
        )
        weights = np.fromiter(
            (w for p in postings for _, w in p), dtype=np.float64, count=int(term_ptr[-1])
        )
        return cls(vocab, term_ptr, doc_ids, weights, n, {"k1": k1, "b": b, "epsilon": epsilon})

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        out = np.zeros(self.n_docs, dtype=np.float64)
        for t in query_tokens:  # repeated query terms count again, as in rank-bm25
            i = self.vocab.get(t)
            if i is None:
                continue
            s, e = self.term_ptr[i], self.term_ptr[i + 1]
            out[self.doc_ids[s:e]] += self.weights[s:e]
        return out

    def top(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        return self.top_of(self.scores(tokenize(query)), k, allowed)

    @staticmethod
    def top_of(
        sc: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """The ``k`` best positive-scoring docs of a score array (ties: lower doc id first)."""
        if allowed is not None:
            sc = np.where(allowed, sc, 0.0)
        nz = np.flatnonzero(sc > 0)
        if nz.size == 0:
            return []
        k = min(k, nz.size)
        part = nz[np.argpartition(-sc[nz], k - 1)[:k]]
        order = sorted(part.tolist(), key=lambda d: (-sc[d], d))
        return [(d, float(sc[d])) for d in order]

    def save(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "term_ptr.npy", self.term_ptr)
        np.save(d / "doc_ids.npy", self.doc_ids)
        np.save(d / "weights.npy", self.weights)
        (d / "bm25.json").write_text(
            json.dumps({"n_docs": self.n_docs, "params": self.params, "vocab": self.vocab})
        )

    @classmethod
    def load(cls, d: Path, mmap: bool = True) -> BM25:
        mode = "r" if mmap else None
        meta = json.loads((d / "bm25.json").read_text())
        return cls(
            meta["vocab"],
            np.load(d / "term_ptr.npy", mmap_mode=mode),
            np.load(d / "doc_ids.npy", mmap_mode=mode),
            np.load(d / "weights.npy", mmap_mode=mode),
            meta["n_docs"],
            meta["params"],
        )
