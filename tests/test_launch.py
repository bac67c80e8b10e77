"""server.launch: a server that cannot start fails fast with its log, and leaves nothing behind
(the ready path is exercised by every server fixture)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from server.launch import ServerProcess, free_port, running_server


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_exit_at_start_fails_fast_with_the_log(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited") as err:
        with running_server({"model": {"n_ctx": "not-a-number"}}, timeout=120, workdir=tmp_path):
            pass
    assert time.monotonic() - t0 < 60  # did not wait for the timeout
    assert "n_ctx" in str(err.value)  # the tail of the server's own log
    assert (tmp_path / "server.yaml").is_file() and "n_ctx" in (tmp_path / "server.log").read_text()


def test_temp_workdir_is_removed_and_config_gets_loopback_port():
    s = ServerProcess({"model": {"n_ctx": "not-a-number"}}, name="bad")
    assert s.config["server"] == {"host": "127.0.0.1", "port": s.port}
    assert s.url == f"http://127.0.0.1:{s.port}" and s.config_path.is_file()
    s.start()
    with pytest.raises(RuntimeError):
        s.wait_ready(timeout=120)
    s.stop()
    assert not s.workdir.exists()


@pytest.mark.parametrize(
    "yaml_text, env, args, says",
    [
        ("server: {port: 99999}\n", {}, [], "server.port: Input should be less than or equal"),
        ("server: [\n", {}, [], "while parsing"),
        ("{}\n", {"DOCQA_SERVER__PORT": "abc"}, [], "server.port: Input should be a valid integer"),
        ("{}\n", {}, ["--model", "no-such-model"], "unknown model 'no-such-model'"),
        ("{}\n", {"DOCQA_MODEL__CHAT_FORMAT": "nope"}, [], "not a llama.cpp chat format"),
        # the docs given as the index: the first ingest would have deleted them
        ("{}\n", {}, ["--index", str(Path(__file__).parent / "fixtures" / "docs")], "not an index"),
    ],
    ids=["bound", "yaml", "env", "model", "chat-format", "docs-as-index"],
)
def test_a_bad_start_is_one_line_and_exit_code_2(tmp_path, yaml_text, env, args, says):
    """Before: a long traceback (settings, YAML), or a server that started anyway and
    answered 503 for ever (an unknown model, an unknown chat format)."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    cmd = [sys.executable, "-m", "cli.main", "serve", "-c", str(cfg), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], r.stderr[-2000:]
