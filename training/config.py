"""Typed configs for every training step, and the recipe that chains them.

A recipe YAML lists ``steps`` and holds one section per step; each section validates into
its config class here (unknown keys are errors), so recipes cannot drift from the code. What
each step needs and produces is declared in the step registry (training.registry), which
``load_recipe`` uses to validate the order of the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eval.qa import DEFAULT_FACT_SET
from models.store import DEFAULT_MODEL

STEPS = (
    "base",
    "synth",
    "merge",
    "samples",
    "dpo",
    "sft",
    "export",
    "quant_select",
    "gate",
    "publish",
    "embedder",
    "reranker",
)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseStep(_Cfg):
    source: str = Field("smollm2-135m-instruct", description="Store name, GGUF path or HF folder.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Save dtype.")


class SynthStep(_Cfg):
    docs: str | None = Field(None, description="Corpus to synthesize from (None = Nitro docs).")
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL; None = use the existing CSV instead."
    )
    model: str = Field("gpt-4", description="Model id at the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the API key.")
    pairs_per_chunk: int = Field(5, ge=1, le=50, description="Q&A pairs asked per chunk.")
    chunk_tokens: int = Field(300, ge=32, le=8192, description="Chunk size (tokens).")
    chunk_overlap: int = Field(30, ge=0, le=4096, description="Chunk overlap (tokens).")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight.")
    max_retries: int = Field(4, ge=0, le=20, description="Retries per chunk with backoff.")
    csv: str | None = Field(None, description="Existing Q&A CSV (None = the Nitro pairs).")
    limit: int | None = Field(None, ge=1, description="Use at most this many training pairs.")
    max_failed_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of chunks whose request may fail (after its retries) with the step "
        "still done. Beyond it the step fails; the chunks answered stay cached, so a rerun "
        "asks only the failed ones.",
    )


class LoraCfg(_Cfg):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0, le=0.9, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Modules to adapt.",
    )


class TrainCommon(_Cfg):
    lora: LoraCfg | None = Field(
        default_factory=LoraCfg,
        description="LoRA adapter settings; null = full finetuning (every weight of the trained "
        "layers; for a small model on CPU it learns more per step at about the same cost).",
    )
    train_layers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Full finetuning only: train the top N transformer layers and the final "
        "norm, freezing the embeddings and the layers below (no backward pass through them: "
        "faster on CPU). None = every layer.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, le=100, description="Epochs (ignored when max_steps set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps (-1 = epochs).")
    batch_size: int = Field(4, ge=1, le=1024, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=32, le=65536, description="Max tokens per example.")
    seed: int = Field(0, description="Random seed.")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads torch uses for training (None = torch's default, one per core). "
        "On a machine shared with other work, fewer threads than cores avoids spin-waiting: on "
        "2 cores with another process busy, 2 threads trained at 10 tok/s and 1 at 148 "
        "(docs/benchmarks.md).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (saves memory, costs ~20% "
        "more compute; small models on CPU do not need it).",
    )
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Warm-up share of steps.")


class MergeStep(_Cfg):
    mergekit: dict[str, Any] | None = Field(
        None,
        description="mergekit YAML (models/slices, merge_method: slerp, parameters.t). "
        "None = SLERP of the base with a variant made by `variant`.",
    )
    variant: TrainCommon | None = Field(
        None, description="Short SFT making the second model when mergekit is None."
    )
    t: float | list[float] = Field(0.5, description="SLERP t (a list = per-layer gradient).")


class DPOStep(TrainCommon):
    pairs: str | None = Field(
        None,
        description="prompt/chosen/rejected JSONL or HF dataset dir; when None and an earlier "
        "samples step made preference pairs, those are used.",
    )
    beta: float = Field(0.1, gt=0, le=10, description="DPO beta.")
    n_pairs: int = Field(
        64,
        ge=1,
        description="Pairs trained on: the first of the given or sampled ones, or "
        "this many built offline from Q&A data.",
    )
    k_chunks: int = Field(3, ge=1, le=20, description="Chunks in each grounded prompt.")
    rejected: Literal["model", "paraphrase"] = Field(
        "model", description="Rejected answer: the model's own, or a context-free paraphrase."
    )


class SamplesStep(_Cfg):
    """The model's own answers to training questions, judged against the reference
    (training.samples): SFT examples from right answers, DPO pairs from a right and a wrong
    answer to the same prompt."""

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Store name or GGUF path of the model that answers: the one the next steps "
        "train, run through llama.cpp as the server runs it.",
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Questions to answer: train pairs whose gold excerpt's evidence lines hold "
        "the reference's identifiers (others are skipped). None = every such pair.",
    )
    candidates: int = Field(
        5,
        ge=1,
        le=32,
        description="Answers per question: the greedy one and the rest sampled (1: the greedy "
        "answer only, for sft.own_answers: greedy).",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        le=2,
        description="Temperature of the sampled answers (None = the settings' "
        "retrieval.answer_candidate_temperature).",
    )
    max_tokens: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="Tokens per answer (None = the settings' retrieval.answer_max_tokens); an "
        "answer cut at this length is judged, and taught, up to its last whole sentence.",
    )
    k_chunks: int = Field(3, ge=1, le=20, description="Excerpts per prompt (gold + distractors).")
    n_ctx: int = Field(2048, ge=256, le=131072, description="llama.cpp context for answering.")
    threads: int | None = Field(
        None, ge=1, le=512, description="llama.cpp threads (None = the settings' model.n_threads)."
    )
    seed: int = Field(0, description="Random seed (question order, excerpt order, sampling).")


class SFTStep(TrainCommon):
    rag: bool = Field(True, description="Retrieval-augmented finetuning (chunks in the prompt).")
    k_chunks: int = Field(3, ge=1, le=20, description="Chunks per example (gold + distractors).")
    p_gold_missing: float = Field(0.15, ge=0, le=1, description="Share with the gold removed.")
    target: Literal["reference", "extractive", "grounded"] = Field(
        "reference",
        description="Answer target: the reference answer; 'extractive' = gold-chunk sentences "
        "verbatim; 'grounded' = one reference sentence naming the exact identifiers the gold "
        "chunk holds (pairs naming none are skipped).",
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many examples.")
    require_identifiers: bool = Field(
        False,
        description="Closed-book SFT (rag off) on only the pairs whose reference answer names "
        "an identifier (a code span, path, flag, parameter or number): the pairs that teach "
        "the corpus's exact names, at ~60% of the tokens of all pairs.",
    )
    recite_docs: int = Field(
        0,
        ge=0,
        le=10,
        description="Closed-book SFT (rag off): also teach the documentation itself, each "
        "chunk of the served index this many times an epoch as a question naming its page and "
        "section, answered by the chunk's text (0 = off): the facts no Q&A pair states.",
    )
    qa_pairs: bool = Field(
        True,
        description="Train on the Q&A pairs; off (closed-book, with recite_docs): only on the "
        "recited documentation.",
    )
    block_attention: bool = Field(
        False,
        description="Train with the attention the server's unit KV caches give "
        "(retrieval.kv_cache, off by default): each evidence line sees the prompt before the "
        "evidence and itself, the question and answer see everything (training/blocks.py). "
        "Needs rag and the evidence layout; a model trained so is served with kv_cache on.",
    )
    objective: Literal["labels", "distill"] = Field(
        "labels",
        description="labels: cross-entropy on the completion. distill (needs block_attention): "
        "the KL divergence at every completion token from the starting model's plain-prefill "
        "distribution (a frozen copy, full attention) to the stitched forward pass, so the "
        "model learns to read prompts from unit KV caches as it reads plain ones and keeps "
        "its answers otherwise (training/blocks.py distill_loss).",
    )
    own_answers: Literal["right", "greedy"] = Field(
        "right",
        description="Which of an earlier samples step's answers to train on: its judged-right "
        "answers (answers.jsonl) or every question's greedy answer (greedy.jsonl: what the "
        "model says now, the completions distill matches it on).",
    )

    @model_validator(mode="after")
    def _distill_needs_blocks(self):
        if self.objective == "distill" and not self.block_attention:
            raise ValueError("sft.objective distill needs block_attention: true")
        if self.require_identifiers and self.rag:
            raise ValueError("sft.require_identifiers is for closed-book SFT (rag: false)")
        if self.recite_docs and self.rag:
            raise ValueError("sft.recite_docs is for closed-book SFT (rag: false)")
        if not self.qa_pairs and not (self.recite_docs and not self.rag):
            raise ValueError("sft.qa_pairs false needs closed-book recite_docs (nothing to train)")
        return self


class ExportStep(_Cfg):
    quant: str = Field("Q8_0", description="llama.cpp quantization (Q8_0, Q4_K_M, F16, ...).")
    name: str = Field("docqa-smollm2", description="Model name in the store.")


class GateStep(_Cfg):
    against: str | None = Field(
        None,
        description="The currently published model (None: the one the settings serve, "
        "model.model, read when the gate runs).",
    )
    margin: float = Field(0.02, ge=0, le=1, description="Allowed drop on any metric.")
    qa_limit: int = Field(30, ge=0, description="Held-out Q&A pairs in the gate.")
    mcq_limit: int = Field(30, ge=0, description="Dev MCQ questions in the gate.")
    mcq_rounds: int = Field(1, ge=1, description="MCQ rounds in the gate.")
    facts: bool = Field(True, description="Grounded-fact accuracy in the gate.")
    facts_limit: int | None = Field(None, ge=1, description="Use only the first N fact questions.")
    facts_set: Literal["1", "2", "all"] = Field(
        DEFAULT_FACT_SET,
        description="Grounded-fact questions (eval.qa.FACT_SETS): 1 (34), 2 (66 more, written "
        "later and independently), all (100: the paired test has the most power).",
    )
    enforce: bool = Field(True, description="Refuse to publish when the gate fails.")
    candidate_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings the candidate is served with in the gate, section by section "
        "over the defaults (e.g. {retrieval: {kv_cache: true}} for a model made to be served "
        "from unit KV caches); the published model is served with the defaults.",
    )
    min_gain: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Grounded-fact gain the candidate must show over the published model, "
        "significant by an exact McNemar test over the same questions (p < alpha); None = the "
        "candidate only has to be no worse than the margin. When it does not beat the published "
        "model, the published model is kept and the gate says so.",
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of min_gain's test.")
    mcq_loglik: bool = Field(
        False,
        description="Also score the dev MCQ by the log-likelihood protocol (each option's mean "
        "token log-probability after the question and its retrieved excerpts; deterministic).",
    )


class QuantSelectStep(_Cfg):
    """Several llama.cpp quants of one model, measured and chosen: quality first, then prefill
    speed (training.quants)."""

    quants: list[str] = Field(
        default_factory=lambda: ["Q8_0", "Q4_0"],
        min_length=1,
        description="llama.cpp quantizations to export and measure (Q8_0, Q4_0, Q4_K_M, F16, ...).",
    )
    quality: GateStep = Field(
        default_factory=lambda: GateStep(mcq_limit=0, against=DEFAULT_MODEL),
        description="The gate evaluation of each quant against the reference (``against``, the "
        "published model, whose speed is measured too): a quant keeps quality when no metric "
        "is worse by more than ``margin`` and its grounded facts are not significantly worse "
        "(McNemar p < ``alpha``). ``min_gain`` must stay null: a quant is not asked to beat it.",
    )
    prompt_tokens: int = Field(
        256, ge=8, le=8192, description="Prompt prefilled per speed round (a grounded prompt)."
    )

    @field_validator("quality")
    @classmethod
    def _reference_is_the_embedded_model(cls, v: GateStep) -> GateStep:
        """A ``quality`` block that does not name ``against`` still measures against the
        embedded model the quants are made from (before: GateStep's own default, the model
        served by default, took its place) and asks no MCQ unless told to."""
        updates = {}
        if "against" not in v.model_fields_set:
            updates["against"] = DEFAULT_MODEL
        if "mcq_limit" not in v.model_fields_set:
            updates["mcq_limit"] = 0
        return v.model_copy(update=updates) if updates else v

    decode_tokens: int = Field(32, ge=1, le=4096, description="Tokens decoded per speed round.")
    rounds: int = Field(3, ge=1, le=50, description="Speed rounds; the medians are kept.")
    min_speedup: float = Field(
        0.05,
        ge=0,
        le=10,
        description="A quant that keeps quality replaces the published model only when it "
        "prefills faster by at least this share (0.05 = 5%): a smaller gap is measurement noise "
        "on a shared machine.",
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="llama.cpp threads (None = the settings' model.n_threads)."
    )

    @model_validator(mode="after")
    def _no_min_gain(self) -> QuantSelectStep:
        if self.quality.min_gain is not None:
            raise ValueError("quant_select.quality.min_gain must be null (quants keep quality)")
        return self


class PublishStep(_Cfg):
    store_dir: str | None = Field(
        None,
        description="Model store directory; None = the settings' model.store_dir (the store "
        "the server reads).",
    )
    name: str | None = Field(
        None, description="Store name; None = the export step's ``name``.", min_length=1
    )
    server: str | None = Field(None, description="Running docqa URL to hot-reload.")
    admin_key_env: str = Field("DOCQA_ADMIN_KEY", description="Env var with the admin key.")


class EmbedderStep(_Cfg):
    """Contrastive finetuning of the retrieval embedder on the train pairs (training.embedder)."""

    base: str = Field(
        "all-minilm-l6-v2", min_length=1, description="Embedder to start from (name or folder)."
    )
    docs: str | None = Field(None, description="Corpus the pairs are about (None = Nitro docs).")
    chunk_tokens: int = Field(300, ge=16, le=8192, description="Chunk size, as the index uses.")
    chunk_overlap: int = Field(30, ge=0, le=4096, description="Chunk overlap, as the index uses.")
    limit: int | None = Field(None, ge=1, description="Use at most this many train pairs.")
    hard_negatives: bool = Field(True, description="Add one BM25-mined negative per question.")
    epochs: float = Field(1.0, gt=0, le=100, description="Epochs (ignored when max_steps set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps (-1 = epochs).")
    batch_size: int = Field(
        32, ge=2, le=4096, description="Questions per batch (in-batch negatives)."
    )
    learning_rate: float = Field(3e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.1, ge=0, le=0.5, description="Linear warm-up share of steps.")
    scale: float = Field(20.0, gt=0, le=1000, description="Cosine similarity scale in the loss.")
    max_seq_length: int = Field(256, ge=16, le=8192, description="Max word pieces per text.")
    seed: int = Field(0, description="Random seed.")
    evaluate: bool = Field(True, description="Measure held-out recall before and after.")


class RerankerStep(_Cfg):
    """Cross-encoder reranker finetuning on the train pairs (training.reranker)."""

    base: str = Field(
        "all-minilm-l6-v2",
        min_length=1,
        description="Model to start from: the shipped embedder's BERT (a one-logit head is "
        "added) or a cross-encoder folder.",
    )
    embedder: str = Field(
        "all-minilm-l6-v2",
        min_length=1,
        description="Embedder of the index whose fused order gives the hard negatives and the "
        "held-out comparison (the served one).",
    )
    docs: str | None = Field(None, description="Corpus the pairs are about (None = Nitro docs).")
    chunk_tokens: int = Field(300, ge=16, le=8192, description="Chunk size, as the index uses.")
    chunk_overlap: int = Field(30, ge=0, le=4096, description="Chunk overlap, as the index uses.")
    limit: int | None = Field(None, ge=1, description="Use at most this many train pairs.")
    limit_examples: int | None = Field(
        None, ge=1, description="Train on at most this many labelled examples (a random sample)."
    )
    negatives: int = Field(
        3, ge=1, le=64, description="Hard negatives per question: best-ranked non-gold fused."
    )
    epochs: float = Field(1.0, gt=0, le=100, description="Epochs (ignored when max_steps set).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps (-1 = epochs).")
    batch_size: int = Field(8, ge=1, le=1024, description="Questions per step.")
    learning_rate: float = Field(3e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.1, ge=0, le=0.5, description="Linear warm-up share of steps.")
    max_length: int = Field(
        256, ge=16, le=512, description="Word pieces per (question, chunk) pair (chunk cut)."
    )
    candidates: int = Field(
        10, ge=1, le=200, description="Fused candidates reranked in the held-out comparison."
    )
    threads: int | None = Field(
        1, ge=1, le=1024, description="torch CPU threads (None = torch's default)."
    )
    seed: int = Field(0, description="Random seed.")
    evaluate: bool = Field(True, description="Compare fused and reranked held-out order.")


class Recipe(_Cfg):
    name: str
    description: str = ""
    steps: list[Literal[STEPS]] = Field(..., min_length=1)  # type: ignore[valid-type]
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Artifacts given rather than made by a step, kind -> path "
        "(e.g. model: an HF folder), available to every step.",
    )
    base: BaseStep = Field(default_factory=BaseStep)
    synth: SynthStep = Field(default_factory=SynthStep)
    merge: MergeStep = Field(default_factory=MergeStep)
    samples: SamplesStep = Field(default_factory=SamplesStep)
    dpo: DPOStep = Field(default_factory=DPOStep)
    sft: SFTStep = Field(default_factory=SFTStep)
    export: ExportStep = Field(default_factory=ExportStep)
    quant_select: QuantSelectStep = Field(default_factory=QuantSelectStep)
    gate: GateStep = Field(default_factory=GateStep)
    publish: PublishStep = Field(default_factory=PublishStep)
    embedder: EmbedderStep = Field(default_factory=EmbedderStep)
    reranker: RerankerStep = Field(default_factory=RerankerStep)


RECIPES = Path(__file__).resolve().parent / "recipes"


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe (a path, or a name in ``recipes/``): its sections against
    the step configs, and its plan (every step's needs provided by an earlier step or a given
    input; :class:`training.registry.RecipeError` names the step and the need otherwise)."""
    from training.registry import plan

    p = Path(path)
    if not p.exists() and (RECIPES / f"{path}.yaml").exists():
        p = RECIPES / f"{path}.yaml"
    recipe = Recipe.model_validate(yaml.safe_load(p.read_text()))
    plan(recipe)
    return recipe
