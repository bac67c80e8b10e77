"""LoRA training with trl (SFT and DPO) on CPU or GPU, returning losses and speed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from training.config import DPOStep, TrainCommon
from training.hf import device

log = logging.getLogger(__name__)


def _peft(cfg: TrainCommon):
    """The LoRA config, or None for full finetuning (``lora: null``)."""
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def set_threads(cfg: TrainCommon) -> None:
    if cfg.threads and device() != "cuda":
        import torch

        torch.set_num_threads(cfg.threads)


def freeze_lower(model, cfg: TrainCommon) -> dict:
    """Full finetuning of the top ``cfg.train_layers`` layers (and the final norm) only: the
    embeddings and the layers below keep ``requires_grad=False``, so autograd never walks
    back through them. -> trainable/total parameter counts."""
    if cfg.lora is None and cfg.train_layers:
        layers = model.model.layers
        keep = set(range(max(0, len(layers) - cfg.train_layers), len(layers)))
        for p in model.parameters():
            p.requires_grad_(False)
        for i in keep:
            for p in layers[i].parameters():
                p.requires_grad_(True)
        for p in model.model.norm.parameters():
            p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}


def _finish(trainer):
    """The trained model: LoRA adapters merged in, or the fully finetuned model as it is."""
    m = trainer.model
    return m.merge_and_unload() if hasattr(m, "merge_and_unload") else m


def _common_args(cfg: TrainCommon, out: Path) -> dict:
    gpu = device() == "cuda"
    return dict(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        use_cpu=not gpu,
        bf16=gpu,
        max_length=cfg.max_length,
        lr_scheduler_type="cosine",
        gradient_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=False,
    )


def _result(trainer, n_examples: int, t0: float) -> dict:
    logs = trainer.state.log_history
    losses = [float(x["loss"]) for x in logs if "loss" in x]
    end = next((x for x in reversed(logs) if "train_runtime" in x), {})
    tokens = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    secs = time.time() - t0
    return {
        "losses": losses,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_first3": sum(losses[:3]) / max(1, len(losses[:3])),
        "loss_last3": sum(losses[-3:]) / max(1, len(losses[-3:])),
        "steps": trainer.state.global_step,
        "examples": n_examples,
        "train_seconds": round(secs, 1),
        "train_runtime": end.get("train_runtime"),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / secs, 1) if tokens else None,
        "device": device(),
    }


def train_sft(model, tok, examples: list[dict], cfg: TrainCommon, work: Path):
    """SFT (LoRA, or full finetuning with ``lora: null``) with loss on the assistant turn only
    (prompt/completion data). Returns the merged model and metrics."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if getattr(cfg, "block_attention", False):
        trainer, params = _stitched_trainer(model, tok, examples, cfg, work)
    else:
        ds = Dataset.from_list(
            [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples]
        )
        args = SFTConfig(
            **_common_args(cfg, work),
            completion_only_loss=True,
            packing=False,
            include_num_input_tokens_seen=True,
        )
        set_threads(cfg)
        params = freeze_lower(model, cfg)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=_peft(cfg),
        )
    t0 = time.time()
    trainer.train()
    metrics = _result(trainer, len(examples), t0) | params
    if cfg.lora is not None:
        trainer.model.save_pretrained(work / "adapter")
    return _finish(trainer), metrics


def _stitched_trainer(model, tok, examples: list[dict], cfg: TrainCommon, work: Path):
    """A Trainer whose loss is ``training.blocks.stitched_loss``: the examples run as the
    server's unit KV caches run them (``sft.block_attention``). Examples longer than
    ``max_length`` are left out (truncating one would cut its answer). -> (trainer, the
    trained-parameter counts and the number of examples cut into lines)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from docqa.settings import load_settings
    from training.blocks import block_example, collate, distill_loss, stitched_loss

    retrieval = load_settings().retrieval
    if retrieval.shows_excerpts:
        raise ValueError("sft.block_attention needs the evidence layout (no {context})")
    rows = [block_example(tok, e, retrieval) for e in examples]
    rows = [r for r in rows if r is not None and len(r["input_ids"]) <= cfg.max_length]
    cut = sum(1 for r in rows if any(s > 0 for s in r["segments"]))
    log.info("stitched SFT: %d of %d examples cut into evidence lines", cut, len(rows))
    if not rows:
        raise ValueError("no example left for stitched training")

    teacher = None
    if getattr(cfg, "objective", "labels") == "distill":  # the starting model, frozen
        import copy

        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)

    class StitchedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # the list batches are not counted by Trainer itself
                self.state.num_input_tokens_seen += sum(x.numel() for x in inputs["input_ids"])
            if teacher is not None:
                loss = distill_loss(model, teacher, inputs, num_items_in_batch)
            else:
                loss = stitched_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

        def floating_point_ops(self, inputs):
            n = sum(int(x.numel()) for x in inputs["input_ids"])
            return 6 * n * self.model.num_parameters(exclude_embeddings=True)

    common = _common_args(cfg, work)
    common.pop("max_length")
    if cfg.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, _peft(cfg))
    set_threads(cfg)
    params = freeze_lower(model, cfg)
    trainer = StitchedTrainer(
        model=model,
        args=TrainingArguments(**common, remove_unused_columns=False),
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
    )
    return trainer, params | {"stitched_examples": cut}


def train_dpo(model, tok, pairs: list[dict], cfg: DPOStep, work: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list(pairs)
    args = DPOConfig(**_common_args(cfg, work), beta=cfg.beta)
    set_threads(cfg)
    params = freeze_lower(model, cfg)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_peft(cfg)
    )
    t0 = time.time()
    trainer.train()
    metrics = _result(trainer, len(pairs), t0) | params
    if cfg.lora is not None:
        trainer.model.save_pretrained(work / "adapter")
    return _finish(trainer), metrics
