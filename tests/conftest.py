"""Shared fixtures: real docqa servers on loopback (subprocesses running `docqa serve`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DOCQA = str(Path(sys.executable).with_name("docqa"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, config: dict, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"{name}.yaml"
        config.setdefault("server", {}).update(host="127.0.0.1", port=self.port)
        config.setdefault("model", {}).setdefault("store_dir", str(tmp / "store"))
        self.store = Path(config["model"]["store_dir"])
        cfg.write_text(yaml.safe_dump(config))
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [DOCQA, "serve", "--config", str(cfg)],
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "error":
                    raise RuntimeError(f"server failed: {r.text}\n{self.log.read_text()[-4000:]}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Exported query encoders go to a fresh per-run cache (servers inherit it), so every run
    builds them from scratch as a new machine does, and nothing is written to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCQA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    started: list[Server] = []

    def make(config: dict, name: str = "server") -> Server:
        s = Server(tmp_path_factory.mktemp(name), config, name)
        started.append(s)
        s.wait_ready()
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> Server:
    """The plain server: embedded model + embedder, no index."""
    return server_factory({"server": {"max_queue": 8}, "model": {"n_ctx": 2048}}, "plain")


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(client) -> str:
    return next(m.id for m in client.models.list().data if not m.id.startswith("docqa"))
