"""`docqa train reranker` and reranking, for real on the fixture docs: a cross-encoder finetuned
from the shipped MiniLM (a few CPU steps) learns (loss falls, weights change, provenance
written), reorders the fused candidates so that the gold chunk comes first where the fused
order does not, and scores POST /v1/rerank on a real server (Jina/Cohere shape, 0..1)."""

from __future__ import annotations

import httpx
import pytest

from docqa.data import load_qa
from docqa.provenance import read_provenance
from docqa.settings import Settings
from retrieval.builder import build_index, default_tokenizer
from retrieval.embedder import Embedder
from retrieval.factory import build_retriever
from retrieval.questions import retrieval_devset
from training.config import Recipe, RerankerStep, SynthStep
from training.rebuild import run_step
from training.reranker import rerank_examples

from .conftest import FIXTURES

QA = FIXTURES / "zephyrd_qa.csv"
CFG = dict(
    docs=str(FIXTURES / "docs"),
    chunk_tokens=48,
    chunk_overlap=8,
    negatives=5,
    max_steps=48,
    batch_size=4,
    learning_rate=2e-4,
    warmup_ratio=0.1,
    max_length=128,
    candidates=5,
    threads=1,
    seed=0,
)


@pytest.fixture(scope="module")
def emb():
    return Embedder(query_backend="eager")


@pytest.fixture(scope="module")
def fixture_index(emb):
    return build_index(
        FIXTURES / "docs",
        emb,
        default_tokenizer(),
        size=48,
        overlap=8,
        progress=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("reranker-run")
    recipe = Recipe(
        name="reranker-test",
        steps=["reranker"],
        synth=SynthStep(csv=str(QA)),
        reranker=RerankerStep(**CFG),
    )
    prov = run_step(recipe, "reranker", out)
    return out / "reranker" / "model", prov


def _rank(hits, gold) -> int | None:
    return next((i for i, h in enumerate(hits, 1) if h.chunk.id in gold), None)


def test_examples_take_hard_negatives_from_the_fused_order(fixture_index, emb):
    ret = build_retriever(fixture_index, Settings(), emb, reranker=False)
    ex = rerank_examples(load_qa(QA), ret, negatives=3)
    by_q = {e.question: e for e in ex}
    assert "What is the capital of France?" not in by_q  # no chunk holds it: dropped
    port = by_q["Which port does the Zephyrd HTTP API listen on?"]
    assert "7431" in fixture_index.chunks[port.positive].text
    for e in ex:
        assert e.positive in e.gold and len(e.negatives) == 3
        assert not set(e.negatives) & e.gold
        fused = [fixture_index.pos[h.chunk.id] for h in ret.search(e.question, 10).hits]
        assert e.negatives == [i for i in fused if i not in e.gold][:3]


def test_loss_falls_weights_change_with_provenance(trained):
    model, prov = trained
    m = prov["metrics"]
    assert read_provenance(model.parent / "provenance.json")["config_hash"] == prov["config_hash"]
    assert m["steps"] == 48 and m["examples"] >= 10
    assert m["loss_last3"] < m["loss_first3"]
    assert m["weight_delta"] > 0
    assert prov["inputs"]["csv"] == str(QA)
    assert (model / "config.json").is_file()


def test_reranker_puts_the_gold_chunk_first_where_the_fused_order_does_not(
    trained, fixture_index, emb
):
    model, _ = trained
    settings = Settings(retrieval={"reranker": str(model), "rerank_candidates": 8})
    fused = build_retriever(fixture_index, settings, emb, reranker=False)
    reranked = build_retriever(fixture_index, settings, emb)  # loads retrieval.reranker
    assert reranked.reranker is not None and fused.reranker is None
    items = retrieval_devset(load_qa(QA), fixture_index.chunks)
    missed = [it for it in items if _rank(fused.search(it.question, 8).hits, it.gold_ids) != 1]
    assert missed, "every fixture question has its gold chunk first in the fused order"
    for it in missed:
        res = reranked.search(it.question, 3)
        assert _rank(res.hits, it.gold_ids) == 1, it.question
        assert all(0.0 <= h.score <= 1.0 for h in res.hits)
        assert "rerank" in res.timings_ms
    for it in items:  # and the gold chunks the fused order had first stay near the top
        assert _rank(reranked.search(it.question, 3).hits, it.gold_ids) is not None, it.question


def test_rerank_endpoint_scores_with_the_cross_encoder(trained, server_factory):
    """POST /v1/rerank through httpx on a real server configured with the trained folder."""
    model, _ = trained
    srv = server_factory(
        {
            "model": {"n_ctx": 1024},
            "retrieval": {
                "docs_dir": str(FIXTURES / "docs"),
                "chunk_tokens": CFG["chunk_tokens"],  # the chunks it was trained on
                "chunk_overlap": CFG["chunk_overlap"],
                "reranker": str(model),
                "rerank_max_documents": 4,
            },
        },
        "reranker",
        timeout=300,
    )
    docs = [
        "Bananas are yellow fruit rich in potassium.",
        "By default Zephyrd listens on port 7431 for its HTTP API.",
        "Log files rotate every 24 hours.",
    ]
    q = "Which port does the Zephyrd HTTP API listen on?"
    r = httpx.post(
        srv.url + "/v1/rerank",
        json={"query": q, "documents": docs, "top_n": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"].startswith("cross-encoder:")
    res = out["results"]
    assert len(res) == 2 and res[0]["index"] == 1
    assert res[0]["document"] == {"text": docs[1]}
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in res)
    assert res[0]["relevance_score"] > res[1]["relevance_score"]
    assert out["usage"]["prompt_tokens"] > 0
    r = httpx.post(
        srv.url + "/v1/rerank",
        json={"query": q, "documents": docs, "return_documents": False},
        timeout=120,
    )
    assert [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}] * 3
    # retrieval reranks too: the scores are the cross-encoder's
    r = httpx.post(srv.url + "/v1/retrieve", json={"query": q, "top_k": 2}, timeout=120)
    assert r.status_code == 200, r.text
    assert "7431" in r.json()["data"][0]["text"]
    assert all(0.0 <= d["score"] <= 1.0 for d in r.json()["data"])
    for bad in (
        {"query": q, "documents": []},
        {"query": q, "documents": ["x"] * 5},  # over retrieval.rerank_max_documents
        {"query": q, "documents": ["ok", 5]},
        {"query": q, "documents": ["ok", {"text": "x"}]},
    ):
        r = httpx.post(srv.url + "/v1/rerank", json=bad, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["param"].startswith("documents"), err
