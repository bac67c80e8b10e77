"""`docqa train <step>` and `docqa train rebuild`: thin wrappers over training.steps."""

from __future__ import annotations

from pathlib import Path

import typer

from docqa.logs import setup_logging

app = typer.Typer(
    help="Make docqa's weights: base, synth, merge, dpo, sft, export, gate, "
    "publish, the retrieval embedder, or a whole recipe with rebuild.",
    no_args_is_help=True,
)

RecipeOpt = typer.Option("smoke", "--recipe", "-r", help="Recipe YAML (or name in recipes/).")
OutOpt = typer.Option(Path("runs/default"), "--out", "-o", help="Run directory.")


def _recipe(recipe: str):
    from training.config import load_recipe

    return load_recipe(recipe)


@app.command()
def rebuild(
    recipe: str = RecipeOpt,
    out: Path = OutOpt,
    force: bool = typer.Option(False, help="Rerun completed steps too."),
):
    """Run every step the recipe lists, resuming completed ones; print a summary table."""
    from training.rebuild import rebuild as run

    setup_logging("INFO")
    try:
        run(_recipe(recipe), out, force=force)
    except Exception as exc:  # noqa: BLE001 - the table shows it; exit non-zero
        typer.secho(f"rebuild stopped: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


def _single(step: str):
    def command(recipe: str = RecipeOpt, out: Path = OutOpt):
        from training.rebuild import _print, run_step

        setup_logging("INFO")
        prov = run_step(_recipe(recipe), step, out)
        _print(
            [{"step": step, "status": "done", "seconds": 0.0, "metrics": prov.get("metrics", {})}],
            None,
        )

    command.__doc__ = f"Run the '{step}' step of a recipe into the run directory."
    return command


for _step in ("base", "synth", "merge", "dpo", "sft", "export", "gate", "publish", "embedder"):
    app.command(name=_step)(_single(_step))
