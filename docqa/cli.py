"""The ``docqa`` command: thin wrappers over library functions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from docqa.logs import setup_logging
from docqa.settings import load_settings

app = typer.Typer(
    help="docqa: RAG-first documentation Q&A server with its own model.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """docqa: RAG-first documentation Q&A server with its own finetuned model."""


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file.", exists=True)


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    host: Optional[str] = typer.Option(None, help="Interface to bind."),
    port: Optional[int] = typer.Option(None, help="Port to listen on."),
    model: Optional[str] = typer.Option(None, help="Model name or GGUF path."),
    index: Optional[Path] = typer.Option(None, help="Built index directory to serve."),
    docs: Optional[Path] = typer.Option(None, help="Docs folder to index at start-up."),
    n_gpu_layers: Optional[int] = typer.Option(None, help="Layers to offload to the GPU."),
    n_ctx: Optional[int] = typer.Option(None, help="Context window."),
    api_key: Optional[str] = typer.Option(None, help="Require this bearer key on /v1."),
):
    """Serve the model (and the index, when given) over the OpenAI API."""
    import uvicorn

    from server.app import create_app

    settings = load_settings(
        config,
        server={"host": host, "port": port, "api_key": api_key},
        model={"model": model, "n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx},
        retrieval={"index_dir": index, "docs_dir": docs},
    )
    setup_logging(settings.server.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level.lower(),
        access_log=False,
    )


def _register_subcommands() -> None:
    import importlib

    for module, name in (
        ("retrieval.cli", "index"),
        ("eval.cli", "eval"),
        ("training.cli", "train"),
        ("server.tickets_cli", "reply"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module.split(".")[0]):
                continue
            raise
        if hasattr(mod, "app"):
            app.add_typer(mod.app, name=name)
        elif hasattr(mod, "command"):
            app.command(name=name)(mod.command)


_register_subcommands()

if __name__ == "__main__":
    app()
