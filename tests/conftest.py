"""Shared fixtures: real docqa servers on loopback (subprocesses running `docqa serve`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Exported query encoders go to a fresh per-run cache (servers inherit it), so every run
    builds them from scratch as a new machine does, and nothing is written to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCQA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """``make(config, name)``: a ready server in its own temp folder (its cwd, config, log and,
    unless the config names one, its model store: ``.store``), stopped at the session's end."""
    started: list[ServerProcess] = []

    def make(config: dict, name: str = "server", timeout: float = 120) -> ServerProcess:
        tmp = tmp_path_factory.mktemp(name)
        store = config.setdefault("model", {}).setdefault("store_dir", str(tmp / "store"))
        s = ServerProcess(config, workdir=tmp, name=name, cwd=tmp)
        s.store = Path(store)
        started.append(s.start())
        s.wait_ready(timeout=timeout)
        return s

    yield make
    for s in started:
        s.stop()


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
