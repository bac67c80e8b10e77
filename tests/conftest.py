"""Shared fixtures: real docqa servers on loopback (subprocesses running `docqa serve`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from docqa.settings import ModelSettings
from server.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# the model a server serves when its config names none (model.model's default)
SERVED = ModelSettings.model_fields["model"].default


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Exported query encoders go to a fresh per-run cache (servers inherit it), so every run
    builds them from scratch as a new machine does, and nothing is written to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCQA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _process(tmp_path_factory, config: dict, name: str) -> ServerProcess:
    """A server (not started) in its own temp folder: its cwd, config, log and, unless the
    config names one, its model store (``.store``)."""
    tmp = tmp_path_factory.mktemp(name)
    store = config.setdefault("model", {}).setdefault("store_dir", str(tmp / "store"))
    s = ServerProcess(config, workdir=tmp, name=name, cwd=tmp)
    s.store = Path(store)
    return s


@contextlib.contextmanager
def serving(
    tmp_path_factory, configs: dict[str, dict], timeout: float = 300
) -> Iterator[list[ServerProcess]]:
    """Servers (``name: config``, each as ``server_factory`` makes it) started together, ready,
    for the block, then stopped: for modules that stop, kill or reconfigure their servers
    (replicas, remote backends) rather than share them for the session."""
    servers: list[ServerProcess] = []
    try:
        for name, config in configs.items():
            servers.append(_process(tmp_path_factory, config, name).start())
        for s in servers:
            s.wait_ready(timeout)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """``make(config, name)``: a ready server in its own temp folder (its cwd, config, log and,
    unless the config names one, its model store: ``.store``), stopped at the session's end."""
    started: list[ServerProcess] = []

    def make(config: dict, name: str = "server", timeout: float = 120) -> ServerProcess:
        s = _process(tmp_path_factory, config, name)
        started.append(s.start())
        s.wait_ready(timeout=timeout)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def fixture_index(tmp_path_factory):
    """``index(docs=FIXTURES / "docs", chunk_tokens=None, chunk_overlap=None) -> Path`` (None:
    the default chunking): a fresh copy of the index ``docqa serve`` would build from ``docs``
    at start with that chunking, built here once per session per (docs, chunking) with the
    same builder, embedder and model vocabulary (the same chunks and vectors). A server given
    it as ``retrieval.index_dir`` loads it, so one whose tests are not about building an index
    at start skips sentence-transformers (and torch) until it embeds a document. Each call
    copies it: a server may write to its own."""
    import shutil

    from docqa.settings import RetrievalSettings
    from retrieval.builder import build_index, default_tokenizer
    from retrieval.embedder import Embedder
    from retrieval.index import save_index

    built: dict[tuple, Path] = {}
    tools: list = []

    def index(docs: Path = FIXTURES / "docs", chunk_tokens=None, chunk_overlap=None) -> Path:
        default = RetrievalSettings()
        chunk_tokens = chunk_tokens or default.chunk_tokens
        chunk_overlap = default.chunk_overlap if chunk_overlap is None else chunk_overlap
        key = (str(docs), chunk_tokens, chunk_overlap)
        if key not in built:
            if not tools:
                tools.extend([Embedder(query_backend="eager"), default_tokenizer()])
            idx = build_index(
                docs, *tools, size=chunk_tokens, overlap=chunk_overlap, progress=False
            )
            built[key] = tmp_path_factory.mktemp("fixture-index") / "index"
            save_index(idx, built[key])
        copy = tmp_path_factory.mktemp("index") / "index"
        shutil.copytree(built[key], copy)
        return copy

    return index


@pytest.fixture(scope="session")
def server(server_factory) -> ServerProcess:
    """The plain server: embedded model + embedder, no index."""
    return server_factory({"server": {"max_queue": 8}, "model": {"n_ctx": 2048}}, "plain")


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(client) -> str:
    return next(m.id for m in client.models.list().data if not m.id.startswith("docqa"))


KEY, ADMIN_KEY, UI_ORIGIN = "k-17", "adm-17", "http://ui.example"
H = {"Authorization": f"Bearer {KEY}"}  # guarded_server's API key


def api_error(r: httpx.Response, status: int) -> dict:
    """The error body of ``r``, checked: ``status`` and OpenAI's shape."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


@pytest.fixture(scope="session")
def guarded_server(server_factory) -> ServerProcess:
    """A server with an index (tests/fixtures/docs), an API key, a separate admin key, a CORS
    allow-list and small request limits (issue 17: bad input and browser safety)."""
    return server_factory(
        {
            "server": {
                "api_key": KEY,
                "admin_key": ADMIN_KEY,
                "cors_origins": [UI_ORIGIN],
                "max_queue": 8,
                "limits": {
                    "max_body_bytes": 65536,
                    "max_messages": 8,
                    "max_document_bytes": 4000,
                    "max_document_chunks": 2,
                },
            },
            "model": {"n_ctx": 1024},
            "retrieval": {"docs_dir": str(FIXTURES / "docs"), "answer_max_tokens": 7},
        },
        "guarded",
        timeout=300,  # it indexes the fixture docs at start-up
    )


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 15 (``tests/pgserver.py``) for the session; skipped only when its
    binaries are absent (Debian's postgresql-15 package)."""
    from tests import pgserver

    if not pgserver.available():
        pytest.skip(f"PostgreSQL binaries not found in {pgserver.BIN}")
    pg = pgserver.PostgresServer().init().start()
    yield pg
    pg.close()
