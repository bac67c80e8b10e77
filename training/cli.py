"""`docqa train <step>` and `docqa train rebuild`: thin wrappers over training.rebuild and the
step registry; the library returns rows, this module renders them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from docqa.logs import setup_logging
from training.config import STEPS
from training.registry import steps

# the built-in steps in recipe order, then any other registered step
_NAMES = sorted(steps(), key=lambda n: STEPS.index(n) if n in STEPS else len(STEPS))

app = typer.Typer(
    help="Make docqa's weights: one step of a recipe ("
    + ", ".join(_NAMES)
    + "), or a whole recipe with rebuild.",
    no_args_is_help=True,
)

RecipeOpt = typer.Option("smoke", "--recipe", "-r", help="Recipe YAML (or name in recipes/).")
OutOpt = typer.Option(Path("runs/default"), "--out", "-o", help="Run directory.")


def _recipe(recipe: str):
    from training.config import load_recipe

    return load_recipe(recipe)


def _summary(m: dict) -> tuple[str, str]:
    loss = ""
    if m.get("loss_first") is not None:
        loss = f"{m['loss_first3']:.3f} → {m['loss_last3']:.3f}"
    keys = [
        k
        for k in (
            "tokens_per_s",
            "examples",
            "size_bytes",
            "passed",
            "pairs",
            "weight_delta",
            "chosen",
        )
        if k in m
    ]
    info = ", ".join(f"{k}={m[k]}" for k in keys)
    if "metrics" in m and isinstance(m["metrics"], dict):
        info += " " + ", ".join(
            f"{k}: {v['candidate']:.3f} vs {v['published']:.3f}" for k, v in m["metrics"].items()
        )
    for k, v in (m.get("after") or {}).items():
        info += f" {k}: {m['before'].get(k)} -> {v}"
    held = m.get("heldout") or {}
    if "fused" in held and "reranked" in held:  # the reranker step: fused vs reranked order
        info += " " + ", ".join(
            f"{k}: {held['fused'][k]} -> {held['reranked'][k]}" for k in ("recall@1", "mrr")
        )
    return loss, info


def render_rows(rows: list[dict], console: Console | None = None) -> None:
    """The summary table of a run: step, status, time, loss, metrics."""
    t = Table("step", "status", "time (s)", "loss", "metrics")
    for r in rows:
        loss, info = _summary(r["metrics"])
        t.add_row(r["step"], r["status"], f"{r['seconds']:.1f}", loss, info)
    (console or Console()).print(t)


def render_plan(rows: list[dict], console: Console | None = None) -> None:
    """The plan of a dry run: each step's needs, which step provides them, what it makes."""
    t = Table("step", "status", "needs", "inputs", "produces")
    for r in rows:
        inputs = ", ".join(f"{kind} ← {src}" for kind, src in r["inputs"].items())
        t.add_row(r["step"], r["status"], ", ".join(r["needs"]), inputs, ", ".join(r["produces"]))
    (console or Console()).print(t)


@app.command()
def rebuild(
    recipe: str = RecipeOpt,
    out: Path = OutOpt,
    force: bool = typer.Option(False, help="Rerun completed steps too."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the recipe and print its plan; run and load nothing."
    ),
):
    """Run every step the recipe lists, resuming completed ones; print a summary table."""
    from training.rebuild import rebuild as run

    setup_logging("INFO")
    rows: list[dict] = []
    try:
        r = _recipe(recipe)
        run(r, out, force=force, dry_run=dry_run, on_row=rows.append)
    except Exception as exc:  # noqa: BLE001 - the table shows it; exit non-zero
        if rows:
            render_rows(rows)
        typer.secho(f"rebuild stopped: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    if dry_run:
        render_plan(rows)
        typer.echo(f"recipe {r.name!r}: plan of {len(rows)} steps is valid ({out})")
    else:
        render_rows(rows)


def _single(step: str):
    def command(recipe: str = RecipeOpt, out: Path = OutOpt):
        from training.rebuild import run_step

        setup_logging("INFO")
        try:
            prov = run_step(_recipe(recipe), step, out)
        except Exception as exc:  # noqa: BLE001 - reported; exit non-zero
            typer.secho(f"{step} failed: {exc}", fg="red", err=True)
            raise typer.Exit(1) from exc
        render_rows(
            [{"step": step, "status": "done", "seconds": 0.0, "metrics": prov.get("metrics", {})}]
        )

    doc = steps()[step].help
    command.__doc__ = f"Run the '{step}' step of a recipe into the run directory. {doc}".strip()
    return command


for _name in _NAMES:
    app.command(name=_name)(_single(_name))
