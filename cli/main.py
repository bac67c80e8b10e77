"""The ``docqa`` command: thin wrappers over library functions. ``build_app`` mounts each
package's own subcommands (``docqa index|eval|train|reply``); the console script calls
``main``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from docqa.logs import setup_logging
from docqa.settings import load_settings
from models.store import ModelNotFound

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file.", exists=True)


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
    from server.auth import InsecureSettings

    settings = load_settings(
        config,
        server={"host": host, "port": port, "api_key": api_key},
        model={"model": model, "n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx},
        retrieval={"index_dir": index, "docs_dir": docs},
    )
    setup_logging(settings.server.log_level)
    try:
        _preflight(settings)
        app = create_app(settings)
    except (InsecureSettings, ModelNotFound, ValueError, FileNotFoundError) as exc:
        typer.echo(f"docqa serve: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level.lower(),
        access_log=False,
        timeout_keep_alive=settings.server.keep_alive_s,
    )


def _preflight(settings) -> None:
    """What would only fail once the server runs, in the background load (a /health of 503
    for ever): the chat format and the model are checked before it starts."""
    from models.store import ModelStore
    from server.engine import named_chat_format

    ms = settings.model
    # (a missing index_dir is no error: the server starts an empty index there to ingest into,
    # or puts back the backup a crash mid-save left; a folder of other files is one)
    if settings.retrieval.index_dir is not None and not settings.retrieval.database_url:
        from retrieval.index import check_index_dir

        check_index_dir(settings.retrieval.index_dir)
    if ms.chat_format:
        named_chat_format(ms.chat_format)
    if not ms.endpoints:  # a remote model is named by its endpoints (last: may make the F16)
        ModelStore(ms.store_dir).resolve(ms.model)


def _one_line(exc: BaseException) -> str:
    """A settings, file or model error as one line (pydantic: one clause per field)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if isinstance(exc, LookupError) else " ".join(text.split())


def index_kv(
    index: Path = typer.Argument(..., exists=True, help="Built index directory."),
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None, help="Model name or GGUF path."),
    out: Optional[Path] = typer.Option(
        None, help="Cache directory (default retrieval.kv_cache_dir, else <index>.kv)."
    ),
):
    """Precompute the chunk KV caches of an index for the serving model (retrieval.kv_cache):
    grounded answers then prefill only the question. Entries already valid are kept."""
    import json

    from models.store import ModelStore
    from retrieval.index import load_index
    from server import kvcache
    from server.runtime import ModelRuntime

    s = load_settings(
        config,
        model={"model": model, "n_parallel": 1},
        retrieval={"index_dir": index, "kv_cache": True, "kv_cache_dir": out},
    )
    setup_logging("INFO")
    rt = ModelRuntime(
        ModelStore(s.model.store_dir).resolve(s.model.model),
        s.model,
        1,
        kvcache.kv_root(s.retrieval),
    )
    try:
        figures = kvcache.build_cache(rt, s.retrieval, load_index(index).chunks)
    finally:
        rt.close()
    typer.echo(json.dumps(figures, indent=2))


def build_app() -> typer.Typer:
    from eval.cli import app as eval_app
    from models.cli import app as models_app
    from retrieval.cli import app as index_app
    from server.tickets_cli import command as reply_command
    from training.cli import app as train_app

    app = typer.Typer(
        help="docqa: RAG-first documentation Q&A server with its own finetuned model.",
        no_args_is_help=True,
        add_completion=False,
    )
    app.command()(serve)
    index_app.command(name="kv")(index_kv)
    app.add_typer(index_app, name="index")
    app.add_typer(eval_app, name="eval")
    app.add_typer(train_app, name="train")
    app.add_typer(models_app, name="models")
    app.command(name="reply")(reply_command)
    return app


def main() -> None:
    """The console script: a bad settings file, value or environment variable, a missing file
    or an unknown model is one line on stderr and exit code 2, not a traceback."""
    import sys

    import yaml
    from pydantic import ValidationError

    from models.store import ModelNotFound

    try:
        build_app()()
    except (ValidationError, yaml.YAMLError, FileNotFoundError, ModelNotFound) as exc:
        print(f"docqa: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
