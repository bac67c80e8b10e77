"""`docqa train rebuild`: run a recipe's steps in order, resuming completed ones.

A failed step stops the run; earlier artifacts and the published model stay. The library
returns rows (one per step); rendering them is the CLI's job (training.cli).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from training.artifacts import done
from training.config import Recipe
from training.registry import plan, plan_for

log = logging.getLogger(__name__)


def run_step(recipe: Recipe, step: str, out: str | Path) -> dict:
    """Run one step of the recipe (its inputs as the recipe's plan resolves them); returns
    the step's provenance. A step the recipe does not list runs as if appended to it."""
    return plan_for(recipe, step).run(recipe, Path(out))


def rebuild(
    recipe: Recipe,
    out: str | Path,
    *,
    force: bool = False,
    dry_run: bool = False,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the recipe's steps into ``out``, resuming those that completed with the same config
    (``force`` reruns them all; a rerun step makes every later step rerun too).

    Returns one row per step: ``step``, ``status`` ("done", "resumed" or "FAILED: ..."),
    ``seconds`` and the step's ``metrics``. ``on_row`` gets each row as it is made, so a
    caller still has the rows when a step fails (the exception propagates).

    ``dry_run`` validates the plan and returns it without running or loading anything: each
    row's status is "would run" or "would resume", with its ``needs``, ``inputs`` (kind ->
    providing step) and ``produces``.
    """
    out = Path(out)
    emit = on_row or (lambda row: None)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        emit(row)

    changed = force
    for p in plan(recipe):
        prov = None if changed else done(out, p.name, p.config)
        if dry_run:
            changed = changed or prov is None
            status = "would resume" if prov is not None else "would run"
            add({"step": p.name, "status": status, "seconds": 0.0, "metrics": {}, **p.describe()})
            continue
        if prov is not None:
            add(
                {
                    "step": p.name,
                    "status": "resumed",
                    "seconds": 0.0,
                    "metrics": prov.get("metrics", {}),
                }
            )
            continue
        changed = True  # later steps depend on this one: rerun them
        t0 = time.time()
        log.info("step %s ...", p.name)
        try:
            prov = p.run(recipe, out)
        except Exception as exc:
            add(
                {
                    "step": p.name,
                    "status": f"FAILED: {exc}",
                    "seconds": round(time.time() - t0, 1),
                    "metrics": {},
                }
            )
            raise
        add(
            {
                "step": p.name,
                "status": "done",
                "seconds": round(time.time() - t0, 1),
                "metrics": prov.get("metrics", {}),
            }
        )
    return rows
