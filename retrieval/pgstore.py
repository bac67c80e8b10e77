"""The shared store: an index's documents, chunks, attached questions and embeddings in
PostgreSQL, so that several servers (replicas) serve one corpus.

The store holds what ``retrieval.index`` writes to a folder; every replica reads it into the
same in-memory ``Index`` (``assemble``: BM25 + dense vectors, as from a folder) and keeps it
in step (``Watcher``: LISTEN/NOTIFY, plus a periodic version check). A write is one
transaction that locks the store's version row: the writer reads the version, brings its
base index up to it when another replica wrote meanwhile, applies its change and bumps the
version; a crash anywhere before the commit leaves the previous state.

Tables (``MIGRATIONS``; the applied version is in ``docqa_schema_version``)::

    docqa_meta       one row: version (bumped by every write), the index manifest (JSON)
    docqa_documents  path, sha256, title
    docqa_chunks     seq (insertion order = index order), chunk id, path, chunk JSON,
                     embedding (float32 bytes)
    docqa_questions  seq, question row JSON, embedding (float32 bytes)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from retrieval.chunking import Chunk
from retrieval.index import Index, assemble
from retrieval.questions import Questions

log = logging.getLogger(__name__)

CHANNEL = "docqa_index"
_LOCK_KEY = 0x646F6371  # advisory lock id for migrations ("docq")

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE docqa_meta (
                 id integer PRIMARY KEY CHECK (id = 1),
                 version bigint NOT NULL,
                 manifest jsonb NOT NULL,
                 dim integer NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now())""",
            """CREATE TABLE docqa_documents (
                 path text PRIMARY KEY,
                 sha256 text NOT NULL,
                 title text)""",
            """CREATE TABLE docqa_chunks (
                 seq bigserial PRIMARY KEY,
                 id text NOT NULL UNIQUE,
                 path text NOT NULL REFERENCES docqa_documents(path) ON DELETE CASCADE,
                 chunk jsonb NOT NULL,
                 embedding bytea NOT NULL)""",
            "CREATE INDEX docqa_chunks_path ON docqa_chunks(path)",
            """CREATE TABLE docqa_questions (
                 seq bigserial PRIMARY KEY,
                 row jsonb NOT NULL,
                 embedding bytea NOT NULL)""",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (or refused the operation for a connection reason)."""


def _unavailable(exc: Exception) -> bool:
    import psycopg
    import psycopg_pool

    return isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout))


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _vec(b: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(b, dtype=np.float32, count=dim)


class PgStore:
    """A connection pool on the store's database. ``open()`` raises ``StoreUnavailable`` when
    it cannot connect; ``migrate()`` creates or upgrades the schema."""

    def __init__(self, url: str, pool_size: int, connect_timeout: float):
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.pool = None

    def open(self) -> PgStore:
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"application_name": "docqa", "connect_timeout": int(self.connect_timeout)},
            timeout=self.connect_timeout,
            check=ConnectionPool.check_connection,  # a connection broken by a restart is replaced
            reconnect_timeout=max(2.0, self.connect_timeout),  # then a fresh try on demand
            open=False,
        )
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except Exception as exc:  # noqa: BLE001
            pool.close()
            raise StoreUnavailable(f"cannot connect to {redact(self.url)}: {exc}") from exc
        self.pool = pool
        return self

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @contextmanager
    def _conn(self):
        if self.pool is None:
            raise StoreUnavailable("the store is closed")
        try:
            with self.pool.connection() as conn:
                yield conn
        except Exception as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"database unavailable: {exc}") from exc
            raise

    # -- schema -------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self._conn() as conn:
            return self._schema_version(conn)

    @staticmethod
    def _schema_version(conn) -> int:
        row = conn.execute("SELECT to_regclass('docqa_schema_version')").fetchone()
        if row[0] is None:
            return 0
        row = conn.execute("SELECT max(version) FROM docqa_schema_version").fetchone()
        return row[0] or 0

    def migrate(self) -> int:
        """Apply the migrations the database lacks, in one transaction (replicas starting
        together take turns on an advisory lock). -> the schema version."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS docqa_schema_version (version integer)")
            have = self._schema_version(conn)
            if have > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the store's schema is version {have}, newer than this docqa "
                    f"({SCHEMA_VERSION}): upgrade docqa"
                )
            for version, statements in MIGRATIONS:
                if version > have:
                    for sql in statements:
                        conn.execute(sql)
                    conn.execute("INSERT INTO docqa_schema_version VALUES (%s)", (version,))
                    log.info("store schema migrated to version %d", version)
        return SCHEMA_VERSION

    # -- reading ------------------------------------------------------------------------
    def version(self) -> int:
        """The store's version (0: nothing written yet)."""
        with self._conn() as conn:
            row = conn.execute("SELECT version FROM docqa_meta WHERE id = 1").fetchone()
            return row[0] if row else 0

    def load(self) -> tuple[int, Index | None]:
        """(version, the index) read in one snapshot; (0, None) for an empty store."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return _read(conn)

    # -- writing ------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Write]:
        """One write: locks the version row for the length of the block (other writers
        wait), commits at its end, rolls back on any exception."""
        with self._conn() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO docqa_meta (id, version, manifest, dim) "
                "VALUES (1, 0, '{}'::jsonb, 0) ON CONFLICT (id) DO NOTHING"
            )
            version = conn.execute(
                "SELECT version FROM docqa_meta WHERE id = 1 FOR UPDATE"
            ).fetchone()[0]
            yield Write(conn, version)

    def save(self, index: Index) -> int:
        """Replace the whole store by ``index`` (``docqa index build``). -> the new version."""
        with self.transaction() as tx:
            tx.apply(None, index)
        return tx.version


def _read(conn) -> tuple[int, Index | None]:
    row = conn.execute("SELECT version, manifest, dim FROM docqa_meta WHERE id = 1").fetchone()
    if row is None or row[0] == 0:
        return (row[0] if row else 0), None
    version, manifest, dim = row
    chunks, vecs = [], []
    with conn.cursor() as cur:
        cur.execute("SELECT chunk, embedding FROM docqa_chunks ORDER BY seq")
        for chunk, emb in cur:
            chunks.append(Chunk(**chunk))
            vecs.append(_vec(emb, dim))
    emb = np.stack(vecs) if vecs else np.zeros((0, dim), dtype=np.float32)
    questions = None
    if manifest.get("questions") is not None:
        rows, qvecs = [], []
        with conn.cursor() as cur:
            cur.execute("SELECT row, embedding FROM docqa_questions ORDER BY seq")
            for r, e in cur:
                rows.append(r)
                qvecs.append(_vec(e, dim))
        qemb = np.stack(qvecs) if qvecs else np.zeros((0, dim), dtype=np.float32)
        questions = Questions(rows, qemb)
    return version, assemble(chunks, emb, manifest, questions)


class Write:
    """The open write transaction: ``version`` is the store's version when it began; ``load()``
    reads the store inside it; ``apply(old, new)`` makes the store hold ``new``."""

    def __init__(self, conn, version: int):
        self.conn = conn
        self.version = version

    def load(self) -> Index | None:
        return _read(self.conn)[1]

    def apply(self, old: Index | None, new: Index) -> None:
        """Write the difference from ``old`` (what the store holds now; None: rewrite all)
        to ``new``, bump the version and notify the replicas (delivered on commit)."""
        conn = self.conn
        dim = int(new.embeddings.shape[1]) if new.embeddings.ndim == 2 else 0
        old_ids = [c.id for c in old.chunks] if old is not None else []
        new_ids = {c.id for c in new.chunks}
        kept = [i for i in old_ids if i in new_ids]
        # the store keeps index order as insertion order: new chunks must come after the kept
        # ones (update_index's order); anything else is written whole
        incremental = old is not None and [c.id for c in new.chunks[: len(kept)]] == kept
        if not incremental:
            conn.execute("DELETE FROM docqa_chunks")
            conn.execute("DELETE FROM docqa_documents")
            added = list(range(len(new.chunks)))
            gone_docs: set[str] = set()
        else:
            gone = [i for i in old_ids if i not in new_ids]
            if gone:
                conn.execute("DELETE FROM docqa_chunks WHERE id = ANY(%s)", (gone,))
            added = list(range(len(kept), len(new.chunks)))
            gone_docs = set(old.files) - set(new.files)
        for p in gone_docs:
            conn.execute("DELETE FROM docqa_documents WHERE path = %s", (p,))
        with conn.cursor() as cur:
            old_files = old.files if incremental else {}
            docs = [
                (p, f.get("sha256", ""), f.get("title"))
                for p, f in new.files.items()
                if old_files.get(p) != f
            ]
            if docs:
                cur.executemany(
                    "INSERT INTO docqa_documents (path, sha256, title) VALUES (%s, %s, %s) "
                    "ON CONFLICT (path) DO UPDATE SET sha256 = EXCLUDED.sha256, "
                    "title = EXCLUDED.title",
                    docs,
                )
            # chunks of files with no documents row (none in docqa's own indexes) get one
            orphan = {new.chunks[i].path for i in added} - set(new.files)
            if orphan:
                cur.executemany(
                    "INSERT INTO docqa_documents (path, sha256) VALUES (%s, '') "
                    "ON CONFLICT DO NOTHING",
                    [(p,) for p in orphan],
                )
            if added:
                emb = np.ascontiguousarray(new.embeddings, dtype=np.float32)
                cur.executemany(
                    "INSERT INTO docqa_chunks (id, path, chunk, embedding) VALUES (%s, %s, %s, %s)",
                    [
                        (
                            new.chunks[i].id,
                            new.chunks[i].path,
                            json.dumps(new.chunks[i].to_dict(), ensure_ascii=False),
                            emb[i].tobytes(),
                        )
                        for i in added
                    ],
                )
            if not _same_questions(old if incremental else None, new):
                conn.execute("DELETE FROM docqa_questions")
                if new.questions is not None and len(new.questions):
                    qemb = np.ascontiguousarray(new.questions.embeddings, dtype=np.float32)
                    cur.executemany(
                        "INSERT INTO docqa_questions (row, embedding) VALUES (%s, %s)",
                        [
                            (json.dumps(r, ensure_ascii=False), qemb[i].tobytes())
                            for i, r in enumerate(new.questions.rows)
                        ],
                    )
        self.version += 1
        conn.execute(
            "UPDATE docqa_meta SET version = %s, manifest = %s, dim = %s, updated_at = now() "
            "WHERE id = 1",
            (self.version, json.dumps(new.manifest, ensure_ascii=False), dim),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(self.version)))


def _same_questions(old: Index | None, new: Index) -> bool:
    if old is None:
        return False
    a, b = old.questions, new.questions
    if a is None or b is None:
        return a is b
    return a.rows == b.rows and a.embeddings is b.embeddings


class Watcher:
    """Calls ``on_change()`` when another writer may have changed the store: on each
    NOTIFY on ``CHANNEL``, and every ``interval`` seconds regardless (the fallback when a
    notification is lost or the listening connection is down). ``on_change`` compares
    versions itself, so extra calls cost one small query."""

    def __init__(
        self,
        url: str,
        on_change: Callable[[], None],
        interval: float,
        retry: float,
        connect_timeout: float,
    ):
        self.url = url
        self.on_change = on_change
        self.interval = interval
        self.retry = retry
        self.connect_timeout = connect_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docqa-store-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _check(self) -> None:
        try:
            self.on_change()
        except Exception as exc:  # noqa: BLE001 - keep watching; the served index stays
            log.warning("store refresh failed (still serving the index in memory): %s", exc)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=int(self.connect_timeout),
                    application_name="docqa-watch",
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._check()  # what changed while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.interval, stop_after=1):
                            pass
                        self._check()
            except Exception as exc:  # noqa: BLE001
                log.warning("store watch: %s (version checks go on every %.1fs)", exc, self.retry)
                self._check()
                self._stop.wait(self.retry)
