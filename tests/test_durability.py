"""Index durability: a writer killed in any window of its swap leaves a loadable last good
index, which the loader (and the server, through the same loader) opens; the server puts a
crash's backup back in place and removes leftovers at start, and the next upload builds on
the recovered index. Document paths are normalized before they become ids; concurrent
deletes of one document give one 200 and 404s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from docqa.atomic import STEPS
from retrieval.chunking import Chunk
from retrieval.index import assemble, find_index, load_index, new_manifest, recover_index
from retrieval.index import save_index as save

from .conftest import FIXTURES
from .conftest import api_error as _error

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ("block", *STEPS)  # "block": the temporary folder half written


def _index(tag: str, n: int):
    chunks = [Chunk(f"{tag}{i}", f"{tag}.md", "", f"{tag} text {i}", 3, i) for i in range(n)]
    emb = np.random.default_rng(n).normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    files = {f"{tag}.md": {"sha256": "x", "title": tag}}
    return assemble(chunks, emb, new_manifest("", files, {}, {"name": "test", "dim": 8}))


def _hidden(parent: Path, name: str = "") -> list[str]:
    """The temporary folders and backups in ``parent`` (of the target ``name``, if given)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


def _crash_save(target: Path, window: str) -> None:
    """In a child process, save a 1-chunk copy of the index at ``target`` over it and die
    (``os._exit``: no clean-up, as a kill) in ``window``."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        import docqa.atomic as atomic
        import retrieval.index as ri

        window = {window!r}
        atomic._step = lambda name: os._exit(3) if name == window else None
        if window == "block":  # the manifest is written last: die just before it
            ri.write_provenance = lambda *a, **k: os._exit(3)
        target = Path({str(target)!r})
        old = ri.load_index(target)
        ri.save_index(ri.assemble(old.chunks[:1], old.embeddings[:1], old.manifest), target)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr


@pytest.mark.parametrize("window", WINDOWS)
def test_a_crash_in_any_window_keeps_the_last_good_index(tmp_path, window):
    target = tmp_path / "ix"
    save(_index("a", 3), target)
    _crash_save(target, window)
    committed = window in ("swapped", "cleaned")  # the new folder was renamed into place
    expected = 1 if committed else 3
    if window != "cleaned":  # the writer died with its temporary folder or backup there
        assert _hidden(tmp_path), "the crash left nothing behind: not in the window"
    assert len(load_index(target)) == expected  # readers work before any recovery
    assert target.exists() == (window != "aside")

    assert recover_index(target) == target  # the owner at start: backup back in place,
    assert _hidden(tmp_path) == []  # leftovers of the dead writer removed
    assert len(load_index(target)) == expected

    save(_index("b", 2), target)  # the next write
    assert len(load_index(target)) == 2 and _hidden(tmp_path) == []


def test_recovery_touches_nothing_without_a_good_copy(tmp_path):
    target = tmp_path / "ix"
    half = tmp_path / ".ix.old-999999999-x-0"  # a dead writer's backup without its manifest
    half.mkdir()
    (half / "chunks.jsonl").write_text("")
    assert recover_index(target) is None and find_index(target) is None
    assert _hidden(tmp_path) == [half.name] and not target.exists()
    with pytest.raises(FileNotFoundError):
        load_index(target)


# -- the server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs_server(server_factory, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    index_dir = docs.parent / "durable-index"
    s = server_factory(
        {
            "model": {"n_ctx": 1024},
            "retrieval": {
                "docs_dir": str(docs),
                "index_dir": str(index_dir),
                "chunk_tokens": 120,
                "chunk_overlap": 20,
            },
        },
        "durable",
    )
    s.index_dir = index_dir
    return s


def _paths(url: str) -> list[str]:
    r = httpx.get(url + "/v1/documents")
    assert r.status_code == 200, r.text
    return sorted(d["path"] for d in r.json()["data"])


def _add(url: str, path: str, text: str = "# Notes\n\nThe quux valve opens at 7 bar.\n"):
    return httpx.post(url + "/v1/documents", json={"path": path, "content": text}, timeout=120)


def test_document_paths_are_normalized_before_they_are_ids(docs_server):
    url = docs_server.url
    before = _paths(url)
    ids = set()
    for variant in ("./notes/valve.md", "notes/valve.md", "notes//valve.md", "notes/./valve.md"):
        r = _add(url, variant)
        assert r.status_code == 200, r.text
        (doc,) = r.json()["data"]
        assert doc["path"] == "notes/valve.md"
        ids.add(doc["id"])
    assert len(ids) == 1
    assert _paths(url) == sorted([*before, "notes/valve.md"])  # one document, not four
    r = httpx.post(
        url + "/v1/documents",
        files={"file": ("valve2.md", b"# V\n\nThe valve.\n", "text/markdown")},
        data={"path": ".//notes/valve2.md"},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["data"][0]["path"] == "notes/valve2.md", r.text
    r = httpx.delete(url + "/v1/documents/notes/./valve2.md")  # found under its normal name
    assert r.status_code == 200 and r.json()["path"] == "notes/valve2.md", r.text

    for bad in ("../up.md", "notes/../../up.md", "/etc/up.md", "nul\x00.md", "tab\t.md", "."):
        assert _error(_add(url, bad), 400)["param"] == "path", bad
    r = httpx.post(
        url + "/v1/documents",
        files={"file": ("../../up.md", b"# Up\n\ntext\n", "text/markdown")},
        timeout=120,
    )
    assert _error(r, 400)["param"] == "file"
    assert _paths(url) == sorted([*before, "notes/valve.md"])


def test_concurrent_deletes_of_one_document(docs_server):
    url = docs_server.url
    r = _add(url, "gone/soon.md")
    assert r.status_code == 200, r.text
    ident = r.json()["data"][0]["id"]
    barrier = threading.Barrier(4)
    codes: list[int] = []

    def delete():
        barrier.wait()
        codes.append(httpx.delete(f"{url}/v1/documents/{ident}", timeout=120).status_code)

    threads = [threading.Thread(target=delete) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 404, 404, 404]
    assert "gone/soon.md" not in _paths(url)


def test_server_opens_the_last_good_index_after_a_crash_mid_swap(docs_server, server_factory):
    """Killed between the two renames (the index aside, the new one not in place), the next
    server start serves the backup, puts it back in place and removes the leftovers; the next
    upload adds to it (before: the server started on an empty index and the upload replaced
    the documents)."""
    index_dir = docs_server.index_dir
    before = _paths(docs_server.url)
    assert "notes/valve.md" in before  # an upload only the index holds (not docs_dir)
    docs_server.stop()
    _crash_save(index_dir, "aside")
    leftovers = lambda: _hidden(index_dir.parent, index_dir.name + ".")  # noqa: E731
    assert not index_dir.exists() and leftovers()

    s = server_factory(
        {"model": {"n_ctx": 1024}, "retrieval": {"index_dir": str(index_dir)}}, "durable2"
    )
    assert _paths(s.url) == before
    assert find_index(index_dir) == index_dir and leftovers() == []
    assert _add(s.url, "later.md").status_code == 200
    assert _paths(s.url) == sorted([*before, "later.md"])
    assert sorted(load_index(index_dir).files) == sorted([*before, "later.md"])
    assert leftovers() == []
