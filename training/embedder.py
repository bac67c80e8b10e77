"""Finetune the retrieval embedder on the corpus: each training question is paired with the
chunk that holds its answer (the labeller that attaches questions to chunks,
``retrieval.questions``), and a sentence-transformers model learns to put the question next to
its chunk with an in-batch contrastive loss (MultipleNegativesRanking: the other chunks of the
batch, plus one BM25-mined hard negative per question, are the negatives; chunks that also hold
a question's answer are masked out, never treated as negatives).

The result is a plain sentence-transformers folder: point ``embedder.model`` at it and rebuild
the index (documents and queries must come from the same embedder). Before/after recall on the
held-out questions is measured on the same chunks and recorded in the step's provenance.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrieval.chunking import Chunk

log = logging.getLogger(__name__)


@dataclass
class Example:
    question: str
    positive: int  # chunk index
    negative: int | None  # BM25 hard negative (chunk index)
    gold: frozenset[int]  # every chunk holding the answer (masked as negatives)


def contrastive_examples(pairs, chunks: list[Chunk], bm25, hard_negatives: bool = True):
    """Pairs whose answer a chunk holds -> training examples (unlabelled pairs are dropped)."""
    from retrieval.bm25 import tokenize
    from retrieval.questions import AnswerLabeler

    lab = AnswerLabeler(chunks)
    labelled = [(p, lab.label(p.question, p.answer)) for p in pairs]
    union: dict[str, set[int]] = {}  # a question asked of several chunks: all of them are gold
    for p, got in labelled:
        if got is not None:
            union.setdefault(p.question, set()).update(got.chunk_idx)
    out = []
    for p, got in labelled:
        if got is None:
            continue
        gold = frozenset(union[p.question])
        neg = None
        if hard_negatives:
            scores = bm25.scores(tokenize(p.question))
            neg = next((int(i) for i in np.argsort(-scores) if int(i) not in gold), None)
        out.append(Example(p.question, got.chunk_idx[0], neg, gold))
    return out


def train_contrastive(model, texts: list[str], examples: list[Example], cfg, progress=True):
    """The training loop; returns per-step losses. ``model``: a SentenceTransformer."""
    import torch
    import torch.nn.functional as F

    if not examples:
        raise ValueError("no training examples: no Q&A pair's answer is held by a chunk")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.max_seq_length = min(cfg.max_seq_length, model.max_seq_length or cfg.max_seq_length)
    bs = min(cfg.batch_size, len(examples))
    per_epoch = max(1, len(examples) // bs)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    warm = max(1, int(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / total)
    )

    def encode(strs: list[str]):
        prep = getattr(model, "preprocess", None) or model.tokenize  # tokenize: ST < 6
        feats = prep(strs)
        feats = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in feats.items()}
        return F.normalize(model(feats)["sentence_embedding"], dim=-1)

    losses: list[float] = []
    order: list[Example] = []
    model.train()
    bar = tqdm(total=total, desc="embedder", unit="step", disable=not progress)
    for _ in range(total):
        if len(order) < bs:
            fresh = examples[:]
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:bs], order[bs:]
        cols = list(dict.fromkeys([e.positive for e in batch]))
        cols += [e.negative for e in batch if e.negative is not None and e.negative not in cols]
        q, d = encode([e.question for e in batch]), encode([texts[c] for c in cols])
        logits = cfg.scale * q @ d.T
        mask = torch.tensor([[c in e.gold and c != e.positive for c in cols] for e in batch])
        logits = logits.masked_fill(mask.to(logits.device), -1e4)
        target = torch.tensor([cols.index(e.positive) for e in batch], device=logits.device)
        loss = F.cross_entropy(logits, target)
        optimizer_step(loss, opt, sched, losses, bar, "embedder", total)
    bar.close()
    model.eval()
    return losses


def optimizer_step(loss, opt, sched, losses: list[float], bar, name: str, total: int) -> None:
    """One step of a hand-written training loop (the embedder's, the reranker's): backward,
    optimizer and schedule, then the loss into ``losses``, the progress bar and the log."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if len(losses) % 10 == 0:
        log.info("%s step %d/%d loss %.4f", name, len(losses), total, losses[-1])


def dev_recall(index, embedder, items, k: int = 3) -> dict[str, float]:
    """recall@k of dense and hybrid (the server's fusion settings) on ``items``."""
    from docqa.settings import load_settings
    from eval.metrics import recall_at_k
    from retrieval.factory import build_retriever

    ret = build_retriever(index, load_settings(), embedder)
    out = {}
    for mode in ("dense", "hybrid"):
        hits = 0.0
        for it in items:
            found = ret.search(it.question, k, mode=mode).hits
            hits += recall_at_k([h.chunk.id for h in found], set(it.gold_ids), k)
        out[f"{mode}_recall@{k}"] = round(hits / len(items), 4) if items else None
    return out


def param_delta(before: dict, model) -> float:
    after = model.state_dict()
    return max(float((after[k].float() - v).abs().max()) for k, v in before.items())


def finetune_embedder(cfg, pairs, heldout, out_dir: Path, progress: bool = True) -> dict:
    """Train on ``pairs``, evaluate on ``heldout`` (before and after, same chunks), save the
    model to ``out_dir`` (a sentence-transformers folder). Returns the metrics."""
    from docqa.data import DEFAULT_DOCS
    from retrieval.builder import build_index, default_tokenizer
    from retrieval.embedder import Embedder
    from retrieval.questions import retrieval_devset

    docs = Path(cfg.docs) if cfg.docs else DEFAULT_DOCS
    tok = default_tokenizer()
    base = Embedder(cfg.base, query_backend="eager")
    size, overlap = cfg.chunk_tokens, cfg.chunk_overlap
    index = build_index(docs, base, tok, size=size, overlap=overlap, progress=progress)
    examples = contrastive_examples(pairs, index.chunks, index.bm25, cfg.hard_negatives)
    log.info("%d of %d pairs labelled to a chunk: training examples", len(examples), len(pairs))
    items = retrieval_devset(heldout, index.chunks) if cfg.evaluate else []
    before = dev_recall(index, base, items) if items else {}
    initial = {k: v.detach().clone().float() for k, v in base.model.state_dict().items()}
    texts = [c.search_text for c in index.chunks]
    losses = train_contrastive(base.model, texts, examples, cfg, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    base.model.save(str(out_dir))
    tuned = Embedder(str(out_dir), query_backend="eager")
    after = {}
    if items:
        reembedded = build_index(docs, tuned, tok, size=size, overlap=overlap, progress=False)
        after = dev_recall(reembedded, tuned, items)
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
        "weight_delta": param_delta(initial, tuned.model),
        "dev_questions": len(items),
        "before": before,
        "after": after,
    }
