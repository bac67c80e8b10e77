"""Finetune a cross-encoder reranker on the corpus: all-MiniLM-L6-v2 (the shipped embedder's
BERT) with a one-logit head reads a question and a chunk together and scores their relevance.

Each training question is labelled to the chunk holding its answer by the embedder finetune's
labelling (``training.embedder.contrastive_examples``: ``retrieval.questions.AnswerLabeler``;
every chunk holding the answer is gold, never a negative). Its negatives are the best-ranked
non-gold chunks of the server's own fused order (hybrid BM25 + dense, the candidates the
reranker will see when serving). The loss is listwise: a softmax over the gold chunk and its
negatives, the gold one the target.

The held-out questions (the same split and gold labels as ``benchmarks/bench_retrieval.py``)
are ranked before and after: the fused order against the fused top ``candidates`` reordered by
the cross-encoder, recall@1/@3 and MRR, recorded in the step's provenance. The result is a
sentence-transformers CrossEncoder folder: set ``retrieval.reranker`` to it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class RerankExample:
    question: str
    positive: int  # chunk index
    negatives: list[int]  # chunk indexes: best-ranked non-gold fused candidates
    gold: frozenset[int]


def rerank_examples(pairs, retriever, negatives: int, depth: int = 30) -> list[RerankExample]:
    """Pairs whose answer a chunk holds -> (question, gold chunk, hard negatives mined from
    ``retriever``'s fused order, searched without a reranker)."""
    from training.embedder import contrastive_examples

    index = retriever.index
    base = contrastive_examples(pairs, index.chunks, index.bm25, hard_negatives=False)
    plain = retriever.with_reranker(None)
    out, ranked = [], {}
    for e in base:
        if e.question not in ranked:
            hits = plain.search(e.question, depth).hits
            ranked[e.question] = [index.pos[h.chunk.id] for h in hits]
        negs = [i for i in ranked[e.question] if i not in e.gold][:negatives]
        if negs:
            out.append(RerankExample(e.question, e.positive, negs, e.gold))
    return out


def _load(base: str, max_length: int):
    """A CrossEncoder with one output on top of ``base`` (a name the embedder resolver knows,
    a sentence-transformers folder or a cross-encoder folder)."""
    from sentence_transformers import CrossEncoder

    from retrieval.embedder import resolve_embedder

    path = Path(base) if Path(base).is_dir() else resolve_embedder(base)
    return CrossEncoder(str(path), num_labels=1, max_length=max_length, device="cpu")


def train_listwise(ce, texts: list[str], examples: list[RerankExample], cfg, progress=True):
    """The training loop; returns per-step losses. ``ce``: a CrossEncoder with one output."""
    import torch
    import torch.nn.functional as F

    from training.embedder import optimizer_step

    if not examples:
        raise ValueError("no training examples: no Q&A pair's answer is held by a chunk")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, tok = ce.model, ce.tokenizer
    bs = min(cfg.batch_size, len(examples))
    per_epoch = max(1, len(examples) // bs)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    warm = max(1, int(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / total)
    )
    losses: list[float] = []
    order: list[RerankExample] = []
    model.train()
    bar = tqdm(total=total, desc="reranker", unit="step", disable=not progress)
    for _ in range(total):
        if len(order) < bs:
            fresh = examples[:]
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:bs], order[bs:]
        groups = [[e.positive, *e.negatives[: cfg.negatives]] for e in batch]
        width = max(len(g) for g in groups)
        qs = [e.question for e, g in zip(batch, groups) for _ in g]
        ds = [texts[c] for g in groups for c in g]
        feats = tok(
            qs,
            ds,
            truncation="only_second",
            max_length=cfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        flat = model(**feats).logits.view(-1)
        logits = torch.full((len(groups), width), -1e4)
        j = 0
        for r, g in enumerate(groups):
            logits[r, : len(g)] = flat[j : j + len(g)]
            j += len(g)
        loss = F.cross_entropy(logits, torch.zeros(len(groups), dtype=torch.long))
        optimizer_step(loss, opt, sched, losses, bar, "reranker", total)
    bar.close()
    model.eval()
    return losses


def finetune_reranker(cfg, pairs, heldout, out_dir: Path, progress: bool = True) -> dict:
    """Train on ``pairs``, evaluate on ``heldout`` (fused vs reranked, same chunks and gold
    labels as the retrieval benchmark), save the CrossEncoder to ``out_dir``. Returns the
    metrics."""
    import torch

    from docqa.data import DEFAULT_DOCS
    from docqa.settings import load_settings
    from eval.rerank import compare_orders
    from retrieval.builder import build_index, default_tokenizer
    from retrieval.embedder import Embedder
    from retrieval.factory import build_retriever
    from retrieval.questions import retrieval_devset
    from retrieval.reranker import CrossEncoderReranker
    from training.embedder import param_delta

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    docs = Path(cfg.docs) if cfg.docs else DEFAULT_DOCS
    emb = Embedder(cfg.embedder, query_backend="eager")
    size, overlap = cfg.chunk_tokens, cfg.chunk_overlap
    index = build_index(docs, emb, default_tokenizer(), size=size, overlap=overlap, progress=False)
    settings = load_settings()
    retriever = build_retriever(index, settings, emb, reranker=False)
    t0 = time.perf_counter()
    examples = rerank_examples(pairs, retriever, cfg.negatives)
    log.info("%d of %d pairs labelled to a chunk: training examples", len(examples), len(pairs))
    if cfg.limit_examples and len(examples) > cfg.limit_examples:
        examples = random.Random(cfg.seed).sample(examples, cfg.limit_examples)
    ce = _load(cfg.base, cfg.max_length)
    initial = {k: v.detach().clone().float() for k, v in ce.model.state_dict().items()}
    texts = [c.search_text for c in index.chunks]
    losses = train_listwise(ce, texts, examples, cfg, progress)
    train_s = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    ce.save(str(out_dir))
    tuned = CrossEncoderReranker(out_dir, max_length=cfg.max_length)
    items = retrieval_devset(heldout, index.chunks) if cfg.evaluate else []
    heldout_cmp = compare_orders(retriever, tuned, items, cfg.candidates) if items else {}
    return {
        "examples": len(examples),
        "pairs": len(pairs),
        "chunks": len(index.chunks),
        "steps": len(losses),
        "losses": [round(x, 4) for x in losses],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first3": float(np.mean(losses[:3])),
        "loss_last3": float(np.mean(losses[-3:])),
        "weight_delta": param_delta(initial, tuned.model.model),
        "train_s": round(train_s, 1),
        "dev_questions": len(items),
        "candidates": cfg.candidates,
        "heldout": heldout_cmp,
    }
