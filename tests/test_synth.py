"""The synth step against an OpenAI-compatible endpoint: a local server on loopback that
serves the chat completions route (a stand-in for the hosted model real users call), so the
step's requests, parsing, cache and failure handling run for real."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training.config import SynthStep
from training.synth import SynthFailed, synthesize

from .conftest import FIXTURES


class _Endpoint:
    """POST /v1/chat/completions: two Q&A pairs about the excerpt's heading; a prompt
    holding ``fail_on`` gets a 500 while it is set."""

    def __init__(self):
        self.fail_on: str | None = None
        self.asked: list[str] = []
        ep = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                head = prompt.split("Excerpt (", 1)[1].split(")", 1)[0]
                ep.asked.append(head)
                if ep.fail_on and ep.fail_on in prompt:
                    self.send_response(500)
                    self.end_headers()
                    return
                tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]  # one per chunk
                pairs = [
                    {"question": f"What is in {head} ({tag})?", "answer": f"{head} explains it."},
                    {"question": f"Where is {head} ({tag})?", "answer": f"In {head}."},
                ]
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {
                                "role": "assistant",
                                "content": json.dumps({"pairs": pairs}),
                            },
                        }
                    ],
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint():
    ep = _Endpoint()
    yield ep
    ep.httpd.shutdown()


def test_synth_fails_with_failed_chunks_and_a_rerun_asks_only_those(endpoint, tmp_path):
    cfg = SynthStep(
        docs=str(FIXTURES / "docs"), endpoint=endpoint.url, pairs_per_chunk=2, max_retries=0
    )
    endpoint.fail_on = "install.md"  # one page's chunks fail
    out, cache = tmp_path / "pairs.jsonl", tmp_path / "cache"
    with pytest.raises(SynthFailed, match="chunks failed") as e:
        synthesize(cfg, out, cache)
    assert not out.exists()  # no pairs file from a run with holes (before: done, pairs missing)
    first = list(endpoint.asked)
    failed = [h for h in first if "install.md" in h]
    assert failed and len(failed) < len(first), first
    assert "rerun asks only the failed ones" in str(e.value)

    endpoint.fail_on, endpoint.asked = None, []
    stats = synthesize(cfg, out, cache)  # resumed: only the failed chunks are asked again
    assert sorted(endpoint.asked) == sorted(failed)
    assert stats["failed_chunks"] == 0 and stats["chunks"] == len(first)
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pairs) == 2 * len(first) and all(p["chunk_id"] for p in pairs)

    # a share of failures the recipe allows: the step is done with what it got
    endpoint.fail_on = "install.md"
    allowed = SynthStep(**cfg.model_dump() | {"pairs_per_chunk": 3, "max_failed_share": 0.9})
    stats = synthesize(allowed, out, cache)  # another cache key: every chunk asked again
    assert stats["failed_chunks"] == len(failed)
    assert stats["pairs"] == 2 * (len(first) - len(failed))


def test_a_damaged_cache_entry_is_asked_again(endpoint, tmp_path):
    cfg = SynthStep(docs=str(FIXTURES / "docs"), endpoint=endpoint.url, pairs_per_chunk=2)
    out, cache = tmp_path / "pairs.jsonl", tmp_path / "cache"
    synthesize(cfg, out, cache)
    n = len(endpoint.asked)
    entry = sorted(cache.glob("*.json"))[0]
    for damage in ('[{"question": "cut off', "null", '[{"q": 1}]'):  # a crash mid-write, ...
        entry.write_text(damage)
        endpoint.asked = []
        stats = synthesize(cfg, out, cache)
        assert len(endpoint.asked) == 1 and stats["chunks"] == n
