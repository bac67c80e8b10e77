"""`docqa train embedder`: contrastive finetuning of the retrieval embedder, for real, on the
fixture docs (a few CPU steps): examples are labelled to the chunks holding their answers, the
loss falls, the weights change, the saved folder serves as an embedder, and a failed run leaves
the last good model in place."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from docqa.data import load_qa
from docqa.provenance import read_provenance
from docqa.settings import Settings
from retrieval.builder import build_index, default_tokenizer
from retrieval.embedder import Embedder
from retrieval.factory import build_retriever, index_embedder
from training.config import EmbedderStep, Recipe, SynthStep
from training.embedder import contrastive_examples
from training.rebuild import run_step

from .conftest import FIXTURES

QA = FIXTURES / "zephyrd_qa.csv"
CFG = dict(
    docs=str(FIXTURES / "docs"),
    chunk_tokens=48,
    chunk_overlap=8,
    max_steps=8,
    batch_size=4,
    learning_rate=1e-4,
    warmup_ratio=0.0,
    seed=0,
)


@pytest.fixture(scope="module")
def fixture_index():
    return build_index(
        FIXTURES / "docs",
        Embedder(query_backend="eager"),
        default_tokenizer(),
        size=48,
        overlap=8,
        progress=False,
    )


def run_embedder(cfg: EmbedderStep, out, csv: str) -> dict:
    """The embedder step alone, on the given CSV, through the step registry."""
    recipe = Recipe(
        name="embedder-test", steps=["embedder"], synth=SynthStep(csv=csv), embedder=cfg
    )
    return run_step(recipe, "embedder", out)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedder-run")
    prov = run_embedder(EmbedderStep(**CFG), out, str(QA))
    return out, prov


def test_examples_point_at_the_chunk_holding_the_answer(fixture_index):
    chunks = fixture_index.chunks
    ex = contrastive_examples(load_qa(QA), chunks, fixture_index.bm25)
    by_q = {e.question: e for e in ex}
    assert "What is the capital of France?" not in by_q  # no chunk holds it: dropped
    port = by_q["Which port does the Zephyrd HTTP API listen on?"]
    assert "7431" in chunks[port.positive].text
    assert (
        "brew services start"
        in chunks[by_q["How do I start the Zephyrd daemon on macOS?"].positive].text
    )
    for e in ex:
        assert e.positive in e.gold
        assert e.negative is not None and e.negative not in e.gold


def test_loss_falls_weights_change_with_provenance(good_run):
    out, prov = good_run
    m = prov["metrics"]
    assert (
        read_provenance(out / "embedder" / "provenance.json")["config_hash"] == prov["config_hash"]
    )
    assert m["steps"] == 8 and m["examples"] >= 10
    assert m["loss_last3"] < m["loss_first3"]
    assert m["weight_delta"] > 0
    assert prov["inputs"]["csv"] == str(QA)
    assert prov["versions"]["python"]


def test_finetuned_folder_serves_as_embedder(good_run, fixture_index):
    out, _ = good_run
    base = Embedder(query_backend="eager")
    tuned = Embedder(str(out / "embedder" / "model"), query_backend="eager")
    assert tuned.dim == base.dim
    q = "Which port does the Zephyrd HTTP API listen on?"
    vb, vt = base.embed_query(q)[0], tuned.embed_query(q)[0]
    assert not np.allclose(vb, vt, atol=1e-4)
    assert abs(float(np.linalg.norm(vt)) - 1) < 1e-4
    # what training optimizes: the chunk holding each answer ranks above the other chunks
    chunks = fixture_index.chunks
    ex = contrastive_examples(load_qa(QA), chunks, fixture_index.bm25)

    def log_prob_of_positive(e: Embedder) -> float:
        docs = e.embed([c.search_text for c in chunks])
        qs = e.embed([x.question for x in ex])
        logits = 20 * qs @ docs.T
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(np.mean([logp[i, x.positive] for i, x in enumerate(ex)]))

    assert log_prob_of_positive(tuned) > log_prob_of_positive(base) + 0.1


def test_failed_run_keeps_the_last_good_model(good_run, tmp_path):
    out, prov = good_run
    weights = out / "embedder" / "model" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nWhat is the capital of France?,Paris.\n")
    with pytest.raises(ValueError, match="no training examples"):
        run_embedder(EmbedderStep(**CFG), out, str(bad))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert read_provenance(out / "embedder" / "provenance.json")["created"] == prov["created"]
    assert not [p for p in out.iterdir() if p.name.startswith(".embedder.tmp")]


def test_index_refuses_another_embedder(good_run, fixture_index):
    """An index's vectors only mean something to the embedder that made them."""
    from retrieval.index import EmbedderMismatch

    out, _ = good_run
    tuned = Embedder(str(out / "embedder" / "model"), query_backend="eager")
    assert fixture_index.manifest["embedder"]["fingerprint"] == Embedder().fingerprint
    with pytest.raises(EmbedderMismatch, match="rebuild the index"):
        build_retriever(fixture_index, Settings(), tuned)
    # evaluation code picks the embedder an index names
    assert (
        index_embedder(
            fixture_index, Settings().embedder.model_copy(update={"query_backend": "eager"})
        ).fingerprint
        == Embedder().fingerprint
    )


def test_cli_builds_and_queries_with_the_finetuned_embedder(good_run, tmp_path):
    """As a user does it: embedder.model -> the trained folder, rebuild, query; querying the
    new index with the default embedder is refused with a clear message."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out, _ = good_run
    cfg = tmp_path / "docqa.yaml"
    cfg.write_text(f"embedder:\n  model: {out / 'embedder' / 'model'}\n")
    docqa = str(Path(sys.executable).with_name("docqa"))
    ix = tmp_path / "ix"
    r = subprocess.run(
        [docqa, "index", "build", str(FIXTURES / "docs"), "--out", str(ix), "-c", str(cfg)],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    manifest = json.loads((ix / "manifest.json").read_text())
    assert manifest["embedder"]["path"] == str(out / "embedder" / "model")
    q = ["index", "query", "Which port does the HTTP API listen on?", "--index", str(ix)]
    r = subprocess.run([docqa, *q, "-k", "3", "--json", "-c", str(cfg)], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert any("7431" in h["text"] for h in json.loads(r.stdout))
    r = subprocess.run([docqa, *q], capture_output=True)
    assert r.returncode == 2
    assert b"rebuild the index" in r.stderr
