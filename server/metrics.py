"""Prometheus metrics (GET /metrics, text format), one registry per process.

Counters and histograms are updated where the work happens (the access-log middleware for
requests, the response writers for tokens and timings, the index service for retrieval); the
gauges that describe state (queue depth, index size, model load time) are read from the
services when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter(
    "docqa_requests",
    "HTTP requests by route template and status.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "docqa_request_duration_seconds",
    "HTTP request latency (to the end of the body).",
    ["route"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "docqa_prompt_tokens", "Prompt tokens of finished generations.", ["kind"], registry=REGISTRY
)
COMPLETION_TOKENS = Counter(
    "docqa_completion_tokens", "Generated tokens.", ["kind"], registry=REGISTRY
)
TTFT = Histogram(
    "docqa_time_to_first_token_seconds",
    "From submitting a generation (queue wait included) to its first text.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
DECODE = Histogram(
    "docqa_decode_seconds_per_token",
    "Mean time per generated token after the first, one observation per generation.",
    buckets=_PER_TOKEN,
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "docqa_queue_rejections",
    "Requests refused with 503 server_busy (queue full).",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "docqa_queue_depth", "Generations admitted (running + waiting).", registry=REGISTRY
)
RETRIEVAL = Histogram(
    "docqa_retrieval_seconds",
    "Index search latency (hybrid BM25 + dense, fused).",
    buckets=_LATENCY,
    registry=REGISTRY,
)
INDEX_DOCUMENTS = Gauge(
    "docqa_index_documents", "Documents in the served index.", registry=REGISTRY
)
INDEX_CHUNKS = Gauge("docqa_index_chunks", "Chunks in the served index.", registry=REGISTRY)
MODEL_LOAD = Gauge(
    "docqa_model_load_seconds",
    "Load time of the model serving now.",
    ["model"],
    registry=REGISTRY,
)


def observe_request(route: str, status: int, seconds: float, error_code: str | None) -> None:
    REQUESTS.labels(route, str(status)).inc()
    REQUEST_SECONDS.labels(route).observe(seconds)
    if error_code == "server_busy":
        REJECTIONS.inc()


def observe_generation(
    kind: str, prompt_tokens: int, completion_tokens: int, ttft: float | None, decode: float | None
) -> None:
    PROMPT_TOKENS.labels(kind).inc(prompt_tokens)
    COMPLETION_TOKENS.labels(kind).inc(completion_tokens)
    if ttft is not None:
        TTFT.observe(ttft)
    if decode is not None:
        DECODE.observe(decode)


def render(services) -> tuple[bytes, str]:
    """The text exposition, with the state gauges read from ``services`` (a
    ``server.state.Services``, None while loading)."""
    if services is not None:
        rt = services.models.current()
        QUEUE_DEPTH.set(rt.busy)
        MODEL_LOAD.clear()
        MODEL_LOAD.labels(rt.id).set(rt.load_seconds)
        if services.index is not None:
            index = services.index.index
            INDEX_CHUNKS.set(len(index.chunks))
            INDEX_DOCUMENTS.set(len({c.path for c in index.chunks}))
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
