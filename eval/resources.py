"""Default evaluation resources, built on demand and cached under var/ (the Nitro index itself
is ``retrieval.corpus.nitro_index``)."""

from __future__ import annotations

from pathlib import Path

from retrieval.corpus import VAR


def dev_mcq(out: Path = VAR / "dev_mcq.csv", n: int = 100) -> Path:
    from docqa.data import load_qa, split_qa
    from eval.mcq import build_dev_mcq, write_mcq
    from retrieval.embedder import Embedder

    if not out.is_file():
        _, held = split_qa(load_qa())
        out.parent.mkdir(parents=True, exist_ok=True)
        write_mcq(out, build_dev_mcq(held, Embedder(), n=n))
    return out
