"""End-to-end grounded answers and live ingest on a real server over the fixture docs."""

from __future__ import annotations

import re
import shutil
import threading

import httpx
import pytest
from openai import OpenAI

from .conftest import FIXTURES, SERVED, api_error


@pytest.fixture(scope="module")
def rag_server(server_factory, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    shutil.copytree(FIXTURES / "docs", docs, dirs_exist_ok=True)
    extra = tmp_path_factory.mktemp("extra")
    (extra / "flux.md").write_text(
        "# Flux module\n\nThe flux capacitor of Zephyrd needs "
        "exactly 1.21 gigawatts, set with `flux_power_gw`.\n"
    )
    (extra / "notes.bin").write_bytes(b"\x00\x01binary")
    s = server_factory(
        {
            "model": {"n_ctx": 1024},
            "retrieval": {
                "docs_dir": str(docs),
                "index_dir": str(docs.parent / "rag-index"),
                "chunk_tokens": 120,
                "chunk_overlap": 20,
                "top_k": 8,
                "answer_reserve": 256,
                "allowed_roots": [str(extra)],
            },
        },
        "rag",
    )
    s.extra = extra
    s.index_dir = docs.parent / "rag-index"
    return s


@pytest.fixture(scope="module")
def rc(rag_server):
    return OpenAI(base_url=rag_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_models_list_rag_id(rc):
    ids = [m.id for m in rc.models.list().data]
    assert ids[0] == "docqa" and SERVED in ids


def test_grounded_answer_has_sources(rc):
    r = rc.chat.completions.create(
        model="docqa",
        max_tokens=60,
        temperature=0,
        messages=[{"role": "user", "content": "Which port does the Zephyrd HTTP API listen on?"}],
    )
    sources = r.model_extra["sources"]
    keys = {"index", "id", "path", "heading", "score", "text", "cited", "evidence"}
    assert sources and all(keys <= set(s) for s in sources)
    assert "guide/install.md" in [s["path"] for s in sources]
    answer = r.choices[0].message.content
    assert answer
    # cited: the excerpts the answer tags as [n]; with none tagged, all of them are listed
    tags = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
    for s in sources:
        assert s["cited"] == (s["index"] in tags)
    # what the answer names that its sources lack, for a client to flag
    held = "\n".join(s["text"] for s in sources).lower() + "which port does the zephyrd"
    assert all(n.lower() not in held for n in r.model_extra["unsupported"])
    # evidence: the lines that answer, as offsets into each source's text
    ev = [(s, e) for s in sources for e in s["evidence"]]
    assert ev and any("7431" in e["text"] for _, e in ev)
    for s, e in ev:
        assert s["text"][e["start"] : e["end"]] == e["text"]
    # the context budget (n_ctx 1024, 256 reserved) cannot hold top_k=8 chunks of 120 tokens
    assert r.usage.prompt_tokens <= 1024 - 256


def test_streamed_sources_on_final_chunk(rc):
    chunks = list(
        rc.chat.completions.create(
            model="docqa",
            max_tokens=30,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "What does max_parallel_jobs limit?"}],
        )
    )
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    paths = [s["path"] for s in final[0].model_extra["sources"]]
    assert "guide/config.md" in paths
    assert all("sources" not in (c.model_extra or {}) for c in chunks if c is not final[0])


def test_abstains_off_topic(rc):
    r = rc.chat.completions.create(
        model="docqa",
        max_tokens=40,
        messages=[{"role": "user", "content": "What is a good recipe for chocolate cake?"}],
    )
    assert r.model_extra["sources"] == []
    assert "documentation" in r.choices[0].message.content


def test_bare_model_has_no_retrieval(rc):
    r = rc.chat.completions.create(
        model=SERVED,
        max_tokens=10,
        messages=[{"role": "user", "content": "Which port does Zephyrd use?"}],
    )
    assert "sources" not in (r.model_extra or {})


def test_retrieve_endpoint(rag_server):
    r = httpx.post(
        rag_server.url + "/v1/retrieve", json={"query": "How do I cancel a job?", "top_k": 3}
    )
    data = r.json()["data"]
    assert len(data) == 3 and data[0]["source"]["path"] == "api/openapi.yaml"
    assert {"id", "text", "score", "source"} <= set(data[0])
    r = httpx.post(
        rag_server.url + "/v1/retrieve",
        json={"query": "port", "top_k": 5, "filter": {"path_prefix": "guide/config"}},
    )
    assert all(d["source"]["path"] == "guide/config.md" for d in r.json()["data"])
    r = httpx.post(rag_server.url + "/v1/retrieve", json={"query": "", "top_k": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"


def test_served_int8_queries_match_fp32(rag_server):
    """The server embeds queries with the int8 ONNX encoder (built at start into the cache,
    with provenance) and ranks as the fp32 path does on the same index."""
    import json
    import os
    from pathlib import Path

    from docqa.settings import Settings
    from retrieval.factory import build_retriever
    from retrieval.index import load_index

    health = httpx.get(rag_server.url + "/health").json()
    assert health["embedder"] == {"name": "all-minilm-l6-v2", "query_backend": "onnx-int8"}
    cached = list((Path(os.environ["DOCQA_CACHE_DIR"]) / "embedders").glob("*/provenance.json"))
    assert cached and json.loads(cached[0].read_text())["kind"] == "query-encoder"
    fp32_settings = Settings(embedder={"query_backend": "torchscript"})
    fp32 = build_retriever(load_index(rag_server.index_dir), fp32_settings)  # as the server fuses
    for q in ["Which port does the API listen on?", "How do I cancel a job?", "log rotation"]:
        served = httpx.post(rag_server.url + "/v1/retrieve", json={"query": q, "top_k": 3})
        ids = [d["id"] for d in served.json()["data"]]
        assert ids[0] == fp32.search(q, 3).hits[0].chunk.id


def _paths(url: str, q: str) -> list[str]:
    r = httpx.post(url + "/v1/retrieve", json={"query": q, "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    return [d["source"]["path"] for d in r.json()["data"]]


def test_ingest_and_delete_while_serving(rag_server):
    url = rag_server.url
    q = "How much power does the flux capacitor need?"
    assert "uploads/flux.md" not in _paths(url, q)
    errors: list[str] = []
    stop = threading.Event()

    def hammer():  # queries keep working during the ingest and swap
        while not stop.is_set():
            try:
                _paths(url, "Which port does the API use?")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        r = httpx.post(
            url + "/v1/documents",
            timeout=60,
            json={"path": "uploads/flux.md", "content": (rag_server.extra / "flux.md").read_text()},
        )
        assert r.status_code == 200, r.text
        doc = r.json()["data"][0]
        assert doc["path"] == "uploads/flux.md" and doc["chunks"] >= 1
    finally:
        stop.set()
        t.join()
    assert not errors
    assert _paths(url, q)[0] == "uploads/flux.md"
    manifest = (rag_server.index_dir / "manifest.json").read_text()
    assert "uploads/flux.md" in manifest  # persisted atomically
    listed = httpx.get(url + "/v1/documents").json()["data"]
    assert doc["id"] in [d["id"] for d in listed]
    r = httpx.delete(url + f"/v1/documents/{doc['id']}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert "uploads/flux.md" not in _paths(url, q)
    assert httpx.delete(url + f"/v1/documents/{doc['id']}").status_code == 404


def test_upload_multipart_and_allowed_path(rag_server):
    url = rag_server.url
    files = {"file": ("flux.md", (rag_server.extra / "flux.md").read_bytes(), "text/markdown")}
    r = httpx.post(url + "/v1/documents", files=files, data={"path": "up/flux.md"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _paths(url, "flux capacitor gigawatts")[0] == "up/flux.md"
    r = httpx.post(
        url + "/v1/documents", json={"path": str(rag_server.extra / "flux.md")}, timeout=60
    )
    assert r.status_code == 200 and r.json()["data"][0]["path"] == "flux.md"
    httpx.delete(url + "/v1/documents/up/flux.md")
    httpx.delete(url + "/v1/documents/flux.md")


def test_odd_document_names_and_content_types(rag_server):
    """Found by a review: a name too long for the file system, or a NUL in a server path, were
    500s; a mixed-case multipart Content-Type was read as JSON."""
    url = rag_server.url
    long_name = "a" * 300 + ".md"  # over 255 bytes: stored under its name, not written under it
    r = httpx.post(
        url + "/v1/documents",
        json={"path": long_name, "content": "# Longname\n\nThe wobble port is 6161.\n"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["path"] == long_name
    assert httpx.delete(url + "/v1/documents/" + long_name).status_code == 200
    for bad in (str(rag_server.extra) + "/a\x00.md", str(rag_server.extra) + "/" + "b" * 300):
        r = httpx.post(url + "/v1/documents", json={"path": bad}, timeout=60)
        assert api_error(r, 400)["param"] == "path", bad
    req = httpx.Request(
        "POST",
        url + "/v1/documents",
        files={"file": ("case.md", b"# Case\n\nThe case port is 5151.\n", "text/markdown")},
    )
    req.headers["Content-Type"] = req.headers["Content-Type"].replace(
        "multipart/form-data", "Multipart/Form-Data"
    )
    r = httpx.Client(timeout=60).send(req)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["path"] == "case.md"
    assert httpx.delete(url + "/v1/documents/case.md").status_code == 200


def test_ingest_by_path_skips_links_out_of_the_allowed_root(rag_server, tmp_path):
    """A symbolic link inside an allowed root (a git checkout can hold them) must not ingest
    the file it points to outside the root; the linked file itself is refused by its real
    path."""
    url = rag_server.url
    outside = tmp_path / "secret.md"
    outside.write_text("# Keys\n\nThe zorblax master key is hunter2-zorblax.\n")
    folder = rag_server.extra / "linked"
    folder.mkdir()
    (folder / "ok.md").write_text("# Ok\n\nThe quibble port is 7070.\n")
    (folder / "notes.md").symlink_to(outside)
    r = httpx.post(url + "/v1/documents", json={"path": str(folder)}, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["path"] for d in r.json()["data"]] == ["linked/ok.md"]
    assert "linked/notes.md" not in _paths(url, "zorblax master key")
    r = httpx.post(url + "/v1/documents", json={"path": str(folder / "notes.md")}, timeout=60)
    assert api_error(r, 403)["param"] == "path"
    assert httpx.delete(url + "/v1/documents/linked/ok.md").status_code == 200


def test_failed_ingest_keeps_index(rag_server):
    url = rag_server.url
    before = httpx.get(url + "/v1/documents").json()["data"]
    bad = [
        ({"path": "/etc/passwd"}, 403),
        ({"path": "x.png", "content": "abc"}, 400),
        ({"path": "empty.md", "content": "   "}, 400),
        ({"path": str(rag_server.extra / "notes.bin")}, 400),
        ({"nothing": 1}, 400),
    ]
    for body, status in bad:
        r = httpx.post(url + "/v1/documents", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/v1/documents").json()["data"] == before
