"""The default corpus: the Nitro docs index, built on demand and cached under var/."""

from __future__ import annotations

from pathlib import Path

VAR = Path("var")


def nitro_index(out: Path | None = None, questions: bool = False) -> Path:
    """The Nitro docs index (built once; reused while the docs are unchanged). With
    ``questions``, the train split of the Nitro Q&A pairs is attached to the chunks
    (question-augmented retrieval; held-out pairs never are)."""
    from docqa.data import DEFAULT_DOCS, load_qa, split_qa
    from retrieval.builder import build_index, default_tokenizer
    from retrieval.embedder import Embedder
    from retrieval.index import find_index, save_index

    out = out or VAR / ("nitro-index-q" if questions else "nitro-index")
    if find_index(out) is None:
        pairs = split_qa(load_qa(duplicates=True))[0] if questions else None
        idx = build_index(
            DEFAULT_DOCS, Embedder(), default_tokenizer(), progress=False, questions=pairs
        )
        save_index(idx, out)
    return out
