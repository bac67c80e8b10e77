"""DPO pairs: from a prompt/chosen/rejected JSONL or an HF dataset on disk (orca_dpo_pairs'
layout: system, question, chosen, rejected), or built offline from the Q&A data: the prompt
is the grounded prompt the server uses, chosen = an answer quoting the gold excerpt, rejected
= the current model's own answer (or the context-free paraphrase)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from training.config import DPOStep


def load_pairs(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        rows = list(ds["train"] if hasattr(ds, "keys") and "train" in ds else ds)
    else:
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    out = []
    for r in rows:
        if "prompt" in r:
            out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        elif "question" in r:  # orca_dpo_pairs
            msgs = [{"role": "system", "content": r["system"]}] if r.get("system") else []
            msgs.append({"role": "user", "content": r["question"]})
            out.append(
                {
                    "prompt": msgs,
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
            )
        else:
            raise ValueError(
                f"{path}: rows need prompt/chosen/rejected or question/chosen/rejected"
            )
    return out


def _generate(model, tok, messages: list[dict], max_new_tokens: int = 64) -> str:
    import torch

    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def build_pairs(model, tok, qa_pairs, cfg: DPOStep) -> list[dict]:
    from training.data import RagExamples, extractive_answer

    rng = random.Random(cfg.seed)
    builder = RagExamples()
    pairs = []
    for p in qa_pairs:
        ex = builder.example(p, cfg.k_chunks, 0.0, "extractive", rng)
        chosen = ex["completion"][0]["content"]
        if cfg.rejected == "model":
            rejected = _generate(model, tok, ex["prompt"])
        else:
            rejected = p.answer
        if not rejected or rejected.strip() == chosen.strip():
            rejected = (
                p.answer
                if chosen.strip() != p.answer.strip()
                else extractive_answer(p.answer, p.question)
            )
        pairs.append(
            {
                "prompt": ex["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs
