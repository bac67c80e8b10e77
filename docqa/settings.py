"""One settings tree for the whole product.

Layering (lowest to highest): field defaults, a YAML file (``--config`` or
``DOCQA_CONFIG``), ``DOCQA_*`` environment variables (nested with ``__``, e.g.
``DOCQA_SERVER__PORT=9000``), then explicit overrides (CLI flags).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# grounded prompt layouts (retrieval.user_template): the evidence lines alone (the default), or
# the numbered excerpts with the evidence lines after them (needed by chunk KV caches)
EVIDENCE_TEMPLATE = "Documentation excerpts:\n{evidence}\n\nQuestion: {question}"
EXCERPTS_TEMPLATE = (
    "Documentation excerpts:\n{context}\n\nMost relevant lines:\n{evidence}\n\nQuestion: {question}"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestLimits(_Section):
    """Bounds on what one request may ask of the server (see docs/security.md)."""

    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=1_073_741_824,
        description="Largest request body in bytes; a bigger one is refused with 413 while it "
        "is still arriving (it is never read whole).",
    )
    max_messages: int = Field(
        256, ge=1, le=100_000, description="Most messages one chat completion request may send."
    )
    max_document_bytes: int = Field(
        524_288,
        ge=1,
        le=1_073_741_824,
        description="Largest document POST /v1/documents accepts (bytes of its text); its "
        "embedding runs on the request (a 2 MB document took 97 s on 2 cores).",
    )
    max_document_chunks: int = Field(
        500, ge=1, le=1_000_000, description="Most chunks one ingested document may make."
    )
    grammar_max_bytes: int = Field(
        65_536,
        ge=64,
        le=10_000_000,
        description="Largest GBNF grammar (given as 'grammar' or made from a response_format "
        "JSON schema), in bytes.",
    )
    grammar_max_rules: int = Field(
        1_000, ge=1, le=1_000_000, description="Most rules a grammar may define."
    )
    grammar_max_symbols: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="Most grammar symbols after repetitions are expanded ({m,n} copies its "
        "item): a bound on the work llama.cpp does to compile it.",
    )


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 = any free).")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1 requests must send 'Authorization: Bearer <key>'."
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key for /admin endpoints (model reload). Separate from api_key, never "
        "falls back to it; unset = admin endpoints are off (403).",
    )
    allow_insecure_writes: bool = Field(
        False,
        description="Start without api_key while listening beyond loopback (anyone who can "
        "reach the port may then add and delete documents). Off: such a start is refused.",
    )

    @model_validator(mode="after")
    def _retry_after_bounds(self):
        if self.retry_after_s > self.retry_after_max_s:
            raise ValueError(
                f"retry_after_s ({self.retry_after_s}) is above retry_after_max_s "
                f"({self.retry_after_max_s})"
            )
        return self

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _blank_key_is_unset(cls, v):
        """An empty key (``DOCQA_SERVER__ADMIN_KEY=`` from an unset shell variable) is no key:
        admin endpoints off, and no api_key beyond loopback refused at start. Before, it
        switched the key check off, and every route was open."""
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        return None if isinstance(raw, str) and not raw.strip() else v

    max_queue: int = Field(
        16, ge=1, le=4096, description="Requests admitted (running + waiting) before 503."
    )
    max_wait_s: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="Deadline admission: refuse (503 + Retry-After) a request whose answer "
        "would take longer than this many seconds: the requests admitted ahead of it and its "
        "own, each at the engine's recent busy seconds per answer. Under overload the queue "
        "then holds what can be answered in time, fewer places when answers get slower. "
        "An idle engine always admits. 0 = no deadline of its own (server.wait_bound "
        "decides). Local engines only.",
    )
    wait_bound: Literal["queue", "off"] = Field(
        "queue",
        description="With no max_wait_s: 'queue' refuses (503 + Retry-After) a request whose "
        "predicted wait exceeds what the queue implies, max_queue answers at one lone "
        "answer's service time, so admitted requests are answered within that bound at p95 "
        "even when answers slow down under load (the queue then holds fewer places); 'off' "
        "counts places only (max_queue). Predictions are taken at their 95th percentile: "
        "scaled by the admission's own recent misses, or widened by the spread of the lone "
        "answers' times. A request that finds one of the engine's batch lanes free "
        "(fewer admitted than its slots) waits behind no one and is always admitted. Local "
        "engines only.",
    )
    retry_after_s: int = Field(
        2,
        ge=1,
        le=3600,
        description="Shortest Retry-After (seconds) sent with a queue-full 503; once answers "
        "have been finishing, half the time the full queue takes to drain at their rate, "
        "times a backoff while more than 4 requests are refused per admission (over 30 s).",
    )
    retry_after_max_s: int = Field(
        30, ge=1, le=3600, description="Longest Retry-After (seconds) sent with a queue-full 503."
    )
    reload_drain_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On a model reload, how long requests still running on the old model may "
        "take to finish before they are cancelled and the old model is closed.",
    )
    keep_alive_s: float = Field(
        75.0,
        ge=1,
        le=3600,
        description="How long an idle keep-alive connection stays open. Longer than clients' "
        "own idle expiry (httpx and the openai SDK: 5 s) so a client never sends a request on "
        "a connection the server is closing at that moment (a reset, not an HTTP error).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS allow-list, e.g. "
        "['http://localhost:1420'] for a web UI); empty = none. A write request carrying an "
        "Origin header not in this list is refused (403).",
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="Request limits: body, messages, documents, grammars (server.limits.*).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level."
    )
    data_dir: Path = Field(
        Path("var/data"),
        description="Where the server keeps its own state: the agent page's ticket queue "
        "(ticket_queue.sqlite3). Relative paths resolve against the working directory.",
    )
    max_upload_bytes: int = Field(
        5 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest file one upload may carry (POST /v1/documents multipart, "
        "POST /v1/tickets/queue); larger is a 413.",
    )
    web_ui: bool = Field(True, description="Serve the support agents' page at '/'.")
    unknown_model: Literal["error", "default"] = Field(
        "error",
        description="A request naming a model docqa does not serve (e.g. 'gpt-4o'): 'error' "
        "answers 404 model_not_found listing what is served; 'default' serves it with the "
        "default model (chat and completions: as if no model was named; embeddings: the "
        "embedder). GET /v1/models lists only real ids either way.",
    )
    metrics: bool = Field(
        True, description="Serve GET /metrics (Prometheus text format; behind api_key if set)."
    )


class ModelSettings(_Section):
    model: str = Field(
        "smollm2-135m-instruct-f16",
        min_length=1,
        description="Model to serve: a store name, the embedded model (smollm2-135m-instruct, "
        "the shipped Q4_1), a quant made from it on first use (smollm2-135m-instruct-f16, the "
        "default: the Q4_1's own weights in half precision, ~1 s to make, 271 MB; prompts "
        "prefill ~2x faster; chosen by the smollm2-fast recipe's gate under the served "
        "defaults: grounded facts 33 vs 32 of 100, QA F1 0.274 both over 266 pairs; "
        "smollm2-135m-instruct-q8_0: faster prefill and batching), or a GGUF path "
        "(docs/benchmarks.md, Quantization).",
    )
    store_dir: Path = Field(
        Path("models/store"), description="Model store directory (GGUF + provenance JSON)."
    )
    n_ctx: int = Field(4096, ge=128, le=262144, description="Context window in tokens.")
    n_batch: int = Field(512, ge=1, le=16384, description="Prompt-processing batch size.")
    n_threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads for generation (None = all cores)."
    )
    n_gpu_layers: int = Field(
        0, ge=-1, le=10000, description="Layers offloaded to the GPU (-1 = all, 0 = CPU only)."
    )
    n_parallel: int = Field(
        0,
        ge=0,
        le=256,
        description="Sequences decoded together (continuous batching); 1 = one request at a "
        "time. Each sequence gets n_ctx tokens of a unified KV cache. 0 = auto (the default): "
        "8, or as many as fit when (n + 2) x n_ctx KV cells would take more than a quarter of "
        "the machine's memory (server.runtime.parallel_slots). With batching, identical "
        "greedy requests can differ on a near-tie (llama.cpp rounds differently for "
        "different batch shapes): set 1 for bit-reproducible answers (docs/benchmarks.md).",
    )
    chat_format: str | None = Field(
        None,
        description="A llama.cpp chat format by name (chatml, llama-2, llama-3, "
        "mistral-instruct, gemma, zephyr, ...) for a model whose GGUF has no chat template or "
        "a wrong one; None uses the GGUF's own template. An unknown name stops the start "
        "with the list of known ones.",
    )
    default_max_tokens: int = Field(
        512, ge=1, le=262144, description="max_tokens when a request gives none."
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Extra model names -> a served id (the model's id, the retrieval id "
        "'docqa' or the embedder's name), e.g. {'gpt-4o': 'docqa', 'text-embedding-3-small': "
        "'all-minilm-l6-v2'}, for clients that hard-code OpenAI names.",
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URLs (e.g. http://gpu1:8000/v1) to generate "
        "through instead of loading a GGUF (vLLM, llama.cpp's server, another docqa); "
        "requests go to the least busy healthy one. Empty = local model. 'model' then names "
        "the remote model (the default name: the first id an endpoint lists).",
    )
    endpoint_api_key: SecretStr | None = Field(
        None, description="Bearer key sent to the remote endpoints (None = none)."
    )
    endpoint_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest wait for one remote generation request."
    )
    endpoint_health_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="How often each remote endpoint is health-checked (GET /models); an "
        "endpoint that fails a request or a check is skipped until a check passes.",
    )


class EmbedderSettings(_Section):
    model: str = Field(
        "all-minilm-l6-v2",
        min_length=1,
        description="Embedder: 'all-minilm-l6-v2' (embedded) or a local sentence-transformers dir.",
    )
    device: str = Field("cpu", description="torch device for the embedder.")
    batch_size: int = Field(64, ge=1, le=4096, description="Embedding batch size.")
    enabled: bool = Field(True, description="Load the embedder (needed by /v1/embeddings, RAG).")
    query_backend: Literal["auto", "onnx-int8", "torchscript", "eager"] = Field(
        "auto",
        description="How one search query is embedded: 'onnx-int8' (ONNX Runtime, int8 weights, "
        "~3x faster on CPU, cosine >= 0.98 to fp32), 'torchscript' or 'eager' (fp32); 'auto' "
        "tries them in that order. Documents are always embedded in fp32.",
    )
    query_threads: int | None = Field(
        None, ge=1, le=256, description="Threads for one query embedding (None = min(4, cores))."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where the exported query encoder is cached (None = $DOCQA_CACHE_DIR/"
        "embedders, default ~/.cache/docqa/embedders).",
    )


class PromptExample(_Section):
    question: str = Field(..., min_length=1, max_length=2000, description="The question.")
    evidence: str = Field(
        ...,
        min_length=1,
        max_length=4000,
        description="Its evidence lines, as the prompt shows them (each ending in its tag [n]).",
    )
    answer: str = Field(..., min_length=1, max_length=2000, description="The answer to show.")
    names: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Its own names and values (made-up product, options, numbers): barred from "
        "a real answer unless the real evidence or question holds them, so the model follows "
        "the example's form without copying its content.",
    )


# a worked example shown before the question (retrieval.examples): a made-up product, so no
# fact of it can answer a question about the real docs; an answer naming its product or option
# (BUILTIN_EXAMPLE_IDS) is caught as echoed scaffolding (retrieval.answers)
BUILTIN_EXAMPLE_IDS = ["zorbit", "worker_threads", "worker-threads"]
BUILTIN_EXAMPLES = [
    {
        "question": "Which option sets the number of worker threads in Zorbit, and what is its "
        "default?",
        "evidence": "- `worker_threads` (integer, default: 4): number of threads used for "
        "inference. [1]\nStart the server with `zorbit serve --worker-threads 8` to use eight "
        "threads. [2]",
        "answer": "The `worker_threads` option sets it; its default is 4 [1]. For example, "
        "`zorbit serve --worker-threads 8` starts the server with eight threads [2].",
        "names": ["Zorbit", *BUILTIN_EXAMPLE_IDS, "4", "8", "eight"],
    }
]


class RetrievalSettings(_Section):
    index_dir: Path | None = Field(None, description="Built index directory to serve.")
    docs_dir: Path | None = Field(
        None, description="Docs folder to index at start-up when no index_dir is given."
    )
    rag_model_id: str = Field(
        "docqa", min_length=1, description="Model id that answers with retrieval."
    )
    chunk_tokens: int = Field(300, ge=16, le=8192, description="Chunk size in model tokens.")
    chunk_overlap: int = Field(30, ge=0, le=4096, description="Overlap between chunks (tokens).")
    top_k: int = Field(
        3,
        ge=1,
        le=100,
        description="Chunks put into the prompt (3: the tiny default model answers better from "
        "fewer excerpts; see docs/benchmarks.md).",
    )
    candidates: int = Field(
        30, ge=1, le=1000, description="Candidates taken from each retriever before fusion."
    )
    fusion: Literal["weighted", "rrf"] = Field(
        "weighted",
        description="How BM25 and dense lists merge: 'rrf' (reciprocal rank fusion) or "
        "'weighted' (BM25/max + cosine min-max, by the weights below).",
    )
    rrf_k: int = Field(60, ge=1, le=10000, description="Reciprocal rank fusion constant.")
    mode: Literal["hybrid", "bm25", "dense"] = Field(
        "hybrid", description="Retrievers used: both fused ('hybrid'), or BM25 or dense alone."
    )
    bm25_weight: float = Field(1.0, ge=0, le=100, description="Weight of BM25 in fusion.")
    dense_weight: float = Field(0.3, ge=0, le=100, description="Weight of dense in fusion.")
    question_dense_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Weight of dense in fusion when the index carries attached questions "
        "(multi-vector dense is much stronger then; see docs/retrieval.md).",
    )
    faiss_index: Literal["flat", "hnsw", "ivf"] = Field(
        "flat", description="FAISS index type (flat inner product; HNSW/IVF for big corpora)."
    )
    reranker: str | None = Field(
        None,
        description="Local cross-encoder folder that reorders the fused candidates before the "
        "top_k cut, and scores POST /v1/rerank (None = off: fused order, and /v1/rerank by the "
        "embedder's cosine). Made by `docqa train rebuild --recipe reranker-nitro` (its "
        "reranker/model folder); not shipped, so off by default (docs/benchmarks.md).",
    )
    rerank_candidates: int = Field(
        10,
        ge=1,
        le=200,
        description="Fused candidates the reranker scores per query (the top_k are kept; never "
        "fewer than top_k). Each costs one cross-encoder forward pass on the query's path.",
    )
    abstain_threshold: float = Field(
        0.25,
        ge=-1,
        le=1,
        description="Abstain when the best dense cosine similarity is below this.",
    )
    answer_reserve: int = Field(
        384, ge=16, le=65536, description="Tokens reserved for the answer in the context budget."
    )
    examples: list[PromptExample] = Field(
        default_factory=list,
        max_length=4,
        description="Worked examples shown to the model before a grounded question, each as "
        "an earlier user turn (the user_template with its question and evidence lines) and "
        "the assistant's answer: a demonstration of answering from the lines. Part of the "
        "prompt's shared prefix (cached). [] = none (the default). BUILTIN_EXAMPLES holds one "
        "about a made-up product: more facts stated and fewer unclean answers, but answers cite "
        "the wrong excerpt more often (docs/benchmarks.md, session 13).",
    )
    system_prompt: str = Field(
        "You are docqa, a support assistant. Answer the question using only the numbered "
        "documentation excerpts. Quote exact names, values and commands from them, and cite "
        "the excerpts you used as [1], [2]. If the excerpts do not contain the answer, say "
        "that the documentation does not cover it.",
        min_length=1,
        description="System prompt for answers with retrieval.",
    )
    user_template: str = Field(
        EVIDENCE_TEMPLATE,
        min_length=1,
        description="User turn with retrieval; must contain {question} and {context} or "
        "{evidence}. {context} is replaced by the numbered excerpts (as many as fit the "
        "context), {evidence} by the evidence lines picked from them (see evidence_units), each "
        "tagged [n] with its excerpt's number. Without {context} the model reads the evidence "
        "lines alone (the 'evidence' layout: short prompts, which the 135M model answers best "
        "from; docs/benchmarks.md) and the excerpts are only returned as sources.",
    )
    stop: list[str] = Field(
        default_factory=lambda: ["\nQuestion:", "Documentation excerpts:", "Most relevant lines:"],
        description="Extra stop strings for grounded answers: where a small model starts "
        "echoing the prompt's scaffolding, the answer ends.",
    )
    drop_scaffolding: bool = Field(
        True,
        description="Grounded answers (chat with retrieval, ticket replies) leave out fenced "
        "code blocks that stay empty or hold only comment lines (a small model's echo of an "
        "excerpt header, '```bash [1]' with nothing in it), and a first line that echoes the "
        "prompt's question line (a stop string such as '\\nQuestion:'); a streamed block is "
        "held back until it has a line of code. The rest of the text is the model's own.",
    )
    loop_repeats: int = Field(
        3,
        ge=0,
        le=20,
        description="Loop guard for grounded answers (chat with retrieval, ticket replies): "
        "the answer ends where its text becomes one piece repeated this many times in a row "
        "('/v1/v1/v1', 'The answer is: The answer is: ...') or a run of four citations "
        "('[4] [1] [5] [2]'), keeping the first copy; a small model's loops end there instead "
        "of at max_tokens. Streamed answers are held back by up to 48 x this many characters "
        "so that a loop can still be cut. 0 = off.",
    )
    rerank_max_documents: int = Field(
        256, ge=1, le=10000, description="Most documents one POST /v1/rerank may score."
    )
    evidence_units: int = Field(
        3,
        ge=0,
        le=20,
        description="Evidence lines (sentences, list items, table rows, code blocks) picked "
        "from the retrieved excerpts as answering the question: shown to the model in "
        "{evidence} and returned as sources[].evidence with offsets. 0 = off.",
    )
    cad_alpha: float = Field(
        0.0,
        ge=0,
        le=5,
        description="Context-aware decoding strength for grounded answers (chat with "
        "retrieval, ticket replies): each token is sampled from (1+a)*logit(y | excerpts, "
        "question) - a*logit(y | question), which favours what the excerpts say over what the "
        "model would say without them (Shi et al. 2023). 0 = off (plain decoding); 0.5 to 1 "
        "is the usual range. Costs a second, shorter prompt and a second sequence per request "
        "(two batch slots with n_parallel > 1). Overridden per request by cad_alpha.",
    )
    evidence_bias: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Logit bias added, for grounded answers (chat with retrieval, ticket "
        "replies), to every token of the evidence lines that the prompt without them (system "
        "prompt, template, question) does not contain: a static, free approximation of "
        "context-aware decoding that works with chunk KV caches and batching. 0 = off. "
        "Overridden per request by evidence_bias. Measured: docs/benchmarks.md.",
    )
    answer_candidates: int = Field(
        1,
        ge=1,
        le=8,
        description="Answers generated for a grounded question (chat, ticket replies): above "
        "1, the usual answer plus answer_candidates - 1 sampled at "
        "answer_candidate_temperature, run side by side (extra queue places, taken only "
        "from the queue's lower half: under load fewer candidates), and the one best "
        "grounded in the evidence lines is returned (retrieval.answers.grounding_score: its "
        "words found in them, minus invented identifiers, minus echoed scaffolding; a ticket "
        "reply: the one that passes its automatic-reply checks, then the best supported). A "
        "streamed answer then arrives whole, once chosen. 1 = off. Overridden per request "
        "by answer_candidates. Measured: docs/benchmarks.md.",
    )
    answer_candidate_temperature: float = Field(
        0.7,
        ge=0.05,
        le=2.0,
        description="Sampling temperature of the extra answer candidates "
        "(retrieval.answer_candidates).",
    )
    sources: Literal["cited", "supported"] = Field(
        "supported",
        description="Which retrieved excerpts a grounded answer's sources list: 'cited', those "
        "its [n] tags name (all of them when it names none); 'supported', those and, when "
        "another excerpt holds more of the answer's own words (retrieval.answers.words_held) "
        "than any it cited, that one too (marked cited: false). Small models often tag the "
        "wrong excerpt. "
        "Measured: docs/benchmarks.md.",
    )
    cad_context_free: Literal["messages", "template"] = Field(
        "template",
        description="The prompt context-aware decoding contrasts with: 'template', the grounded "
        "prompt with no excerpts and no evidence lines, so that only the excerpts differ (the "
        "template's own words are not amplified); 'messages', the user's chat as sent (no "
        "system prompt, template or excerpts). Measured: docs/benchmarks.md, CAD sweep.",
    )
    answer_max_tokens: int = Field(
        256,
        ge=1,
        le=262144,
        description="max_tokens of a grounded answer (chat with retrieval) when the request "
        "gives none: answers quote a few excerpt lines, and 256 tokens bound one request's "
        "generation time (model.default_max_tokens applies to plain chat).",
    )
    abstain_message: str = Field(
        "I could not find this in the documentation, so I can't answer it reliably.",
        min_length=1,
        description="Answer given when retrieval evidence is below abstain_threshold.",
    )
    allowed_roots: list[Path] = Field(
        default_factory=list, description="Server paths POST /v1/documents may ingest from."
    )
    kv_cache: bool = Field(
        True,
        description="Chunk KV cache (TurboRAG): the KV of each excerpt (in the evidence "
        "layout: of each evidence unit) is computed once after the system prompt and saved "
        "(docqa index kv, or on first use), and a grounded request loads it instead of "
        "prefilling it (only the labels, the question and scaffolding are prefilled, and "
        "kv_recompute's tokens): a grounded answer's first token in ~2.1x a bare one's "
        "instead of ~5.6x. Cached pieces attend to the system prompt and themselves, not to "
        "each other; alone that costs QA F1 (0.250 vs 0.280 over 266 held-out pairs, p < "
        "0.001), with kv_recompute 2 it is within noise of plain prefill (0.277, p = 0.67; "
        "grounded facts 31 vs 37 of 100, p = 0.29; docs/benchmarks.md, session 17). About "
        "5.5 GB of disk per 1,000 chunks (f16 KV). Bad or other-model cache files are "
        "logged and ignored.",
    )
    kv_cache_dir: Path | None = Field(
        None,
        description="Where chunk KV caches are kept (None = beside the index: <index_dir>.kv).",
    )
    kv_recompute: int = Field(
        2,
        ge=0,
        le=1024,
        description="With kv_cache: the first N tokens of every cached piece after the first "
        "(evidence line or excerpt), and its tag, are evaluated again once the pieces are "
        "placed, attending to the pieces before them (a CacheBlend-style partial recompute): "
        "the QA F1 the caches lose without it (2: ~12 tokens, +40 ms on 2 cores; "
        "docs/benchmarks.md, session 17). 0 = off.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host/db) of a shared store: "
        "documents, chunks, attached questions and embeddings live there, every replica keeps "
        "its in-memory BM25 + FAISS structures and refreshes them when the store changes. "
        "None = the local index_dir.",
    )
    db_pool_size: int = Field(
        4, ge=1, le=256, description="Most connections one server keeps to the shared store."
    )
    db_refresh_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Fallback version check of the shared store (besides LISTEN/NOTIFY), "
        "seconds between checks.",
    )
    db_retry_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Seconds between connection attempts while the shared store is "
        "unreachable; also the Retry-After of a document change refused meanwhile.",
    )
    db_connect_timeout_s: float = Field(
        5.0,
        ge=1,
        le=600,
        description="Longest wait for a connection to the shared store (opening it, taking "
        "one from the pool, the change listener's).",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self):
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens "
                f"({self.chunk_tokens})"
            )
        return self

    @field_validator("user_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        if "{question}" not in v or ("{context}" not in v and "{evidence}" not in v):
            raise ValueError("must contain {question} and {context} or {evidence}")
        return v

    @property
    def shows_excerpts(self) -> bool:
        """Whether grounded prompts carry the excerpts themselves ({context}), or only their
        evidence lines."""
        return "{context}" in self.user_template


class TicketSettings(_Section):
    examples: bool = Field(
        False,
        description="Show retrieval.examples (the worked examples) before each ticket "
        "question too. Off: with the built-in example, 3 of 30 dev tickets were answered "
        "automatically instead of 9 (its short form fails the reply's support checks; "
        "docs/benchmarks.md, session 13).",
    )
    min_similarity: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="Below this best dense similarity a question goes to a human (0.3: the "
        "evidence checks below decide the rest; 0.35 before them).",
    )
    min_support: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the reply's content words found in its cited sources to count as "
        "supported.",
    )
    auto_threshold: float = Field(
        0.5, ge=0, le=1, description="Confidence at or above which a reply goes out automatically."
    )
    out_of_scope: list[str] = Field(
        default_factory=lambda: [
            "billing",
            "invoice",
            "refund",
            "payment",
            "charge",
            "subscription",
            "pricing",
            "price",
            "account",
            "password",
            "login",
            "legal",
            "lawyer",
            "gdpr",
            "contract",
            "lawsuit",
            "cancel my",
            "credit card",
        ],
        description="Words marking a ticket out of the docs' scope (billing, accounts, legal).",
    )
    max_tokens: int = Field(200, ge=16, le=4096, description="Tokens per answer.")
    max_questions: int = Field(4, ge=1, le=20, description="Questions answered per ticket.")
    queue_lease_s: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="The ticket queue's claim on an item being drafted is a lease: the "
        "drafting server renews it every third of this, and an item whose lease ran out (its "
        "server stopped mid-draft) goes back to 'new'. Several servers can share one queue "
        "file; none drafts an item another holds, and a draft whose claim was lost is not "
        "stored over the new holder's.",
    )
    context_sentences: int = Field(
        2,
        ge=0,
        le=10,
        description="A question inside a ticket that leans on what comes before it (short, "
        "or with a pronoun: 'We run Nitro behind a proxy. Which address should it be?') or "
        "finds nothing alone (best similarity under min_similarity) is retrieved, and read by "
        "the model, with the ticket's subject and this many sentences before it; its evidence "
        "lines are picked for that text too. 0 = every question alone.",
    )
    fuse_dense: bool = Field(
        True,
        description="Retrieve a ticket question by the reciprocal rank fusion (retrieval.rrf_k, "
        "retrieval.candidates per list) of the hybrid ranking and the dense-only ranking: "
        "tickets use the customer's words ('describe an uploaded picture'), which the dense "
        "match finds where BM25 matches stray words. Only with retrieval.mode 'hybrid' and no "
        "reranker.",
    )
    min_evidence_coverage: float = Field(
        0.3,
        ge=0,
        le=1,
        description="An automatic reply needs evidence lines that speak to its question: the "
        "IDF-weighted share of the question's content words (with its ticket context) found "
        "in the lines picked for it. Below this the ticket goes to a human.",
    )
    min_evidence_support: float = Field(
        0.5,
        ge=0,
        le=1,
        description="An automatic reply needs its content words in its evidence lines (not "
        "just anywhere in the excerpts): the share found there, below which the ticket goes "
        "to a human. Every identifier, path or number the reply names must be in them too.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DOCQA_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    tickets: TicketSettings = Field(default_factory=TicketSettings)


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - unused
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _deep_drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _deep_drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from YAML, then env, then ``overrides`` (nested dicts; None is skipped)."""
    config = config or os.environ.get("DOCQA_CONFIG")
    data: dict[str, Any] = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return (init_settings, env_settings, _YamlSource(settings_cls, data))

    layered = _Layered(**_deep_drop_none(overrides))
    return Settings.model_validate(layered.model_dump())
