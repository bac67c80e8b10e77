"""`docqa models pull|list|rm` against a local HTTP server that serves the hub routes
huggingface_hub uses (repo tree, resolve with HEAD, ETag and Range), for tiny GGUFs made here.
The command runs as users run it, with HF_ENDPOINT pointing at the local server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from models.store import PullError, pick_gguf
from server.launch import DOCQA

TOKEN = "hf_test_token"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_gguf(path: Path, seed: int, rows: int = 4) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-{seed}")
    w.add_tensor("w", np.random.default_rng(seed).standard_normal((rows, 1024)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class Hub:
    """repos: {repo: {file: bytes}}; private repos need the bearer TOKEN. ``truncate``: file
    names whose first full GET is cut halfway (to exercise resume)."""

    def __init__(self, repos: dict, private: set[str]):
        self.repos, self.private = repos, private
        self.truncate: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _fail(self, code: int, error: str):
                self.send_response(code)
                self.send_header("X-Error-Code", error)
                self.send_header("Content-Type", "application/json")
                body = json.dumps({"error": error}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo: str):
                if repo not in hub.repos:
                    return None
                if repo in hub.private:
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        return None
                return hub.repos[repo]

            def _route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if path.startswith("/api/models/"):
                    repo, _, rest = path[len("/api/models/") :].partition("/tree/")
                    files = self._repo(repo)
                    if files is None or not rest:
                        return self._fail(404, "RepoNotFound")
                    listing = [
                        {
                            "type": "file",
                            "path": f,
                            "size": len(b),
                            "oid": hashlib.sha1(b).hexdigest(),
                        }
                        for f, b in files.items()
                    ]
                    body = json.dumps(listing).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                repo, sep, rest = path.lstrip("/").partition("/resolve/")
                files = self._repo(repo) if sep else None
                if files is None:
                    return self._fail(404, "RepoNotFound")
                _rev, _, name = rest.partition("/")
                if name not in files:
                    return self._fail(404, "EntryNotFound")
                data = files[name]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                    status = 206
                self.send_response(status)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return None
                if name in hub.truncate and start == 0:
                    hub.truncate.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return self.connection.shutdown(2)
                return self.wfile.write(data[start:])

            do_GET = do_HEAD = _route

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ggufs")
    # 24 MiB: more than huggingface_hub's 10 MiB download chunk, so a cut download resumes
    q4 = tiny_gguf(tmp / "a.gguf", 1, rows=6144)
    q8 = tiny_gguf(tmp / "b.gguf", 2)
    h = Hub(
        {
            "acme/tiny-GGUF": {
                "tiny.Q4_K_M.gguf": q4,
                "tiny.Q8_0.gguf": q8,
                "README.md": b"# tiny\n",
            },
            "acme/secret-GGUF": {"secret.gguf": q8},
        },
        private={"acme/secret-GGUF"},
    )
    yield h
    h.httpd.shutdown()


def docqa(hub: Hub, tmp: Path, *args: str, token: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        DOCQA_MODEL__STORE_DIR=str(tmp / "store"),
    )
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [DOCQA, "models", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _ggufs(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("*.gguf")) if store.is_dir() else []


def test_pick_gguf():
    files = ["a.Q4_K_M.gguf", "a.Q8_0.gguf", "README.md"]
    assert pick_gguf(files, None, "q4_k_m")[0] == "a.Q4_K_M.gguf"
    assert pick_gguf(files, "a.Q8_0.gguf", None)[0] == "a.Q8_0.gguf"
    assert pick_gguf(["only.gguf"], None, "Q4_K_M")[0] == "only.gguf"
    with pytest.raises(PullError, match="a.Q4_K_M.gguf, a.Q8_0.gguf"):
        pick_gguf(files, None, "Q5_K_M")
    with pytest.raises(PullError, match="no file"):
        pick_gguf(files, "b.gguf", None)
    with pytest.raises(PullError, match="no GGUF"):
        pick_gguf(["README.md"], None, None)


def test_pull_list_rm(hub, tmp_path):
    hub.truncate = {"tiny.Q4_K_M.gguf"}  # the first download breaks halfway
    first = docqa(hub, tmp_path, "pull", "acme/tiny-GGUF")
    if first.returncode != 0:  # huggingface_hub gave up: the next pull resumes
        assert first.returncode == 2, first.stderr
        assert _ggufs(tmp_path / "store") == []  # nothing half-written in the store
        first = docqa(hub, tmp_path, "pull", "acme/tiny-GGUF")
    assert first.returncode == 0, first.stdout + first.stderr
    assert any(r == "GET" and rng and not rng.startswith("bytes=0-") for r, _, rng in hub.requests)
    store = tmp_path / "store"
    assert _ggufs(store) == ["tiny.q4_k_m.gguf"]
    data = (store / "tiny.q4_k_m.gguf").read_bytes()
    assert data == hub.repos["acme/tiny-GGUF"]["tiny.Q4_K_M.gguf"]
    prov = json.loads((store / "tiny.q4_k_m.json").read_text())
    assert prov["sha256"] == hashlib.sha256(data).hexdigest()
    assert prov["hub"]["repo"] == "acme/tiny-GGUF" and prov["hub"]["commit"] == COMMIT
    assert prov["hub"]["choices"] == ["tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"]
    assert not list(store.glob(".downloads/*"))  # staging cleaned

    q8 = docqa(hub, tmp_path, "pull", "acme/tiny-GGUF", "--quant", "q8_0", "--name", "tiny8")
    assert q8.returncode == 0, q8.stderr
    listing = docqa(hub, tmp_path, "list")
    assert "tiny.q4_k_m" in listing.stdout and "tiny8" in listing.stdout
    assert "hf://acme/tiny-GGUF" in listing.stdout
    assert docqa(hub, tmp_path, "rm", "tiny8").returncode == 0
    assert _ggufs(store) == ["tiny.q4_k_m.gguf"] and not (store / "tiny8.json").exists()
    gone = docqa(hub, tmp_path, "rm", "tiny8")
    assert gone.returncode == 2 and "tiny.q4_k_m" in gone.stderr


def test_pull_errors_exit_2_and_write_nothing(hub, tmp_path):
    store = tmp_path / "store"
    r = docqa(hub, tmp_path, "pull", "acme/nope-GGUF")
    assert r.returncode == 2 and "acme/nope-GGUF" in r.stderr and "Traceback" not in r.stderr
    r = docqa(hub, tmp_path, "pull", "acme/tiny-GGUF", "--file", "tiny.Q2_K.gguf")
    assert r.returncode == 2 and "tiny.Q4_K_M.gguf" in r.stderr
    r = docqa(hub, tmp_path, "pull", "acme/tiny-GGUF", "--quant", "Q5_K_M")
    assert r.returncode == 2 and "tiny.Q8_0.gguf" in r.stderr  # lists the choices
    assert _ggufs(store) == [] and not list(store.glob("*.json"))


def test_pull_private_repo_uses_hf_token(hub, tmp_path):
    r = docqa(hub, tmp_path, "pull", "acme/secret-GGUF")
    assert r.returncode == 2
    r = docqa(hub, tmp_path, "pull", "acme/secret-GGUF", token=TOKEN)
    assert r.returncode == 0, r.stderr
    assert _ggufs(tmp_path / "store") == ["secret.gguf"]
