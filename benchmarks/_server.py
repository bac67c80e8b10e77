"""Start a real `docqa serve` subprocess for benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

DOCQA = str(Path(sys.executable).with_name("docqa"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(config: dict, timeout: float = 300):
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="docqa-bench-"))
    config.setdefault("server", {}).update(host="127.0.0.1", port=port, log_level="WARNING")
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [DOCQA, "serve", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((tmp / "server.log").read_text()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
