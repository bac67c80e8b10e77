"""Evaluation targets: a docqa server, any OpenAI-compatible URL, or a local GGUF.

A local GGUF is served by a real docqa server started on loopback for the run
(``server.launch.local_server``: the same code path users get); ``loglik`` scoring loads it
in-process with llama.cpp instead.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.launch import local_server


@dataclass
class Reply:
    text: str = ""
    sources: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class Target:
    """One system under test: a base URL and a model id."""

    name: str
    base_url: str
    model: str
    api_key: str = "unused"
    is_docqa: bool = True
    gguf: str | None = None

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=2, timeout=300)

    def chat(self, messages: list[dict], **kw) -> Reply:
        """One chat call; an error is returned in the reply, never raised."""
        extra = {}
        if "grammar" in kw:
            g = kw.pop("grammar")
            if self.is_docqa:
                extra["grammar"] = g
        try:
            r = self.client().chat.completions.create(
                model=self.model, messages=messages, extra_body=extra or None, **kw
            )
            extra_fields = r.model_extra or {}
            return Reply(r.choices[0].message.content or "", extra_fields.get("sources") or [])
        except Exception as exc:  # noqa: BLE001 - reported per question
            return Reply(error=f"{type(exc).__name__}: {exc}")

    def retrieve(self, query: str, top_k: int = 5) -> list[dict]:
        url = self.base_url.rstrip("/") + "/retrieve"
        r = httpx.post(
            url,
            json={"query": query, "top_k": top_k},
            timeout=60,
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        r.raise_for_status()
        return r.json()["data"]


def model_ids(base_url: str, api_key: str = "unused") -> list[str]:
    r = httpx.get(
        base_url.rstrip("/") + "/models", timeout=30, headers={"Authorization": f"Bearer {api_key}"}
    )
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def parse_target(spec: str):
    """-> (kind, value): ('url', base_url) or ('gguf', path_or_name)."""
    if spec.startswith(("http://", "https://")):
        base = spec.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return "url", base
    return "gguf", spec


@contextlib.contextmanager
def open_target(
    spec: str,
    *,
    model: str | None = None,
    rag: bool = True,
    index: str | None = None,
    name: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    settings: dict | None = None,
):
    """Yield a ready ``Target`` for a URL or a GGUF (served locally for the run, with
    ``settings``, section by section, over the defaults)."""
    kind, value = parse_target(spec)
    if kind == "url":
        key = os.environ.get(api_key_env, "unused")
        ids = []
        with contextlib.suppress(Exception):
            ids = model_ids(value, key)
        is_docqa = "docqa" in ids or any(i.startswith("docqa") for i in ids)
        chosen = model or (
            ("docqa" if rag else next((i for i in ids if i != "docqa"), None)) if is_docqa else None
        )
        if chosen is None:
            raise ValueError(f"give --model for {value}")
        yield Target(name or chosen, value, chosen, key, is_docqa)
        return
    with local_server(value, index if rag else None, extra=settings) as url:
        ids = model_ids(url)
        chosen = "docqa" if rag and "docqa" in ids else next(i for i in ids if i != "docqa")
        yield Target(
            name or f"{Path(value).stem}{'+RAG' if rag else ''}",
            url,
            chosen,
            is_docqa=True,
            gguf=value,
        )
