"""`docqa train rebuild`: run a recipe's steps in order, resuming completed ones, and print a
summary. A failed step stops the run; earlier artifacts and the published model stay."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from training import steps as S
from training.artifacts import done
from training.config import Recipe

log = logging.getLogger(__name__)


def run_step(recipe: Recipe, step: str, out: Path) -> dict:
    order = list(recipe.steps)
    csv = recipe.synth.csv
    if step == "base":
        return S.run_base(recipe.base, out)
    if step == "synth":
        return S.run_synth(recipe.synth, out)
    if step == "merge":
        return S.run_merge(recipe.merge, out, order, csv)
    if step == "dpo":
        return S.run_dpo(recipe.dpo, out, order, csv)
    if step == "sft":
        return S.run_sft(recipe.sft, out, order, csv)
    if step == "export":
        return S.run_export(recipe.export, out, order)
    if step == "gate":
        return S.run_gate(recipe.gate, out)
    if step == "embedder":
        return S.run_embedder(recipe.embedder, out, csv)
    if step == "publish":
        gate = recipe.gate if "gate" in order else None
        return S.run_publish(recipe.publish, out, recipe.export, gate)
    raise ValueError(f"unknown step {step}")


def rebuild(
    recipe: Recipe, out: str | Path, *, force: bool = False, console: Console | None = None
) -> list[dict]:
    out = Path(out)
    rows = []
    changed = force
    for step in recipe.steps:
        cfg = getattr(recipe, step)
        prov = None if changed else done(out, step, cfg)
        if prov is not None:
            rows.append(
                {
                    "step": step,
                    "status": "resumed",
                    "seconds": 0.0,
                    "metrics": prov.get("metrics", {}),
                }
            )
            continue
        changed = True  # later steps depend on this one: rerun them
        t0 = time.time()
        log.info("step %s ...", step)
        try:
            prov = run_step(recipe, step, out)
        except Exception as exc:
            rows.append(
                {
                    "step": step,
                    "status": f"FAILED: {exc}",
                    "seconds": time.time() - t0,
                    "metrics": {},
                }
            )
            _print(rows, console)
            raise
        rows.append(
            {
                "step": step,
                "status": "done",
                "seconds": round(time.time() - t0, 1),
                "metrics": prov.get("metrics", {}),
            }
        )
    _print(rows, console)
    return rows


def _summary(m: dict) -> tuple[str, str]:
    loss = ""
    if m.get("loss_first") is not None:
        loss = f"{m['loss_first3']:.3f} → {m['loss_last3']:.3f}"
    keys = [
        k
        for k in ("tokens_per_s", "examples", "size_bytes", "passed", "pairs", "weight_delta")
        if k in m
    ]
    info = ", ".join(f"{k}={m[k]}" for k in keys)
    if "metrics" in m and isinstance(m["metrics"], dict):
        info += " " + ", ".join(
            f"{k}: {v['candidate']:.3f} vs {v['published']:.3f}" for k, v in m["metrics"].items()
        )
    for k, v in (m.get("after") or {}).items():
        info += f" {k}: {m['before'].get(k)} -> {v}"
    return loss, info


def _print(rows: list[dict], console: Console | None) -> None:
    console = console or Console()
    t = Table("step", "status", "time (s)", "loss", "metrics")
    for r in rows:
        loss, info = _summary(r["metrics"])
        t.add_row(r["step"], r["status"], f"{r['seconds']:.1f}", loss, info)
    console.print(t)
