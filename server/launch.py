"""Run a real ``docqa serve`` as a subprocess on a free loopback port: for tests, evaluation,
benchmarks and ``docqa reply``, so they all exercise the code path users get.

``ServerProcess(config)`` writes ``config`` (settings as a dict; host and port are set here) to
a YAML file, starts the server with ``HF_HUB_OFFLINE=1`` and its output in a log file, and
``wait_ready`` polls ``/health`` until it answers 200; it fails fast, with the log's tail, when
the process exits or ``/health`` reports an error. ``stop`` sends SIGTERM, then kills.
``running_server(config)`` does all three around a block; ``local_server(model)`` serves one
GGUF (path or store name), optionally with an index, and yields its ``/v1`` base URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

log = logging.getLogger(__name__)

DOCQA = str(Path(sys.executable).with_name("docqa"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``docqa serve`` subprocess.

    ``workdir``: where the config and the log go (a fresh temp folder when None, removed by
    ``stop``); ``cwd``: the server's working directory, against which relative paths in the
    config resolve (the caller's when None).
    """

    def __init__(
        self,
        config: dict,
        *,
        workdir: str | Path | None = None,
        name: str = "server",
        cwd: str | Path | None = None,
    ):
        self._owned = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"docqa-{name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config
        config.setdefault("server", {}).update(host="127.0.0.1", port=self.port)
        self.config_path = self.workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = self.workdir / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        with open(self.log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [DOCQA, "serve", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                cwd=self.cwd,
            )
        log.info("docqa serve on %s (pid %d, log %s)", self.url, self.proc.pid, self.log)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300) -> None:
        """Return once ``/health`` answers 200; raise with the log's tail when the process
        exits, ``/health`` reports ``status: error``, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"docqa server exited:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code == 200:
                return
            if r is not None and _status(r) == "error":
                raise RuntimeError(f"docqa server failed: {r.text}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"docqa server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout`` seconds. A temp
        ``workdir`` is removed, unless the server had died unnoticed: its log is kept."""
        if self.proc is not None and self.proc.returncode is None:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                log.warning("docqa server exited on its own (%s); its log: %s", code, self.log)
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("docqa server pid %d ignored SIGTERM; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _status(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


@contextlib.contextmanager
def running_server(
    config: dict,
    timeout: float = 300,
    *,
    workdir: str | Path | None = None,
    name: str = "server",
    cwd: str | Path | None = None,
) -> Iterator[ServerProcess]:
    """A ready ``ServerProcess`` for the block, stopped after it."""
    server = ServerProcess(config, workdir=workdir, name=name, cwd=cwd).start()
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def child_config(settings) -> dict:
    """``settings`` as the config of a child server: every section as this process loaded it
    (its YAML, environment and flags), secrets in clear (the file is the child's own, in its
    private temp folder)."""
    cfg = settings.model_dump(mode="json")
    for section, name in (
        ("server", "api_key"),
        ("server", "admin_key"),
        ("model", "endpoint_api_key"),
    ):
        v = getattr(getattr(settings, section), name)
        cfg[section][name] = v.get_secret_value() if v is not None else None
    return cfg


@contextlib.contextmanager
def local_server(
    model: str, index: str | None = None, extra: dict | None = None, settings=None
) -> Iterator[str]:
    """Serve a GGUF (path or store name), with ``index`` when given, for the block; yields the
    base URL of its OpenAI API (``.../v1``). The child's settings: ``settings`` whole when
    given (``child_config``), else its defaults and the environment; ``extra``: more settings,
    section by section, over them."""
    cfg: dict = child_config(settings) if settings is not None else {}
    cfg.setdefault("server", {}).update(log_level="WARNING", max_queue=64)
    cfg.setdefault("model", {})["model"] = model
    if index:
        cfg.setdefault("retrieval", {})["index_dir"] = str(index)
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    with running_server(cfg, name="local") as server:
        yield server.url + "/v1"
