"""`docqa models pull|list|rm`: the model store (GGUF + provenance JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from docqa.logs import setup_logging
from docqa.settings import load_settings

app = typer.Typer(help="Pull, list and remove models in the model store.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file.")


def _store(config: Optional[Path]):
    from models.store import ModelStore

    s = load_settings(config)
    setup_logging("INFO")
    return ModelStore(s.model.store_dir)


@app.command()
def pull(
    repo: str = typer.Argument(..., help="Hugging Face repo id, e.g. jan-hq/stealth-v1.2-gguf."),
    file: Optional[str] = typer.Option(None, "--file", help="The GGUF file to pull."),
    quant: str = typer.Option(
        "Q4_K_M", "--quant", help="With several GGUFs in the repo: the one whose name has this."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Store name (default: the file's)."),
    revision: str = typer.Option("main", "--revision", help="Branch, tag or commit."),
    config: Optional[Path] = ConfigOpt,
):
    """Download a GGUF from the hub (HF_ENDPOINT, HF_TOKEN honoured; resumes) into the store."""
    from models.store import PullError
    from models.store import pull as pull_model

    store = _store(config)
    try:
        m = pull_model(store, repo, file=file, quant=quant, name=name, revision=revision)
    except PullError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"pulled [bold]{m.id}[/bold] -> {m.path} (sha256 {m.provenance['sha256']})")
    console.print(f"serve it with: docqa serve --model {m.id}")


@app.command("list")
def list_models(config: Optional[Path] = ConfigOpt):
    """The models in the store, with their size, source and sha256."""
    store = _store(config)
    t = Table("id", "size", "source", "sha256")
    for m in store.list():
        prov = m.provenance or {}
        size = m.path.stat().st_size
        t.add_row(
            m.id,
            f"{size / 2**20:.1f} MiB",
            str(prov.get("inputs", {}).get("source", "-")),
            str(prov.get("sha256", "-"))[:16],
        )
    console.print(t)


@app.command("rm")
def rm(name: str = typer.Argument(..., help="Store name."), config: Optional[Path] = ConfigOpt):
    """Delete a model (GGUF and provenance) from the store."""
    from models.store import ModelNotFound, remove

    store = _store(config)
    try:
        removed = remove(store, name)
    except ModelNotFound as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for p in removed:
        console.print(f"removed {p}")
