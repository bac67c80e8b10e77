"""Synthesize instruction data from a corpus through any OpenAI-compatible endpoint.

Each 300-token chunk asks for several question/answer pairs of mixed difficulty. Replies
are validated (malformed ones retried, then skipped) and deduplicated. A per-chunk cache makes
runs resumable; requests run with bounded concurrency, retries with backoff, and a progress bar.
Without an endpoint, the existing Q&A CSV is the data (the default: the 3,000 Nitro pairs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from docqa.provenance import atomic_write_text
from training.config import SynthStep

log = logging.getLogger(__name__)

PROMPT = """Below is an excerpt of a software's documentation.
Write {n} question/answer pairs a user of the software could ask that this excerpt answers.
Mix difficulties: some factual lookups (exact names, values, commands), some how-to, some
conceptual. Answers must be correct according to the excerpt and quote exact identifiers.
Reply with JSON only: {{"pairs": [{{"question": "...", "answer": "..."}}]}}

Excerpt ({path} > {heading}):
{text}"""


class BadReply(ValueError):
    pass


class SynthFailed(RuntimeError):
    """More chunks failed than ``synth.max_failed_share`` allows."""


def parse_pairs(reply: str) -> list[dict]:
    """Pull validated pairs out of a model reply; raise ``BadReply`` when there are none."""
    text = reply.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1)
    start = min([i for i in (text.find("{"), text.find("[")) if i >= 0], default=-1)
    if start < 0:
        raise BadReply("no JSON in reply")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise BadReply(f"invalid JSON: {exc}") from exc
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BadReply("no 'pairs' list")
    out = []
    for it in items:
        if not isinstance(it, dict):
            continue
        q, a = str(it.get("question", "")).strip(), str(it.get("answer", "")).strip()
        if len(q) >= 8 and len(a) >= 2 and q.endswith("?") is not None:
            out.append({"question": q, "answer": a})
    if not out:
        raise BadReply("no valid question/answer pairs")
    return out


def dedupe(pairs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in pairs:
        key = " ".join(re.findall(r"[a-z0-9_]+", p["question"].lower()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _ask(client, model: str, prompt: str, retries: int) -> list[dict]:
    delay = 1.0
    for attempt in range(retries + 1):
        try:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.7,
                max_tokens=1500,
            )
            return parse_pairs(r.choices[0].message.content or "")
        except Exception as exc:  # noqa: BLE001 - network, rate limit or bad reply
            if attempt == retries:
                raise
            log.warning("synth retry %d after %s", attempt + 1, exc)
            time.sleep(delay)
            delay = min(delay * 2, 30)
    return []


def synthesize(cfg: SynthStep, out_file: Path, cache: Path) -> dict:
    if cfg.endpoint is None:
        from training.data import train_pairs

        pairs = [
            {"question": p.question, "answer": p.answer} for p in train_pairs(cfg.csv, cfg.limit)
        ]
        out_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        return {"source": "csv", "pairs": len(pairs)}

    from openai import OpenAI

    from docqa.data import DEFAULT_DOCS
    from retrieval.builder import chunk_documents, default_tokenizer
    from retrieval.loaders import load_tree

    chunks = chunk_documents(
        load_tree(cfg.docs or DEFAULT_DOCS),
        default_tokenizer(),
        cfg.chunk_tokens,
        cfg.chunk_overlap,
    )
    client = OpenAI(
        base_url=cfg.endpoint,
        api_key=os.environ.get(cfg.api_key_env, "unused"),
        max_retries=0,
        timeout=300,
    )
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    todo = []
    for c in chunks:
        key = hashlib.sha256(f"{cfg.model}|{cfg.pairs_per_chunk}|{c.id}".encode()).hexdigest()[:20]
        f = cache / f"{key}.json"
        try:
            cached = json.loads(f.read_text())
            if not isinstance(cached, list) or not all(
                isinstance(p, dict) and {"question", "answer"} <= p.keys() for p in cached
            ):
                raise ValueError("not a list of question/answer pairs")
            results[c.id] = cached
        except FileNotFoundError:
            todo.append((c, f))
        except (OSError, ValueError) as exc:  # a damaged cache entry: asked again
            log.warning("synth cache %s unreadable (%s): asking again", f, exc)
            todo.append((c, f))
    failed = 0
    with (
        ThreadPoolExecutor(cfg.concurrency) as pool,
        tqdm(total=len(chunks), initial=len(results), desc="synth", unit="chunk") as bar,
    ):
        futs = {
            pool.submit(
                _ask,
                client,
                cfg.model,
                PROMPT.format(n=cfg.pairs_per_chunk, path=c.path, heading=c.heading, text=c.text),
                cfg.max_retries,
            ): (c, f)
            for c, f in todo
        }
        for fut in as_completed(futs):
            c, f = futs[fut]
            try:
                pairs = fut.result()
                atomic_write_text(f, json.dumps(pairs))
                results[c.id] = pairs
            except Exception as exc:  # noqa: BLE001 - reported, the run continues
                failed += 1
                log.warning("chunk %s failed: %s", c.id, exc)
            bar.update()
    if failed > cfg.max_failed_share * len(chunks):
        raise SynthFailed(
            f"{failed} of {len(chunks)} chunks failed at {cfg.endpoint} (synth.max_failed_share "
            f"{cfg.max_failed_share}); the {len(results)} answered are cached in {cache}, so a "
            "rerun asks only the failed ones"
        )
    allp = dedupe(
        [p | {"chunk_id": cid} for c in chunks for cid in [c.id] for p in results.get(cid, [])]
    )
    if cfg.limit and len(allp) > cfg.limit:  # at most ``limit`` pairs, drawn over the chunks
        allp = random.Random(0).sample(allp, cfg.limit)
    out_file.write_text("".join(json.dumps(p) + "\n" for p in allp))
    return {
        "source": "endpoint",
        "chunks": len(chunks),
        "failed_chunks": failed,
        "pairs": len(allp),
    }
