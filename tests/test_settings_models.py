"""Unit tests: settings layering (YAML < env < CLI flags) and model resolution."""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from docqa.settings import Settings, load_settings
from models.store import ModelNotFound, ModelStore, clean_id
from server.app import create_app
from server.generation import _held_back

from .conftest import ROOT


def test_defaults():
    s = load_settings()
    assert s.server.port == 8000 and s.model.model == "smollm2-135m-instruct-f16"
    assert s.model.n_parallel == 0  # continuous batching (auto slots) by default
    assert s.retrieval.chunk_tokens == 300 and s.retrieval.chunk_overlap == 30


def test_layering(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9001\n  host: 0.0.0.0\nmodel:\n  n_ctx: 1024\n  n_batch: 64\n")
    s = load_settings(cfg)
    assert (s.server.port, s.server.host, s.model.n_ctx) == (9001, "0.0.0.0", 1024)
    monkeypatch.setenv("DOCQA_SERVER__PORT", "9002")
    monkeypatch.setenv("DOCQA_MODEL__N_CTX", "2048")
    s = load_settings(cfg)
    assert (s.server.port, s.server.host, s.model.n_ctx, s.model.n_batch) == (
        9002,
        "0.0.0.0",
        2048,
        64,
    )
    s = load_settings(cfg, server={"port": 9003, "host": None})
    assert (s.server.port, s.server.host) == (9003, "0.0.0.0")  # None flags don't override
    monkeypatch.setenv("DOCQA_CONFIG", str(cfg))
    assert load_settings().model.n_batch == 64


def test_bounds_and_unknown_keys(tmp_path):
    with pytest.raises(ValidationError):
        load_settings(server={"port": 70000})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  prot: 1\n")
    with pytest.raises(ValidationError):
        load_settings(cfg)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_every_field_is_described():
    sections = [s.annotation for s in Settings.model_fields.values()]
    while sections:
        model = sections.pop()
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} lacks a description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                sections.append(field.annotation)  # nested sections (server.limits)


def test_model_resolution(tmp_path):
    store = ModelStore(tmp_path / "store")
    emb = store.resolve("smollm2-135m-instruct")
    assert emb.path.is_file() and emb.path.suffix == ".gguf"
    assert store.resolve("SmolLM2-135M-Instruct").path == emb.path
    by_path = store.resolve(str(emb.path))
    assert by_path.id == "smollm2-135m-instruct.q4_1" and "/" not in by_path.id
    published = store.publish(emb.path, "my-docs-model", {"note": "test"})
    assert (tmp_path / "store" / "my-docs-model.json").is_file()
    assert store.resolve("my-docs-model").path == published.path
    assert [m.id for m in store.list()] == ["my-docs-model"]
    assert store.list()[0].provenance["upstream"] == {"note": "test"}
    with pytest.raises(ModelNotFound):
        store.resolve("no-such-model")
    with pytest.raises(ModelNotFound):
        store.resolve(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("quant", ["Q8_0", "F16"])
def test_derived_quant_is_made_once_from_the_embedded_model(quant, tmp_path, monkeypatch):
    """A derived quant of the embedded model is made on first use, in the cache shared by every
    store, atomically, with provenance; later resolutions reuse it; one made from another
    version of the embedded file is made again."""
    import gguf

    monkeypatch.setenv("DOCQA_CACHE_DIR", str(tmp_path / "cache"))
    cid = f"smollm2-135m-instruct-{quant.lower()}"
    m = ModelStore(tmp_path / "a").resolve(cid)
    assert m.id == cid and m.path.parent == tmp_path / "cache" / "models"
    r = gguf.GGUFReader(m.path)
    types = {t.tensor_type.name for t in r.tensors}
    assert quant in types and "Q4_1" not in types, types
    prov = m.provenance
    assert prov["config"]["quant"] == quant and prov["sha256"] and prov["inputs"]["source_sha256"]
    if quant == "F16":  # the shipped Q4_1's own weights, in half precision
        import numpy as np
        from gguf.quants import dequantize

        from models.store import embedded_path

        src = {t.name: t for t in gguf.GGUFReader(embedded_path("smollm2-135m-instruct")).tensors}
        n_q41 = 0
        for t in r.tensors:
            s = src[t.name]
            if s.tensor_type.name != "Q4_1":
                continue
            n_q41 += 1
            want = dequantize(s.data, s.tensor_type).reshape(-1)
            got = np.asarray(t.data, dtype=np.float32).reshape(-1)
            assert np.allclose(got, want, rtol=2**-10, atol=2**-24), t.name
        assert n_q41 > 100
    assert not list(m.path.parent.glob("*.part"))
    stamp = m.path.stat().st_mtime_ns
    again = ModelStore(tmp_path / "b").resolve_id(cid)  # another store, by id: the same file
    assert again.path == m.path and m.path.stat().st_mtime_ns == stamp
    rec = json.loads(m.path.with_suffix(".json").read_text())
    rec["inputs"]["source_stat"] = [1, 2]  # as if the embedded package had been upgraded
    m.path.with_suffix(".json").write_text(json.dumps(rec))
    remade = ModelStore(tmp_path / "a").resolve(cid)
    assert remade.path.stat().st_mtime_ns != stamp
    assert remade.provenance["inputs"]["source_stat"] != [1, 2]


def test_derived_model_made_by_one_process_at_a_time(tmp_path):
    """Two processes asking for the derived Q8_0 at once: one makes it while the other waits
    for its lock and then uses that file; a ``.part`` left by a maker that was killed is
    removed by the next one."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    stale = cache / "models" / ".smollm2-135m-instruct-q8_0.killed.part"
    stale.write_bytes(b"half a file")
    code = (
        "from models.store import ModelStore\n"
        "made = ModelStore._make_derived\n"
        "def spy(*a):\n"
        "    print('made')\n"
        "    return made(*a)\n"
        "ModelStore._make_derived = spy\n"
        "m = ModelStore('unused').resolve('smollm2-135m-instruct-q8_0')\n"
        "print(m.path.stat().st_mtime_ns)\n"
    )
    env = {**os.environ, "DOCQA_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(len(o) for o in outs) == [1, 2], outs  # one made it, the other waited
    assert outs[0][-1] == outs[1][-1]  # and used the same file
    assert not stale.exists() and not list((cache / "models").glob("*.part"))


def test_clean_id():
    assert clean_id("/a/b/My Model.Q8_0.gguf") == "my-model.q8_0"


def test_health_is_503_while_loading():
    app = create_app(Settings())
    c = TestClient(app)  # lifespan not run: nothing loaded yet
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"


def test_stop_holdback():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("ab", ["b", "abc"]) == 2


def test_no_setting_is_declared_twice():
    """A second field of the same name in a section silently replaces the first (its default
    and bounds): every section declares each name once."""
    import ast

    tree = ast.parse((ROOT / "docqa" / "settings.py").read_text())
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        names = [
            s.target.id
            for s in cls.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        ]
        assert len(names) == len(set(names)), (
            cls.name,
            sorted(n for n in names if names.count(n) > 1),
        )
    assert Settings().retrieval.candidates == 30  # the retrieval setting, not the answers'


def test_cross_field_bounds_are_checked_when_settings_load():
    """Before, both were accepted: an overlap as large as the chunk failed only inside
    chunking, and a Retry-After floor above its cap was silently clipped."""
    from pydantic import ValidationError

    from docqa.settings import load_settings

    with pytest.raises(ValidationError, match="chunk_overlap .* smaller than chunk_tokens"):
        load_settings(retrieval={"chunk_tokens": 64, "chunk_overlap": 64})
    with pytest.raises(ValidationError, match="retry_after_s .* above retry_after_max_s"):
        load_settings(server={"retry_after_s": 30, "retry_after_max_s": 10})


def test_index_commands_take_the_settings_index_and_bounds(tmp_path):
    """``docqa index query`` reads retrieval.index_dir (was: always var/index) and its flags
    are held to the settings' bounds (``-k 500`` used to pass)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DOCQA_RETRIEVAL__INDEX_DIR": str(tmp_path / "nowhere")}
    base = [sys.executable, "-m", "cli.main", "index", "query", "port"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "nowhere" in r.stderr, r.stderr[-1500:]
    r = subprocess.run([*base, "-k", "500"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "retrieval.top_k" in r.stderr, r.stderr[-1500:]
