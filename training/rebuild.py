"""`docqa train rebuild`: run a recipe's steps in order, resuming completed ones.

A failed step stops the run; earlier artifacts and the published model stay. The library
returns rows (one per step); rendering them is the CLI's job (training.cli).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from docqa.provenance import atomic_write_text
from training.artifacts import SETTINGS_STEPS, done, served_settings
from training.config import Recipe
from training.registry import plan, plan_for

log = logging.getLogger(__name__)


CHAIN = "chain.json"  # in ``out``: what each step was made from (see ``_upstream``)


def _path_stamp(value) -> str | None:
    """A fingerprint of the file or folder a config value names (sizes and mtimes), else
    None: a given model folder or CSV that changed on disk makes the step stale."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return None
    p = Path(value)
    try:
        if p.is_file():
            st = p.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        if p.is_dir():
            h = hashlib.sha256()
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    st = (Path(root) / name).stat()
                    rel = os.path.relpath(Path(root) / name, p)
                    h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            return h.hexdigest()[:16]
    except OSError:
        return None
    return None


_OUTPUTS = {"store_dir"}  # config fields naming where a step writes, not what it reads


def _paths_in(data) -> dict[str, str]:
    """Every string in ``data`` (a config dump) that names an existing path -> its stamp
    (fields naming where a step writes left out)."""
    found: dict[str, str] = {}

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k not in _OUTPUTS:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif (stamp := _path_stamp(v)) is not None:
            found[v] = stamp

    walk(data)
    return found


def _upstream(recipe: Recipe, made: list[list[str]], config, step: str) -> str:
    """What a step is made from: the recipe's given inputs and Q&A CSV as they are on disk,
    the steps before it (each one's config hash and when it was made), any path its own
    config names, and for a step that serves prompts or models (``SETTINGS_STEPS``) docqa's
    settings (``served_settings``: a gate run under other retrieval settings is not resumed).
    A step resumes only when this is what it was made from; before, only its own config
    counted, so a step whose upstream was rerun (or whose given files changed) was resumed
    as it stood, and a gate could pass a model it had never evaluated."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    given = {"inputs": dict(recipe.inputs), "csv": recipe.synth.csv}
    doc = {"given": _paths_in(given), "steps": made, "own": _paths_in(cfg)}
    if step in SETTINGS_STEPS:
        doc["settings"] = served_settings()
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _read_chain(out: Path) -> dict:
    try:
        return json.loads((out / CHAIN).read_text())
    except (OSError, ValueError):
        return {}


def _stamp(name: str, prov: dict) -> list[str]:
    return [name, str(prov.get("config_hash")), str(prov.get("created_unix"))]


def mark_made(recipe: Recipe, out: str | Path, step: str) -> None:
    """Record what ``step``'s artifact in ``out`` was made from (the steps before it in the
    recipe's plan, as they are on disk now), so that a rebuild may resume it."""
    out = Path(out)
    made = []
    p = plan_for(recipe, step)
    for q in plan(recipe):
        if q.name == step:
            break
        prov = done(out, q.name)
        if prov is not None:
            made.append(_stamp(q.name, prov))
    _record(out, step, _upstream(recipe, made, p.config, step))


def _record(out: Path, step: str, upstream: str) -> None:
    """Write down (atomically, in ``out/chain.json``) what ``step`` was made from."""
    chain = _read_chain(out)
    chain[step] = upstream
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CHAIN, json.dumps(chain, indent=2, sort_keys=True) + "\n")


def run_step(recipe: Recipe, step: str, out: str | Path) -> dict:
    """Run one step of the recipe (its inputs as the recipe's plan resolves them); returns
    the step's provenance. A step the recipe does not list runs as if appended to it."""
    prov = plan_for(recipe, step).run(recipe, Path(out))
    mark_made(recipe, out, step)
    return prov


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
    chain = _read_chain(out)
    made: list[list[str]] = []  # [step, config hash, made at] of the steps so far
    for p in plan(recipe):
        upstream = _upstream(recipe, made, p.config, p.name)
        prov = None if changed else done(out, p.name, p.config)
        if prov is not None and chain.get(p.name) != upstream:
            prov = None  # made from other upstream artifacts or inputs than those now
        if dry_run:
            changed = changed or prov is None
            status = "would resume" if prov is not None else "would run"
            add({"step": p.name, "status": status, "seconds": 0.0, "metrics": {}, **p.describe()})
            continue
        if prov is not None:
            made.append(_stamp(p.name, prov))
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
        _record(out, p.name, upstream)
        made.append(_stamp(p.name, prov))
        add(
            {
                "step": p.name,
                "status": "done",
                "seconds": round(time.time() - t0, 1),
                "metrics": prov.get("metrics", {}),
            }
        )
    return rows
