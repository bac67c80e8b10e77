"""`docqa index build|add|remove|query`."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from docqa.logs import setup_logging
from docqa.settings import load_settings

app = typer.Typer(help="Build, update and query a retrieval index.", no_args_is_help=True)
console = Console()
DEFAULT_INDEX = Path("var/index")  # when neither --index/--out nor retrieval.index_dir names one


def _settings(config: Optional[Path], **retrieval):
    """The settings with this command's flags over them (so their bounds apply to the flags
    too: ``-k 500`` or ``--chunk-tokens 5`` are refused as in a settings file)."""
    return load_settings(config, retrieval=retrieval)


def _index(s, given: Optional[Path]) -> Path:
    return Path(given or s.retrieval.index_dir or DEFAULT_INDEX)


def _parts(s):
    from retrieval.builder import default_tokenizer
    from retrieval.factory import load_embedder

    setup_logging("INFO")
    return load_embedder(s.embedder), default_tokenizer(s.model.model, s.model.store_dir)


@app.command()
def build(
    docs: Path = typer.Argument(..., exists=True, help="Docs folder (or one file)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Index directory to write (default retrieval.index_dir)."
    ),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True),
    chunk_tokens: Optional[int] = typer.Option(None, help="Chunk size in model tokens."),
    overlap: Optional[int] = typer.Option(None, help="Chunk overlap in tokens."),
    questions: Optional[Path] = typer.Option(
        None,
        exists=True,
        help="Q&A pairs (CSV question,answer or synth JSONL) to attach to the chunks holding "
        "their answers: question-augmented retrieval.",
    ),
    all_questions: bool = typer.Option(
        False, help="Attach held-out pairs too (they are kept out by default, for evaluation)."
    ),
):
    """Build an index from a docs folder (atomic: the old index stays until the new is done)."""
    from retrieval.builder import build_index
    from retrieval.index import save_index
    from retrieval.loaders import LoadReport

    s = _settings(config, chunk_tokens=chunk_tokens, chunk_overlap=overlap)
    out = _index(s, out)
    emb, tok = _parts(s)
    report = LoadReport()
    pairs = None
    if questions is not None:
        from docqa.data import load_qa, split_qa

        pairs = load_qa(questions, duplicates=True)
        pairs = pairs if all_questions else split_qa(pairs)[0]
    idx = build_index(
        docs,
        emb,
        tok,
        size=s.retrieval.chunk_tokens,
        overlap=s.retrieval.chunk_overlap,
        report=report,
        questions=pairs,
    )
    if s.retrieval.database_url:  # the shared store: one transaction replaces its contents
        from retrieval.pgstore import redact

        with _shared_store(s) as store:
            version = store.save(idx)
        where = f"{redact(s.retrieval.database_url)} (version {version})"
    else:
        save_index(idx, out)
        where = str(out)
    for path, why in report.skipped:
        console.print(f"[yellow]skipped[/] {path}: {why}")
    console.print(f"[green]index[/] {where}: {len(report.loaded)} files, {len(idx)} chunks")
    if idx.questions is not None:
        n = idx.questions.n_attached
        console.print(f"[green]questions[/] {n} of {len(idx.questions)} attached to chunks")


@app.command()
def add(
    files: list[Path] = typer.Argument(..., exists=True, help="Files or folders to (re)ingest."),
    index: Optional[Path] = typer.Option(
        None, "--index", "-i", help="Index directory (default retrieval.index_dir)."
    ),
    root: Optional[Path] = typer.Option(
        None,
        help="Paths are stored relative to this root (default: the folder the index was built "
        "from, for files under it, so that an edited file replaces its old version).",
    ),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True),
):
    """Add or replace documents in an index (the shared store's when retrieval.database_url
    is set)."""
    from retrieval.builder import embed_documents, update_index
    from retrieval.loaders import load_tree

    s = _settings(config)
    emb, tok = _parts(s)

    def change(idx):
        built_from = (idx.manifest.get("inputs") or {}).get("docs_root")
        docs = []
        for f in files:
            base = (f.parent if f.is_file() else f).resolve()
            under = root.resolve() if root is not None else None
            if under is None and built_from and Path(built_from) in (base, *base.parents):
                under = Path(built_from)
            for d in load_tree(f):
                if under is not None:
                    d.path = (base / d.path).relative_to(under).as_posix()
                docs.append(d)
        return lambda current: update_index(
            current, emb, tok, add=docs, vectors=embed_documents(idx, emb, tok, docs)
        )

    _edit(s, index, change)


@app.command()
def remove(
    paths: list[str] = typer.Argument(..., help="Document paths (as stored in the index)."),
    index: Optional[Path] = typer.Option(
        None, "--index", "-i", help="Index directory (default retrieval.index_dir)."
    ),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True),
):
    """Remove documents from an index (the shared store's when retrieval.database_url is
    set)."""
    from retrieval.builder import update_index

    s = _settings(config)
    emb, tok = _parts(s)
    _edit(s, index, lambda idx: lambda cur: update_index(cur, emb, tok, remove=list(paths)))


@contextmanager
def _shared_store(s):
    """The shared store at retrieval.database_url, opened and migrated; closed after."""
    from retrieval.pgstore import PgStore

    store = PgStore(s.retrieval.database_url, 1, s.retrieval.db_connect_timeout_s).open()
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def _edit(s, index: Optional[Path], change) -> None:
    """Apply ``change(snapshot)(current) -> new index`` to the local index (``index``, default
    retrieval.index_dir), or to the shared store when retrieval.database_url is set: the slow
    part (``change(snapshot)``: loading and embedding) runs before the store's write
    transaction opens, the edit itself inside it, on the store's latest index, as the server's
    ingest does (so replicas see it)."""
    from retrieval.index import load_index, save_index

    url = s.retrieval.database_url
    if not url:
        index = _index(s, index)
        idx = load_index(index, mmap=False)
        new = change(idx)(idx)
        save_index(new, index)
        console.print(f"[green]index[/] {index}: {len(idx)} -> {len(new)} chunks")
        return
    from retrieval.pgstore import redact

    with _shared_store(s) as store:
        _, snapshot = store.load()
        if snapshot is None:
            raise typer.BadParameter(
                f"the shared store {redact(url)} is empty: build it first (docqa index build)"
            )
        edit = change(snapshot)
        with store.transaction() as tx:
            current = tx.load() or snapshot
            new = edit(current)
            tx.apply(current, new)
    console.print(
        f"[green]index[/] {redact(url)} (version {tx.version}): {len(current)} -> {len(new)} chunks"
    )


@app.command()
def query(
    text: str = typer.Argument(..., help="The question."),
    index: Optional[Path] = typer.Option(
        None, "--index", "-i", help="Index directory (default retrieval.index_dir)."
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", "-k", help="Chunks to show (default: retrieval.top_k)."
    ),
    mode: Optional[str] = typer.Option(
        None, help="hybrid | bm25 | dense (default: retrieval.mode)."
    ),
    path_prefix: Optional[str] = typer.Option(None, help="Only documents under this path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True),
):
    """Query an index and print the best chunks."""
    from retrieval.factory import build_retriever, load_embedder
    from retrieval.index import EmbedderMismatch, load_index

    s = _settings(config, top_k=top_k, mode=mode)
    try:
        ret = build_retriever(load_index(_index(s, index)), s, load_embedder(s.embedder))
    except EmbedderMismatch as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from exc
    res = ret.search(text, s.retrieval.top_k, path_prefix=path_prefix, mode=s.retrieval.mode)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": h.chunk.id,
                        "path": h.chunk.path,
                        "heading": h.chunk.heading,
                        "score": h.score,
                        "text": h.chunk.text,
                    }
                    for h in res.hits
                ],
                indent=2,
            )
        )
        return
    t = Table("#", "score", "path", "heading", "text")
    for i, h in enumerate(res.hits, 1):
        t.add_row(
            str(i),
            f"{h.score:.4f}",
            h.chunk.path,
            h.chunk.heading,
            h.chunk.text[:120].replace("\n", " "),
        )
    console.print(t)
    console.print(f"best dense similarity {res.best_sim:.3f}; {res.timings_ms['total']:.1f} ms")
