"""A real PostgreSQL server for the tests and benchmarks: ``initdb`` into a temp folder, then
``pg_ctl`` on a free loopback port (as the ``postgres`` user when running as root, which
PostgreSQL refuses to run as). ``start``/``stop`` can be called again (a database outage)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from server.launch import free_port

BIN = Path(os.environ.get("DOCQA_PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> bool:
    return (BIN / "initdb").is_file() and (BIN / "pg_ctl").is_file()


class PostgresServer:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="docqa-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.dir / "postgres.log"
        self._user = None
        if os.geteuid() == 0:  # postgres will not run as root
            self._user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> PostgresServer:
        self._run(BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8")
        return self

    def start(self) -> PostgresServer:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        r = self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "start")
        if r.returncode:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{self.log.read_text()}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def sql(self, query: str, *params):
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else None

    def reset(self) -> None:
        """Drop every docqa table (a fresh, empty database)."""
        for _ in range(50):
            try:
                self.sql(
                    "DROP TABLE IF EXISTS docqa_chunks, docqa_questions, docqa_documents, "
                    "docqa_meta, docqa_schema_version CASCADE"
                )
                return
            except Exception:  # noqa: BLE001 - the server may still be starting
                time.sleep(0.1)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
