"""Retrieval on fixture docs: loaders, chunking, ids, BM25 vs rank-bm25, fusion, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from docqa.settings import Settings
from retrieval import index as index_mod
from retrieval.bm25 import BM25, tokenize
from retrieval.builder import build_index, default_tokenizer, update_index
from retrieval.chunking import chunk_document
from retrieval.embedder import Embedder
from retrieval.factory import build_retriever
from retrieval.index import load_index, save_index
from retrieval.loaders import Document, LoadReport, load_tree
from retrieval.search import rrf

from .conftest import FIXTURES, SHARED

DOCS = FIXTURES / "docs"


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def built(tok, embedder):
    report = LoadReport()
    return build_index(
        DOCS, embedder, tok, size=120, overlap=20, progress=False, report=report
    ), report


def test_loaders_skip_bad_and_binary_files():
    report = LoadReport()
    docs = {d.path: d for d in load_tree(DOCS, report)}
    skipped = dict(report.skipped)
    assert "guide/logo.png" in skipped and "binary" in skipped["guide/logo.png"]
    assert "api/broken.yaml" in skipped
    assert set(docs) == {
        "api/openapi.yaml",
        "api/widgets.mdx",
        "guide/config.md",
        "guide/install.md",
        "guide/internals.md",
    }
    api = docs["api/openapi.yaml"].text
    assert "## POST /jobs" in api and "`priority` (integer) (default: 5)" in api
    assert (
        "import" not in docs["api/widgets.mdx"].text
        and "<Tabs>" not in docs["api/widgets.mdx"].text
    )
    assert docs["guide/install.md"].title == "Installing Zephyrd"


def test_chunk_windows_and_overlap():
    words = [f"w{i}" for i in range(1000)]
    doc = Document("a.md", "# Title\n\n" + " ".join(words))
    toks = lambda s: s.split()  # noqa: E731 - a word "tokenizer" makes boundaries exact
    detok = lambda ids: " ".join(ids)  # noqa: E731
    chunks = chunk_document(doc, toks, detok, size=300, overlap=30)
    bodies = [c.text.split() for c in chunks]
    assert all(len(b) <= 300 for b in bodies)
    for a, b in zip(bodies, bodies[1:]):
        assert a[-30:] == b[:30]  # exactly `overlap` tokens shared
    flat = bodies[0] + [w for b in bodies[1:] for w in b[30:]]
    assert flat == ("# Title".split() + words)  # nothing lost, nothing duplicated
    assert all(c.heading == "Title" for c in chunks)


def test_chunks_fit_model_tokens_and_keep_headings(built, tok):
    idx, _ = built
    assert all(c.n_tokens <= 120 for c in idx.chunks)
    assert all(len(tok.tokenize(c.text)) <= 125 for c in idx.chunks)
    ports = [c for c in idx.chunks if "7431" in c.text]
    assert ports and ports[0].heading.startswith("Installing Zephyrd")
    internals = [c for c in idx.chunks if c.path == "guide/internals.md"]
    assert len(internals) > 3 and all(c.heading == "Internals > Scheduler loop" for c in internals)


def test_stable_ids_and_no_duplicates_on_reingest(built, tok, embedder):
    idx, _ = built
    again = build_index(DOCS, embedder, tok, size=120, overlap=20, progress=False)
    assert [c.id for c in again.chunks] == [c.id for c in idx.chunks]
    doc = next(d for d in load_tree(DOCS) if d.path == "guide/config.md")
    same = update_index(idx, embedder, tok, add=[doc])
    assert sorted(c.id for c in same.chunks) == sorted(c.id for c in idx.chunks)
    assert len(same) == len(idx)


def test_an_ingest_embeds_before_the_store_transaction(built, tok, embedder):
    """``embed_documents`` does the embedding before a shared store's write lock is taken;
    the update inside the transaction then embeds nothing and gives the same index."""
    from retrieval.builder import embed_documents

    class NoEmbed:  # the model must not run inside the transaction
        dim = embedder.dim

        def embed(self, texts):
            raise AssertionError("embedded inside the transaction")

    idx, _ = built
    doc = Document("guide/valve.md", "Set quux_valve_bar to the opening pressure.", "Valve")
    vectors = embed_documents(idx, embedder, tok, [doc])
    assert len(vectors) == 1 and not embed_documents(idx, embedder, tok, [])
    inside = update_index(idx, NoEmbed(), tok, add=[doc], vectors=vectors)
    plain = update_index(idx, embedder, tok, add=[doc])
    assert [c.id for c in inside.chunks] == [c.id for c in plain.chunks]
    assert np.allclose(inside.embeddings, plain.embeddings)


def test_a_renamed_heading_makes_new_chunks(built, tok, embedder):
    """A chunk's id covers what is indexed (heading trail + text): re-ingesting a page whose
    title (the trail of a page without headings) changed embeds its chunks again (before: the
    id covered only the text, so the old title's vector was reused, and a shared store kept
    the old row)."""
    idx, _ = built
    body = "Set quux_valve_bar to the pressure at which the valve opens; it defaults to 7."
    before = update_index(idx, embedder, tok, add=[Document("guide/valve.md", body, "Valve")])
    after = update_index(
        before, embedder, tok, add=[Document("guide/valve.md", body, "Pressure relief")]
    )
    (old,) = [c for c in before.chunks if c.path == "guide/valve.md"]
    (new,) = [c for c in after.chunks if c.path == "guide/valve.md"]
    assert (old.heading, new.heading) == ("Valve", "Pressure relief") and old.text == new.text
    assert new.id != old.id
    fresh = embedder.embed([new.search_text])[0]
    assert np.allclose(after.embeddings[after.pos[new.id]], fresh, atol=1e-5)


def test_bm25_matches_rank_bm25(built):
    idx, _ = built
    corpus = [tokenize(c.search_text) for c in idx.chunks]
    ref = BM25Okapi(corpus)
    ours = BM25.build(corpus)
    for q in [
        "port metrics",
        "max_parallel_jobs default",
        "cancel a job job",
        "quorum shard",
        "nothing-matches-this",
    ]:
        qt = tokenize(q)
        np.testing.assert_allclose(ours.scores(qt), ref.get_scores(qt), rtol=1e-9, atol=1e-12)


def test_rrf_order():
    fused = rrf([["a", "b", "c"], ["c", "a", "d"]], [1.0, 1.0], k=60)
    ids = [i for i, _ in fused]
    assert ids == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    # weights shift the order
    assert [i for i, _ in rrf([["a"], ["b"]], [1.0, 2.0], k=60)] == ["b", "a"]


def test_hybrid_search_and_filter(built, embedder):
    idx, _ = built
    r = build_retriever(idx, Settings(), embedder)
    res = r.search("Which port does the HTTP API listen on?", 3)
    assert res.hits[0].chunk.path == "guide/install.md"
    res = r.search("How do I cancel a job?", 3)
    assert res.hits[0].chunk.path == "api/openapi.yaml"
    only = r.search("port", 5, path_prefix="guide/config")
    assert only.hits and all(h.chunk.path.startswith("guide/config") for h in only.hits)
    off = r.search("What is the best chocolate cake recipe?", 3)
    assert off.best_sim < res.best_sim


def test_path_prefix_keeps_a_leading_dot_of_a_folder(built, tok, embedder):
    """``./`` and ``/`` in front of a prefix are dropped; the dot of ``.github`` is not."""
    idx, _ = built
    idx = update_index(
        idx,
        embedder,
        tok,
        add=[
            Document(".github/contributing.md", "Open a pull request against main.", "c"),
            Document("github/notes.md", "Notes about a pull request.", "n"),
        ],
    )
    r = build_retriever(idx, Settings(), embedder)

    def paths(prefix):
        return {h.chunk.path for h in r.search("pull request", 5, path_prefix=prefix).hits}

    assert paths(".github/") == paths(".github") == {".github/contributing.md"}
    assert paths("github/") == paths("./github") == paths("/github/") == {"github/notes.md"}
    assert paths(".") == paths(None)  # everything


def test_an_index_grown_from_empty_names_its_embedder(tmp_path, tok, embedder):
    """A server started without an index saves, after its first ingest, an index whose
    manifest names the embedder's size and weights, so a restart with another embedder is
    refused instead of serving meaningless dense scores (before: only its name)."""
    from retrieval.index import EmbedderMismatch
    from server.services.index import open_index

    s = Settings(retrieval={"index_dir": str(tmp_path / "ix"), "reranker": None})
    svc = open_index(s, embedder, tok, reranker=False)
    assert len(svc.retriever.index) == 0
    with svc.write_lock:
        svc.update(
            lambda base: update_index(
                base, embedder, tok, add=[Document("a.md", "Run the quux valve at 7 bar.", "a")]
            )
        )
    info = load_index(tmp_path / "ix").manifest["embedder"]
    assert info["dim"] == 384 and info["fingerprint"] == embedder.fingerprint
    other = type("Other", (), {"name": "other", "dim": 384, "fingerprint": "f" * 16})()
    with pytest.raises(EmbedderMismatch, match="rebuild the index"):
        open_index(s, other, tok, reranker=False)


def test_save_load_roundtrip_mmap(built, tmp_path, embedder):
    idx, _ = built
    out = save_index(idx, tmp_path / "ix")
    loaded = load_index(out)
    assert isinstance(loaded.embeddings, np.memmap)
    assert [c.id for c in loaded.chunks] == [c.id for c in idx.chunks]
    assert loaded.manifest["config"]["chunk_tokens"] == 120
    assert loaded.manifest["inputs"]["files"]["guide/install.md"]["sha256"]
    assert "versions" in loaded.manifest and loaded.manifest["embedder"]["dim"] == 384
    a = build_retriever(idx, Settings(), embedder).search("metrics port", 3)
    b = build_retriever(loaded, Settings(), embedder).search("metrics port", 3)
    assert [h.chunk.id for h in a.hits] == [h.chunk.id for h in b.hits]


def test_an_index_is_not_saved_over_a_folder_of_other_files(built, tmp_path):
    """Found by a review: index_dir pointed at a docs folder was deleted by the first save."""
    from retrieval.index import NotAnIndex

    idx, _ = built
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "keep.md").write_text("# Keep\n")
    with pytest.raises(NotAnIndex, match="not an index"):
        save_index(idx, docs)
    assert (docs / "keep.md").read_text() == "# Keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no temp folder left
    (tmp_path / "empty").mkdir()
    save_index(idx, tmp_path / "empty")  # an empty folder, a new one or an index: written
    save_index(idx, tmp_path / "empty")
    assert len(load_index(tmp_path / "empty")) == len(idx)


def test_markdown_parsing_is_linear_in_hostile_input():
    """Found by a review: a heading line of 10k spaces took hours in the heading regex (cubic),
    unclosed comments and blank .mdx lines were quadratic, all under ingest's write lock. Each
    input below took from seconds to hours before; they must finish (in a thread, 60 s)."""
    import threading

    from retrieval.chunking import heading, split_sections
    from retrieval.loaders import _markdown

    assert heading("## Load model ##") == (2, "Load model")
    assert heading("# C#") == (1, "C")
    assert heading("#nospace") is None and heading("####### seven") is None
    done = []

    def hostile():
        split_sections("# a" + " " * 50_000 + "b\n\ntext\n")
        _markdown("<!--" * 100_000, False)
        _markdown("\n" * 200_000, True)
        _markdown("#\n" * 100_000, False)
        done.append(True)

    t = threading.Thread(target=hostile, daemon=True)
    t.start()
    t.join(60)
    assert done, "markdown parsing did not finish in 60 s"
    assert _markdown("a <!-- x --> b <!-- open", False)[0] == "a  b <!-- open"


def test_crash_mid_write_keeps_previous_index(built, tmp_path, monkeypatch, tok, embedder):
    idx, _ = built
    out = save_index(idx, tmp_path / "ix")
    smaller = update_index(idx, embedder, tok, remove=["guide/internals.md"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.np, "save", boom)
    with pytest.raises(OSError):
        save_index(smaller, out)
    monkeypatch.undo()
    again = load_index(out)
    assert len(again) == len(idx)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned


def test_remove_unknown_path_fails_cleanly(built, tok, embedder):
    idx, _ = built
    with pytest.raises(KeyError):
        update_index(idx, embedder, tok, remove=["nope.md"])


@pytest.mark.skipif(not (SHARED / "nitro-docs").is_dir(), reason="../shared data not present")
def test_nitro_docs(tok, embedder):
    report = LoadReport()
    idx = build_index(SHARED / "nitro-docs", embedder, tok, progress=False, report=report)
    assert len(report.loaded) >= 27 and len(idx) > 50
    assert all(c.n_tokens <= 300 for c in idx.chunks)
    r = build_retriever(idx, Settings(), embedder)
    paths = [h.chunk.path for h in r.search("How do I enable continuous batching?", 3).hits]
    assert "features/cont-batch.md" in paths
    paths = [h.chunk.path for h in r.search("load a model with the loadmodel endpoint", 5).hits]
    assert any(
        p in ("features/load-unload.md", "openapi/NitroAPI.yaml", "new/quickstart.md")
        for p in paths
    )


def test_question_augmented_index(built, tok, embedder, tmp_path):
    from docqa.data import QAPair

    pairs = [
        QAPair(
            "How many tasks can Zephyrd execute simultaneously?",
            "The max_parallel_jobs setting limits how many jobs run at once; the default is 4.",
        ),
        QAPair("What is the capital of France?", "Paris is the capital of France."),
    ]
    plain, _ = built
    idx = build_index(DOCS, embedder, tok, size=120, overlap=20, progress=False, questions=pairs)
    qs = idx.questions
    assert len(qs) == 2 and qs.n_attached == 1 and idx.manifest["questions"]["attached"] == 1
    owner = idx.chunks[idx.pos[qs.rows[0]["chunk_id"]]]
    assert owner.path == "guide/config.md" and "max_parallel_jobs" in owner.text
    assert qs.rows[1]["chunk_id"] is None  # general knowledge: attached nowhere

    query = "Which cap applies to tasks that execute simultaneously?"  # no word of the chunk
    aug = build_retriever(idx, Settings(), embedder)
    assert aug.has_questions and not build_retriever(plain, Settings(), embedder).has_questions
    for mode in ("bm25", "dense", "hybrid"):
        assert aug.search(query, 1, mode=mode).hits[0].chunk.id == owner.id, mode
    # without the attached question BM25 cannot see the chunk at all
    assert plain.bm25.scores(tokenize(query))[plain.pos[owner.id]] == 0
    assert idx.bm25.scores(tokenize(query))[idx.pos[owner.id]] > 0

    loaded = load_index(save_index(idx, tmp_path / "ix"))
    assert loaded.questions.rows == qs.rows
    assert (
        build_retriever(loaded, Settings(), embedder).search(query, 1).hits[0].chunk.id == owner.id
    )
    # removing the page re-attaches the pool to what is left (vectors kept, none dangling)
    smaller = update_index(loaded, embedder, tok, remove=["guide/config.md"])
    assert len(smaller.questions) == 2 and smaller.questions.embeddings.shape[0] == 2
    ids = [r["chunk_id"] for r in smaller.questions.rows if r["chunk_id"] is not None]
    assert owner.id not in ids and all(i in smaller.pos for i in ids)


QUERIES = [
    "port?",
    "How do I cancel a job that is stuck in the queue of Zephyrd " * 30,  # truncated at 256
    "Which setting limits how many jobs run at once?",
    "what is the metrics port",
]


def test_query_fast_path_equals_sentence_transformers():
    emb = Embedder(query_backend="torchscript")
    assert emb._fast is not None  # all-MiniLM: Transformer -> mean pooling -> Normalize
    for q in QUERIES:
        np.testing.assert_allclose(emb.embed_query(q), emb.embed([q]), atol=1e-5)
    assert emb.backend == "torchscript" and emb.traced  # not the eager fallback


def test_int8_query_encoder_close_to_fp32_and_cached(embedder, built, tmp_path):
    """The default backend: int8 ONNX, built once into the cache with provenance, close to the
    fp32 vector, and the same search results as fp32 on the fixture docs."""
    import json

    emb = Embedder(cache_dir=tmp_path)
    assert emb.warm() == "onnx-int8"
    (entry,) = tmp_path.iterdir()
    prov = json.loads((entry / "provenance.json").read_text())
    assert prov["kind"] == "query-encoder" and prov["metrics"]["probe_min_cosine_vs_fp32"] >= 0.98
    assert "onnxruntime" in prov["versions"]
    for q in QUERIES:
        v = emb.embed_query(q)
        assert v.shape == (1, 384) and v.dtype == np.float32
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-4
        assert float(v[0] @ emb.embed([q])[0]) >= 0.98
    # same ranking as the fp32 query path on the fixture index
    idx, _ = built
    fp32 = build_retriever(idx, Settings(), Embedder(query_backend="torchscript"))
    int8 = build_retriever(idx, Settings(), emb)
    for q in QUERIES[2:] + ["how do I install zephyrd", "log rotation"]:
        a = {h.chunk.id: h.score for h in fp32.search(q, len(idx), mode="dense").hits}
        b = {h.chunk.id: h.score for h in int8.search(q, len(idx), mode="dense").hits}
        assert next(iter(a)) == next(iter(b))  # same best chunk
        assert max(abs(a[c] - b[c]) for c in a) < 0.05  # every chunk's similarity close
    # a second embedder reads the cached model instead of exporting again
    mtime = (entry / "model.int8.onnx").stat().st_mtime_ns
    again = Embedder(cache_dir=tmp_path)
    assert again.warm() == "onnx-int8" and list(tmp_path.iterdir()) == [entry]
    assert (entry / "model.int8.onnx").stat().st_mtime_ns == mtime
    # ... on a light start: the cached model and tokenizer.json, no sentence-transformers
    # until documents are embedded; the same query vectors, then the same document vectors
    assert prov["config"]["dim"] == 384 and prov["config"]["max_seq_length"] == emb.max_seq_length
    assert again._model is None and again.dim == 384
    for q in [*QUERIES, "", "x " * 2000, "Ünïcödé ß 日本語 🙂"]:  # long: truncated alike
        assert np.array_equal(again.embed_query(q), emb.embed_query(q)), q
    assert again._model is None
    np.testing.assert_array_equal(again.embed(QUERIES), emb.embed(QUERIES))
    assert again._model is not None and again.embed_query(QUERIES[0]).shape == (1, 384)


def test_light_start_imports_no_torch(tmp_path):
    """With the int8 query encoder cached, an embedder (what a server with a built index
    loads at start) answers queries without importing torch or sentence-transformers."""
    import subprocess
    import sys

    Embedder(cache_dir=tmp_path).warm()  # the export, in this process
    code = (
        "import sys; from retrieval.embedder import Embedder; "
        f"e = Embedder(cache_dir={str(tmp_path)!r}); assert e.warm() == 'onnx-int8'; "
        "assert e.embed_query('How do I install it?').shape == (1, 384); "
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_query_backend_falls_back_when_export_fails(tmp_path, monkeypatch):
    """A failed export leaves nothing in the cache and the query path on fp32 TorchScript."""
    from retrieval import query_encoder

    def broken(*a, **k):
        raise RuntimeError("export exploded")

    monkeypatch.setattr(query_encoder, "_export", broken)
    emb = Embedder(cache_dir=tmp_path)
    assert emb.warm() == "torchscript"
    assert list(tmp_path.iterdir()) == []  # the temp folder was removed
    q = QUERIES[2]
    np.testing.assert_allclose(emb.embed_query(q), emb.embed([q]), atol=1e-5)
    with pytest.raises(ValueError, match="query_backend"):
        Embedder(query_backend="gpu-magic")


def test_index_cli_build_with_questions_and_query(tmp_path):
    """`docqa index build --questions` then `docqa index query --json`, as a user runs them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "question,answer\n"
        '"How many tasks can Zephyrd execute simultaneously?",'
        '"The max_parallel_jobs setting limits how many jobs run at once; the default is 4."\n'
    )
    docqa = [str(Path(sys.executable).with_name("docqa"))]
    out = tmp_path / "ix"
    build = [*docqa, "index", "build", str(DOCS), "--out", str(out), "--chunk-tokens", "120"]
    r = subprocess.run([*build, "--questions", str(csv), "--all-questions"], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"1 of 1 attached" in r.stdout
    assert (out / "questions.jsonl").is_file() and (out / "question_embeddings.npy").is_file()
    q = "Which cap applies to tasks that execute simultaneously?"
    r = subprocess.run(
        [*docqa, "index", "query", q, "--index", str(out), "-k", "1", "--mode", "bm25", "--json"],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    hits = json.loads(r.stdout)
    assert hits[0]["path"] == "guide/config.md" and "max_parallel_jobs" in hits[0]["text"]


def test_index_add_replaces_an_edited_file_under_the_built_folder(tmp_path):
    """Found by a review: `docqa index add docs/guide/install.md` stored it as "install.md",
    so the index held the old version (guide/install.md) beside the new one."""
    import shutil

    from typer.testing import CliRunner

    from retrieval.cli import app

    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    out = tmp_path / "ix"
    run = CliRunner().invoke
    r = run(app, ["build", str(docs), "--out", str(out), "--chunk-tokens", "120"])
    assert r.exit_code == 0, r.output
    before = set(load_index(out).files)
    f = docs / "guide" / "install.md"
    f.write_text(f.read_text() + "\n## Upgrades\n\nRun zephyrd upgrade --channel quasar.\n")
    r = run(app, ["add", str(f), "--index", str(out)])
    assert r.exit_code == 0, r.output
    after = load_index(out)
    assert set(after.files) == before
    assert any("quasar" in c.text for c in after.chunks if c.path == "guide/install.md")


def test_documents_from_two_allowed_roots_keep_apart(tmp_path):
    """Found by a review: a path was stored relative to the first root that held it, so
    /srv/a/guide.md and /srv/b/guide.md were one document (the second replaced the first)."""
    import json

    from docqa.settings import RetrievalSettings
    from server.services.documents import DocumentsService

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "guide.md").write_text(f"# Guide {name}\n\nRoot {name} text.\n")
    one = RetrievalSettings(allowed_roots=[str(tmp_path / "a")])
    two = RetrievalSettings(allowed_roots=[str(tmp_path / "a"), str(tmp_path / "b")])

    def stored(settings, path):
        docs = DocumentsService(settings, None, None).from_json(json.dumps({"path": str(path)}))
        return [d.path for d in docs]

    assert stored(one, tmp_path / "a" / "guide.md") == ["guide.md"]  # one root: as before
    assert stored(two, tmp_path / "a" / "guide.md") == ["a/guide.md"]
    assert stored(two, tmp_path / "b") == ["b/guide.md"]


def test_bm25_mode_measures_the_abstain_similarity(built, embedder):
    """Found by a review: with retrieval.mode bm25 the abstain evidence stayed -1, so every
    grounded answer was the abstain message. It is the best dense similarity of BM25's
    candidates now: at most hybrid's (the best over all chunks), above the threshold on an
    answerable question."""
    idx, _ = built
    q = "How many jobs run at once?"
    bm = build_retriever(idx, Settings(retrieval={"mode": "bm25"}), embedder).search(q, 3)
    hy = build_retriever(idx, Settings(), embedder).search(q, 3)
    assert bm.hits and Settings().retrieval.abstain_threshold < bm.best_sim <= hy.best_sim + 1e-6
