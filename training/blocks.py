"""Stitched finetuning: train on the attention the server's unit KV caches give.

With ``retrieval.kv_cache`` on, each evidence line of a grounded prompt is
evaluated once after the prompt's prefix alone, at the positions right after it, and its
cells are reused: placed in the prompt, their keys shifted to the line's place (llama.cpp
re-applies RoPE), server/kvcache.py. So at serving time an evidence line attends to the prefix
and to itself, never to the lines before it, while the question and the answer attend to
everything. A model finetuned on plain-prefilled prompts reads those stitched prompts worse
(docs/benchmarks.md: the reader's grounded facts fall from 0.529 to 0.353). Block-Attention
(Sun et al. 2024, arXiv 2409.15355) and TurboRAG finetune on the serving pattern instead.

This module does it exactly: ``block_example`` cuts each SFT example as ``build_unit_plan``
cuts the served prompt (same prefix, same line and tail pieces, each tokenized apart as the
server tokenizes them); ``stitched_forward`` runs the prefix, then each line after the prefix
alone at the positions after it, shifts its keys to the line's place, and runs the question
and answer over the result, differentiable end to end (first-token KL to llama.cpp's stitched
prompt ~0.003-0.009, the HF-vs-llama.cpp noise floor; a 4D block mask at the final positions
was 0.03-0.36, no closer than a plain forward pass: tests/test_kvcache.py).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PREFIX = 0  # segment of the tokens every token may see (the prompt before the evidence)
OPEN = -1  # segment of the tokens that see everything before them (question, answer)


class _ChatShim:
    """``format_chat`` over an HF tokenizer's chat template, as ``prefix_text`` expects."""

    def __init__(self, tok):
        self.tok = tok

    def format_chat(self, messages) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def block_example(tok, example: dict, retrieval) -> dict | None:
    """An SFT example (``prompt`` and ``completion`` messages, ``evidence``: the (unit text,
    tag) pairs of its evidence lines) as ``input_ids``, ``labels`` (-100 outside the
    completion) and ``segments`` (per token: PREFIX, OPEN, or the evidence line's number from 1).
    A prompt the server would not cut into units (no evidence, another shape) keeps every token
    OPEN: the server prefills it plainly too. None when the completion cannot be separated."""
    from server.kvcache import build_unit_plan, prefix_text

    prompt = tok.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    if not full.startswith(prompt):
        return None

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    lines = [tuple(x) for x in example.get("evidence") or []]
    prefix = prefix_text(_ChatShim(tok), retrieval) if lines else None
    plan = build_unit_plan(prompt, prefix, lines, enc, enc) if prefix else None
    if plan is None:
        ids = enc(prompt)
        segments = [OPEN] * len(ids)
    else:
        ids, segments = plan_segments(plan)
    answer = enc(full[len(prompt) :])
    return {
        "input_ids": ids + answer,
        "labels": [-100] * len(ids) + answer,
        "segments": segments + [OPEN] * len(answer),
    }


def plan_segments(plan) -> tuple[list[int], list[int]]:
    """A served ``KVPlan``'s tokens and their segments: the prefix, each unit with its tail
    (its own segment, numbered from 1), the suffix (OPEN)."""
    ids, segments = list(plan.prefix), [PREFIX] * len(plan.prefix)
    for n, it in enumerate(plan.items, 1):
        piece = it.label + it.span + it.tail
        ids += piece
        segments += [n] * len(piece)
    ids += plan.suffix
    segments += [OPEN] * len(plan.suffix)
    return ids, segments


def _runs(segments) -> list[tuple[int, int, int]]:
    """(segment, start, end) of each maximal run of equal segments."""
    out, start = [], 0
    for i in range(1, len(segments) + 1):
        if i == len(segments) or segments[i] != segments[start]:
            out.append((int(segments[start]), start, i))
            start = i
    return out


def _shift_keys(model, keys, delta: int):
    """RoPE'd keys moved by ``delta`` positions (what llama.cpp's K-shift does)."""
    import torch
    from transformers.models.llama.modeling_llama import rotate_half

    if delta == 0:
        return keys
    pos = torch.full((1, keys.shape[2]), delta, dtype=torch.long, device=keys.device)
    cos, sin = model.model.rotary_emb(keys, pos)
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin


def stitched_forward(model, ids, segments):
    """The forward pass the server's unit caches give, exactly: the prefix once; each evidence
    line (its segment) after the prefix alone, at the positions right after it (as it is
    cached); its keys then shifted to the line's place in the prompt; the rest (question,
    answer: OPEN) over the prefix and every shifted line. Differentiable end to end.
    ``ids``/``segments``: 1-D tensors of one example. -> the model's output for the OPEN tail
    (for the whole sequence when it is not cut into lines)."""
    import torch
    from transformers import DynamicCache

    runs = _runs(segments.tolist())
    if len(runs) == 1 and runs[0][0] == OPEN:  # not cut into lines: a plain prefill
        return model(input_ids=ids[None])
    if not runs or runs[0][0] != PREFIX or runs[-1][0] != OPEN:
        raise ValueError("a stitched example is prefix | lines | open tail")
    npre = runs[0][2]
    dev = ids.device
    body = model.model
    out = body(input_ids=ids[None, :npre], use_cache=True)
    pre = [(layer.keys, layer.values) for layer in out.cache.layers]
    keys = [[k] for k, _ in pre]
    vals = [[v] for _, v in pre]
    for seg, start, end in runs[1:-1]:
        if seg <= 0:
            raise ValueError("an evidence line's segment is numbered from 1")
        cache = DynamicCache()
        for i, (k, v) in enumerate(pre):
            cache.update(k, v, i)
        pos = torch.arange(npre, npre + end - start, device=dev)[None]
        o = body(input_ids=ids[None, start:end], position_ids=pos, cache=cache, use_cache=True)
        for i, layer in enumerate(o.cache.layers):
            keys[i].append(_shift_keys(model, layer.keys[:, :, npre:], start - npre))
            vals[i].append(layer.values[:, :, npre:])
    cache = DynamicCache()
    for i in range(len(keys)):
        cache.update(torch.cat(keys[i], dim=2), torch.cat(vals[i], dim=2), i)
    s = runs[-1][1]
    pos = torch.arange(s, len(ids), device=dev)[None]
    return model(input_ids=ids[None, s:], position_ids=pos, cache=cache)


def collate(rows: list[dict]) -> dict:
    """``block_example`` rows as lists of 1-D tensors (each example runs on its own)."""
    import torch

    return {
        k: [torch.as_tensor(r[k], dtype=torch.long) for r in rows]
        for k in ("input_ids", "labels", "segments")
    }


def _summed(model, batch: dict, num_items, per_example):
    """The loop both losses share: ``per_example(ids, labels, s)`` (``s``: where the open
    tail starts; tensors on the model's device) -> (summed loss, label count), summed over
    ``batch`` (``collate``) and divided by ``num_items`` (the label count if None)."""
    import torch

    total, count = None, 0
    dev = next(model.parameters()).device
    for ids, labels, segments in zip(batch["input_ids"], batch["labels"], batch["segments"]):
        ids, labels, segments = ids.to(dev), labels.to(dev), segments.to(dev)
        loss, n = per_example(ids, labels, segments, _runs(segments.tolist())[-1][1])
        total = loss if total is None else total + loss
        count += n
    denom = num_items if num_items is not None else max(count, 1)
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def stitched_loss(model, batch: dict, num_items=None):
    """Summed token cross-entropy of every example of ``batch`` (``collate``) under
    ``stitched_forward``, divided by ``num_items`` (the batch's label count if None)."""
    import torch.nn.functional as F

    def one(ids, labels, segments, s):
        logits = stitched_forward(model, ids, segments).logits[0]
        # the tail's first label is predicted by the token before the tail: a prompt token
        target = labels[s + 1 :]
        loss = F.cross_entropy(logits[:-1].float(), target, ignore_index=-100, reduction="sum")
        return loss, int((target != -100).sum())

    return _summed(model, batch, num_items, one)


def distill_loss(model, teacher, batch: dict, num_items=None):
    """Summed KL divergence, at every completion token of every example of ``batch``
    (``collate``), from ``teacher``'s plain forward pass (full attention: what plain prefill
    computes) to ``model``'s ``stitched_forward``, divided by ``num_items`` (the batch's label
    count if None). With ``teacher`` a frozen copy of the starting model, the student learns
    to read stitched prompts as it read plain ones, and nothing else (``sft.objective:
    distill``)."""
    import torch
    import torch.nn.functional as F

    def one(ids, labels, segments, s):
        keep = (labels[s + 1 :] != -100).nonzero().squeeze(-1)
        student = stitched_forward(model, ids, segments).logits[0, :-1][keep].float()
        with torch.no_grad():
            target = teacher(input_ids=ids[None], logits_to_keep=len(ids) - s).logits[0, :-1]
            target = F.log_softmax(target[keep].float(), -1)
        kl = F.kl_div(F.log_softmax(student, -1), target, log_target=True, reduction="sum")
        return kl, int(keep.numel())

    return _summed(model, batch, num_items, one)
