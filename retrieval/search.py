"""Hybrid search: BM25 + FAISS dense, merged on stable chunk ids by weighted score fusion or
reciprocal rank fusion, optionally reranked by a local cross-encoder (retrieval.reranker: the
top ``rerank_candidates`` fused candidates, before the ``top_k`` cut). When the index carries
attached questions, a chunk's dense score is the best of its own vector and its questions'."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faiss
import numpy as np

from retrieval.bm25 import tokenize
from retrieval.chunking import Chunk
from retrieval.index import Index, check_embedder

if TYPE_CHECKING:
    from docqa.settings import RetrievalSettings

log = logging.getLogger(__name__)
MODES = ("hybrid", "bm25", "dense")


@dataclass(frozen=True)
class SearchConfig:
    """How a retriever searches: built once from ``RetrievalSettings`` (the one source of truth)
    and handed to the ``Retriever``; ``search()`` takes only per-request overrides."""

    top_k: int
    candidates: int
    fusion: str
    rrf_k: int
    bm25_weight: float
    dense_weight: float
    question_dense_weight: float
    mode: str
    faiss_index: str
    rerank_candidates: int = 10

    @classmethod
    def from_settings(cls, r: RetrievalSettings) -> SearchConfig:
        return cls(
            top_k=r.top_k,
            candidates=r.candidates,
            fusion=r.fusion,
            rrf_k=r.rrf_k,
            bm25_weight=r.bm25_weight,
            dense_weight=r.dense_weight,
            question_dense_weight=r.question_dense_weight,
            mode=r.mode,
            faiss_index=r.faiss_index,
            rerank_candidates=r.rerank_candidates,
        )

    def weights(self, has_questions: bool) -> tuple[float, float]:
        """(BM25, dense) fusion weights for an index with or without attached questions."""
        dense = self.question_dense_weight if has_questions else self.dense_weight
        return (self.bm25_weight, dense)


@dataclass
class Hit:
    chunk: Chunk
    score: float  # fused score (or reranker score)
    bm25_rank: int | None = None
    dense_rank: int | None = None
    dense_sim: float | None = None
    bm25_score: float | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    # best dense cosine similarity among all chunks (with mode bm25: among BM25's candidates):
    # the abstain evidence
    best_sim: float
    timings_ms: dict[str, float] = field(default_factory=dict)


def rrf(rankings: list[list[str]], weights: list[float], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(id) = sum_i w_i / (k + rank_i), rank from 1. Ties keep the
    order of first appearance, which makes the merge deterministic."""
    scores: dict[str, float] = {}
    for ranking, w in zip(rankings, weights):
        for r, cid in enumerate(ranking, start=1):
            scores[cid] = scores.get(cid, 0.0) + w / (k + r)
    order = {cid: i for i, cid in enumerate(dict.fromkeys(c for rk in rankings for c in rk))}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def build_faiss(emb: np.ndarray, kind: str = "flat") -> faiss.Index:
    d = emb.shape[1]
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf" and len(x) >= 256:
        nlist = max(1, int(np.sqrt(len(x))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nlist, 16)
    else:
        index = faiss.IndexFlatIP(d)
    if len(x):
        index.add(x)
    return index


class Retriever:
    """Immutable view over one ``Index`` with one ``SearchConfig``; the server swaps whole
    retrievers on ingest. Build it with ``retrieval.factory.build_retriever`` (the one place
    that turns settings into a retriever)."""

    def __init__(self, index: Index, embedder, config: SearchConfig, *, reranker=None):
        if len(index):
            check_embedder(index, embedder)
        self.index = index
        self.embedder = embedder
        self.config = config
        faiss_kind = config.faiss_index
        self.faiss = build_faiss(np.asarray(index.embeddings), faiss_kind) if len(index) else None
        self.reranker = reranker
        # attached questions: their vectors (a second FAISS index) and the chunk each points to
        self.q_faiss, self.q_owner = None, np.zeros(0, dtype=np.int64)
        qs = index.questions
        if qs is not None and qs.n_attached:
            keep = [i for i, r in enumerate(qs.rows) if r["chunk_id"] in index.pos]
            self.q_owner = np.array([index.pos[qs.rows[i]["chunk_id"]] for i in keep])
            self.q_faiss = build_faiss(np.asarray(qs.embeddings)[keep], faiss_kind)

    @functools.cached_property
    def idf(self):
        """Corpus IDF of a (stemmed) word: evidence selection's weights."""
        from retrieval.evidence import idf_from_bm25

        return idf_from_bm25(self.index.bm25)

    @property
    def has_questions(self) -> bool:
        return self.q_faiss is not None

    def _question_sims(self, q: np.ndarray, k: int) -> dict[int, float]:
        """Best similarity of the query to each chunk's attached questions (top ``k`` questions)."""
        if self.q_faiss is None:
            return {}
        sims, ids = self.q_faiss.search(q, min(k, len(self.q_owner)))
        best: dict[int, float] = {}
        for i, s in zip(ids[0].tolist(), sims[0].tolist()):
            if i >= 0:
                c = int(self.q_owner[i])
                best[c] = max(best.get(c, -1.0), s)
        return best

    def _weighted(self, bm_all, q, bm_hits, dense_hits, weights, qsims) -> list[tuple[str, float]]:
        """Convex combination of BM25 (divided by its max) and cosine similarity (min-max over
        the candidate union), computed exactly for every candidate of either retriever."""
        union = list(dict.fromkeys([i for i, _ in bm_hits] + [i for i, _ in dense_hits]))
        if not union:
            return []
        bm = bm_all[union]
        bm = bm / bm.max() if bm.max() > 0 else bm
        dn = np.asarray(self.index.embeddings[union]) @ q[0]
        if qsims:
            dn = np.maximum(dn, [qsims.get(i, -1.0) for i in union])
        span = dn.max() - dn.min()
        dn = (dn - dn.min()) / span if span > 0 else np.zeros_like(dn)
        score = weights[0] * bm + weights[1] * dn
        order = sorted(range(len(union)), key=lambda j: (-score[j], j))
        chunks = self.index.chunks
        return [(chunks[union[j]].id, float(score[j])) for j in order]

    def _allowed(self, prefix: str | None) -> np.ndarray | None:
        if not prefix:
            return None
        p = prefix
        while p.startswith(("./", "/")):  # "./docs", "/docs" -> "docs"; ".github" stays
            p = p[1:] if p[0] == "/" else p[2:]
        if p in ("", "."):
            return None
        return np.array([c.path.startswith(p) for c in self.index.chunks], dtype=bool)

    def with_index(self, index: Index) -> Retriever:
        """A retriever over another index with the same embedder, config and reranker."""
        return Retriever(index, self.embedder, self.config, reranker=self.reranker)

    def with_reranker(self, reranker) -> Retriever:
        """The same index and config with another reranker (None: the fused order)."""
        return Retriever(self.index, self.embedder, self.config, reranker=reranker)

    def with_config(self, **changes) -> Retriever:
        """The same index searched with some config fields changed (benchmarks, ablations)."""
        cfg = dataclasses.replace(self.config, **changes)
        return Retriever(self.index, self.embedder, cfg, reranker=self.reranker)

    def search(
        self,
        query: str,
        top_k: int | None = None,
        *,
        path_prefix: str | None = None,
        mode: str | None = None,
    ) -> SearchResult:
        """The ``top_k`` best chunks for ``query`` (None: the config's). Overrides per request:
        ``top_k``, ``path_prefix`` (only chunks under it) and ``mode`` (hybrid|bm25|dense)."""
        cfg = self.config
        top_k = cfg.top_k if top_k is None else top_k
        mode = mode or cfg.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        candidates, fusion = cfg.candidates, cfg.fusion
        t0 = time.perf_counter()
        n = len(self.index)
        if n == 0 or not query.strip():
            return SearchResult([], -1.0)
        allowed = self._allowed(path_prefix)
        chunks = self.index.chunks
        tm: dict[str, float] = {}

        bm_hits: list[tuple[int, float]] = []
        bm_all = None  # BM25 scores of every chunk, computed once per query
        if mode in ("hybrid", "bm25"):
            bm_all = self.index.bm25.scores(tokenize(query))
            bm_hits = self.index.bm25.top_of(bm_all, candidates, allowed)
        tm["bm25"] = (time.perf_counter() - t0) * 1000

        dense_hits: list[tuple[int, float]] = []
        best_sim = -1.0
        q = None
        qsims: dict[int, float] = {}
        if mode in ("hybrid", "dense"):
            t1 = time.perf_counter()
            q = self.embedder.embed_query(query)
            tm["embed"] = (time.perf_counter() - t1) * 1000
            t2 = time.perf_counter()
            k = n if allowed is not None else min(n, candidates)
            sims, ids = self.faiss.search(q, k)
            for i, s in zip(ids[0].tolist(), sims[0].tolist()):
                if i < 0 or (allowed is not None and not allowed[i]):
                    continue
                dense_hits.append((i, s))
                if len(dense_hits) >= candidates:
                    break
            # abstain evidence: the chunks' own similarity (question vectors are closer to
            # queries than passages are, so they would shift the calibrated threshold)
            best_sim = dense_hits[0][1] if dense_hits else -1.0
            if self.q_faiss is not None:
                qsims = self._question_sims(q, candidates * 8)
                if allowed is not None:
                    qsims = {i: s for i, s in qsims.items() if allowed[i]}
                merged = dict(dense_hits)
                for i, s in qsims.items():
                    merged[i] = max(merged.get(i, -1.0), s)
                dense_hits = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:candidates]
            tm["faiss"] = (time.perf_counter() - t2) * 1000
        elif bm_hits:
            # bm25 alone: the abstain evidence is still a dense similarity (the threshold is
            # calibrated on it), the best of the chunks BM25 found; before, -1 made every
            # grounded answer abstain
            t1 = time.perf_counter()
            q = self.embedder.embed_query(query)
            cand = np.asarray(self.index.embeddings[[i for i, _ in bm_hits]]) @ q[0]
            best_sim = float(cand.max())
            tm["embed"] = (time.perf_counter() - t1) * 1000

        bm_rank = {chunks[i].id: (r, s) for r, (i, s) in enumerate(bm_hits, start=1)}
        dn_rank = {chunks[i].id: (r, s) for r, (i, s) in enumerate(dense_hits, start=1)}
        if mode == "bm25":
            fused = [(chunks[i].id, s) for i, s in bm_hits]
        elif mode == "dense":
            fused = [(chunks[i].id, s) for i, s in dense_hits]
        elif fusion == "weighted":
            weights = cfg.weights(self.has_questions)
            fused = self._weighted(bm_all, q, bm_hits, dense_hits, weights, qsims)
        else:
            fused = rrf(
                [[chunks[i].id for i, _ in bm_hits], [chunks[i].id for i, _ in dense_hits]],
                list(cfg.weights(self.has_questions)),
                cfg.rrf_k,
            )
        pos = self.index.pos
        hits = [
            Hit(
                chunks[pos[cid]],
                float(score),
                bm_rank.get(cid, (None, None))[0],
                dn_rank.get(cid, (None, None))[0],
                dn_rank.get(cid, (None, None))[1],
                bm_rank.get(cid, (None, None))[1],
            )
            for cid, score in fused
        ]
        if self.reranker is not None and hits:
            # the top rerank_candidates of the fused order, reordered by the cross-encoder
            # (score: its relevance, 0..1; ties keep the fused order)
            t3 = time.perf_counter()
            pool = hits[: max(cfg.rerank_candidates, top_k)]
            scores = self.reranker.predict([(query, h.chunk.search_text) for h in pool])
            for h, s in zip(pool, scores):
                h.score = float(s)
            hits = sorted(pool, key=lambda h: -h.score)
            tm["rerank"] = (time.perf_counter() - t3) * 1000
        tm["total"] = (time.perf_counter() - t0) * 1000
        return SearchResult(hits[:top_k], best_sim, tm)
