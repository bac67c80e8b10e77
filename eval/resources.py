"""Default evaluation resources, built on demand and cached under var/."""

from __future__ import annotations

from pathlib import Path

VAR = Path("var")


def nitro_index(out: Path = VAR / "nitro-index") -> Path:
    """The Nitro docs index (built once; reused while the docs are unchanged)."""
    from docqa.data import DEFAULT_DOCS
    from retrieval.builder import build_index, default_tokenizer
    from retrieval.embedder import Embedder
    from retrieval.index import save_index

    if not (out / "manifest.json").is_file():
        save_index(build_index(DEFAULT_DOCS, Embedder(), default_tokenizer(), progress=False), out)
    return out


def dev_mcq(out: Path = VAR / "dev_mcq.csv", n: int = 100) -> Path:
    from docqa.data import load_qa, split_qa
    from eval.mcq import build_dev_mcq, write_mcq
    from retrieval.embedder import Embedder

    if not out.is_file():
        _, held = split_qa(load_qa())
        out.parent.mkdir(parents=True, exist_ok=True)
        write_mcq(out, build_dev_mcq(held, Embedder(), n=n))
    return out
