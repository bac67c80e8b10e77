"""Reranking evaluation: the fused order against the same candidates reordered by a reranker
(recall@1/@3, MRR, per-query latency), and the LLM yes/no reranker it is compared with.

Used by the reranker training step (held-out comparison in its provenance) and by
``benchmarks/bench_rerank.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from eval.metrics import recall_at_k, reciprocal_rank


def rank_metrics(ranked: list[list[str]], golds: list[set[str]]) -> dict[str, float]:
    """recall@1, recall@3 and MRR of ranked chunk ids against each question's gold ids."""
    n = len(ranked)
    if not n:
        return {}
    return {
        "recall@1": round(sum(recall_at_k(r, g, 1) for r, g in zip(ranked, golds)) / n, 4),
        "recall@3": round(sum(recall_at_k(r, g, 3) for r, g in zip(ranked, golds)) / n, 4),
        "mrr": round(sum(reciprocal_rank(r, g) for r, g in zip(ranked, golds)) / n, 4),
    }


def evaluate_order(retriever, items, k: int) -> dict:
    """``retriever``'s top ``k`` on ``items`` (``retrieval.questions.RetrievalItem``):
    recall@1/@3, MRR (within the top ``k``) and per-query latency p50/p95 in ms."""
    ranked, lat = [], []
    for it in items:
        t0 = time.perf_counter()
        hits = retriever.search(it.question, k).hits
        lat.append((time.perf_counter() - t0) * 1000)
        ranked.append([h.chunk.id for h in hits])
    out = rank_metrics(ranked, [set(it.gold_ids) for it in items])
    if lat:
        out["latency_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
        out["latency_p95_ms"] = round(float(np.percentile(lat, 95)), 2)
    return out


def compare_orders(retriever, reranker, items, candidates: int) -> dict:
    """The fused order vs the fused top ``candidates`` reordered by ``reranker`` (the same
    candidates: recall and MRR within them)."""
    fused = retriever.with_reranker(None).with_config(rerank_candidates=candidates)
    return {
        "fused": evaluate_order(fused, items, candidates),
        "reranked": evaluate_order(fused.with_reranker(reranker), items, candidates),
    }


YES_NO_SYSTEM = (
    "You judge search results. Answer yes if the passage answers the question, otherwise no."
)


class LlamaYesNoReranker:
    """A causal LLM as a pointwise reranker: the relevance of (question, passage) is
    P(yes) / (P(yes) + P(no)) for the first answer token after a ChatML prompt asking whether
    the passage answers the question (the embedded SmolLM2 GGUF by default)."""

    def __init__(
        self, gguf: str | Path | None = None, n_threads: int = 1, n_ctx: int = 1024, chars=1200
    ):
        from llama_cpp import Llama

        from models.store import embedded_path

        path = Path(gguf) if gguf else embedded_path("smollm2-135m-instruct")
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,  # prompt threads default to every core
            n_batch=512,
            verbose=False,
        )
        self.name = f"llm-yes-no:{path.name}"
        self.chars = chars  # passage cut (characters), so a prompt fits n_ctx
        self.yes = self._first_ids(["yes", "Yes", " yes", " Yes"])
        self.no = self._first_ids(["no", "No", " no", " No"])
        self._lock = threading.Lock()

    def _first_ids(self, words: list[str]) -> list[int]:
        ids = {self.llm.tokenize(w.encode(), add_bos=False, special=False)[0] for w in words}
        return sorted(ids)

    def _prompt(self, question: str, passage: str) -> list[int]:
        text = (
            f"<|im_start|>system\n{YES_NO_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"Passage:\n{passage[: self.chars]}\n\nQuestion: {question}\n"
            "Does the passage answer the question? Answer yes or no.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _score(self, question: str, passage: str) -> float:
        toks = self._prompt(question, passage)[-(self.llm.n_ctx() - 1) :]
        self.llm.reset()
        self.llm.eval(toks)
        # the last token's logits (llama-cpp-python no longer copies them into .scores)
        n_vocab = self.llm.n_vocab()
        last = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_vocab,))
        logits = last.astype(np.float64)
        logits -= logits.max()
        p = np.exp(logits)
        yes, no = p[self.yes].sum(), p[self.no].sum()
        return float(yes / (yes + no)) if yes + no > 0 else 0.5

    def predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        with self._lock:
            return np.array([self._score(q, d) for q, d in pairs], dtype=np.float64)
