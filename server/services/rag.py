"""Grounded answers: retrieval, context block within the budget, citations, abstain, and
live ingest with an atomic retriever swap (queries never see a half-built index)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path

from docqa.settings import Settings
from retrieval.builder import Tokenizer, build_index, update_index
from retrieval.index import Index, assemble, load_index, new_manifest, save_index
from retrieval.loaders import Document
from retrieval.prompting import block as format_block
from retrieval.prompting import rag_messages
from retrieval.search import Hit, Retriever, SearchResult

log = logging.getLogger(__name__)
_CITE = re.compile(r"\[(\d{1,3})\]")
_FOLLOWUP = re.compile(r"\b(it|its|that|this|those|these|they|them|there|he|she|one)\b", re.I)


def fold_query(messages: list[dict[str, str]]) -> str:
    """The retrieval query: the latest user turn, with the previous one folded in when the
    latest looks like a follow-up (short, or leaning on a pronoun)."""
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    if not users:
        return ""
    q = users[-1]
    if len(users) > 1 and (len(q.split()) < 6 or _FOLLOWUP.search(q)):
        q = f"{users[-2]} {q}"
    return q


def cited(text: str, n: int) -> list[int]:
    out = []
    for m in _CITE.finditer(text):
        i = int(m.group(1))
        if 1 <= i <= n and i not in out:
            out.append(i)
    return out


def source(i: int, h: Hit) -> dict:
    c = h.chunk
    return {
        "index": i,
        "id": c.id,
        "path": c.path,
        "heading": c.heading,
        "score": round(h.score, 6),
        "text": c.text,
    }


class RagService:
    def __init__(
        self,
        settings: Settings,
        retriever: Retriever,
        tok: Tokenizer,
        engine,
        index_dir: Path | None,
    ):
        self.settings = settings
        self.retriever = retriever
        self.tok = tok
        self.engine = engine
        self.index_dir = index_dir
        self._write_lock = threading.Lock()

    # -- search ----------------------------------------------------------------------
    def search(
        self,
        query: str,
        top_k: int | None = None,
        path_prefix: str | None = None,
        mode: str = "hybrid",
    ) -> SearchResult:
        r = self.settings.retrieval
        return self.retriever.search(
            query,
            top_k or r.top_k,
            candidates=r.candidates,
            rrf_k=r.rrf_k,
            fusion=r.fusion,
            weights=r.fusion_weights(self.retriever.has_questions),
            path_prefix=path_prefix,
            mode=mode,
        )

    def build_messages(self, messages: list[dict[str, str]], hits: list[Hit]) -> tuple[list, list]:
        """Replace the last user turn by the template with as many chunks as fit the budget."""
        r = self.settings.retrieval
        question = messages[-1]["content"]
        history = [m for m in messages[:-1] if m["role"] != "system"]

        extra_system = [m["content"] for m in messages if m["role"] == "system"]

        def render(blocks: list[str]) -> list[dict[str, str]]:
            return rag_messages(
                r.system_prompt, r.user_template, question, blocks, history, extra_system
            )

        def n_tokens(msgs) -> int:
            return len(self.engine.prompt_tokens(self.engine.format_chat(msgs)))

        budget = self.engine.n_ctx - min(r.answer_reserve, self.engine.n_ctx // 4)
        base = n_tokens(render([]))
        blocks: list[str] = []
        used: list[Hit] = []
        room = budget - base
        for h in hits:
            block = format_block(len(blocks) + 1, h.chunk)
            cost = len(self.tok.tokenize(block)) + 4
            if cost > room:
                ids = self.tok.tokenize(block)[: max(0, room - 8)]
                if len(ids) >= 48:  # a trimmed chunk still worth reading
                    blocks.append(self.tok.detokenize(ids))
                    used.append(h)
                break
            blocks.append(block)
            used.append(h)
            room -= cost
        return render(blocks), used

    async def augment(self, messages: list[dict[str, str]]):
        """-> (messages for the model, Grounding) ."""
        if not messages or messages[-1]["role"] != "user":
            return messages, Grounding([], None)
        query = fold_query(messages)
        res = await asyncio.to_thread(self.search, query)
        r = self.settings.retrieval
        if not res.hits or res.best_sim < r.abstain_threshold:
            log.info("abstain: best similarity %.3f < %.3f", res.best_sim, r.abstain_threshold)
            return messages, Grounding([], r.abstain_message, res.best_sim)
        new_messages, used = self.build_messages(messages, res.hits)
        return new_messages, Grounding(used, None, res.best_sim)

    # -- live ingest -----------------------------------------------------------------
    @property
    def index(self) -> Index:
        return self.retriever.index

    def _swap(self, new: Index) -> None:
        if self.index_dir is not None:
            save_index(new, self.index_dir)  # on disk first: a failure keeps the old
        r = self.settings.retrieval
        self.retriever = Retriever(
            new, self.retriever.embedder, faiss_kind=r.faiss_index, reranker=self.retriever.reranker
        )

    def ingest(self, docs: list[Document]) -> Index:
        with self._write_lock:
            new = update_index(self.index, self.retriever.embedder, self.tok, add=docs)
            self._swap(new)
            return new

    def delete(self, paths: list[str]) -> Index:
        with self._write_lock:
            new = update_index(self.index, self.retriever.embedder, self.tok, remove=paths)
            self._swap(new)
            return new


class Grounding:
    """What retrieval decided for one request; ``finalize`` makes the ``sources`` field."""

    def __init__(self, hits: list[Hit], abstain: str | None, best_sim: float | None = None):
        self.hits = hits
        self.abstain = abstain
        self.best_sim = best_sim

    def finalize(self, text: str) -> dict:
        if self.abstain is not None:
            return {"sources": []}
        idx = cited(text, len(self.hits)) or list(range(1, len(self.hits) + 1))
        return {"sources": [source(i, self.hits[i - 1]) for i in idx]}


def build_rag(settings: Settings, embedder, engine) -> RagService:
    r = settings.retrieval
    tok = Tokenizer.from_llama(engine.model.llm, engine.model.id)
    if r.index_dir is not None and (Path(r.index_dir) / "manifest.json").is_file():
        index = load_index(r.index_dir)
    elif r.docs_dir is not None:
        index = build_index(
            r.docs_dir, embedder, tok, size=r.chunk_tokens, overlap=r.chunk_overlap, progress=False
        )
        if r.index_dir is not None:
            save_index(index, r.index_dir)
    elif r.index_dir is not None:
        log.warning("no index at %s: starting with an empty one", r.index_dir)
        manifest = new_manifest(
            "",
            {},
            {
                "chunk_tokens": r.chunk_tokens,
                "chunk_overlap": r.chunk_overlap,
                "tokenizer": tok.name,
            },
            {"name": embedder.name},
        )
        import numpy as np

        index = assemble([], np.zeros((0, embedder.dim), dtype=np.float32), manifest)
    reranker = None
    if r.reranker:
        from sentence_transformers import CrossEncoder

        reranker = CrossEncoder(r.reranker, device=settings.embedder.device)
    retriever = Retriever(index, embedder, faiss_kind=r.faiss_index, reranker=reranker)
    log.info("retrieval ready: %d chunks", len(index))
    return RagService(settings, retriever, tok, engine, Path(r.index_dir) if r.index_dir else None)
