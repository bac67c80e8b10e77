"""The training step registry and the recipe planner.

Every step registers once, with one run signature::

    @register("sft", SFTStep, needs=(Need("model"), Need("pairs", optional=True)),
              produces={"model": "hf"})
    def run_sft(ctx: StepContext) -> dict: ...

``needs`` are artifact kinds the step reads ("model": an HF model folder, "pairs": Q&A JSONL,
"gguf", "gate", ...), a tuple or a function of the step's config (a merge with a mergekit
config brings its own models and needs none). ``produces`` maps each kind the step makes to
its path inside the step's directory. :func:`plan` resolves, for each step of a recipe, which
earlier step (or the recipe's given ``inputs``) provides each need, so a recipe that cannot run
fails when it is loaded, not hours into a run. Nothing here imports torch or loads a model.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from training.artifacts import PROV, step_path

# a training.config.Recipe; not imported here, so config (which validates recipes with ``plan``)
# and the registry do not import each other
Recipe = Any

log = logging.getLogger(__name__)

GIVEN = "inputs"  # source name of an artifact given in the recipe's ``inputs`` section
# modules whose import registers the steps
BUILTIN = ("training.steps", "training.export", "training.quants")


class RecipeError(ValueError):
    """A recipe whose steps cannot run in the order given."""


@dataclass(frozen=True)
class Need:
    """An artifact kind a step reads. An optional need is used when an earlier step (or a
    given input) provides it; otherwise the step falls back (e.g. to the Q&A CSV)."""

    kind: str
    optional: bool = False

    def __str__(self) -> str:
        return f"{self.kind} (optional)" if self.optional else self.kind


Needs = Union[tuple[Need, ...], Callable[[Any], tuple[Need, ...]]]


@dataclass(frozen=True)
class StepContext:
    """What a step's run function gets: the recipe, its own config, the run directory, the
    resolved paths of the artifacts it needs (kind -> path) and where each came from."""

    recipe: Recipe
    name: str
    config: Any
    out: Path
    inputs: dict[str, Path]
    sources: dict[str, str]
    csv: str | None = None

    def input(self, kind: str) -> Path:
        if kind not in self.inputs:
            raise KeyError(f"step {self.name!r} was planned without a {kind!r} input")
        return self.inputs[kind]

    def has(self, kind: str) -> bool:
        return kind in self.inputs


@dataclass(frozen=True)
class Step:
    name: str
    config: type
    run: Callable[[StepContext], dict]
    produces: Mapping[str, str]
    needs: Needs = ()
    help: str = ""

    def needs_for(self, cfg: Any) -> tuple[Need, ...]:
        return tuple(self.needs(cfg) if callable(self.needs) else self.needs)


REGISTRY: dict[str, Step] = {}


def register(
    name: str, config: type, *, produces: Mapping[str, str], needs: Needs = ()
) -> Callable[[Callable[[StepContext], dict]], Callable[[StepContext], dict]]:
    """Register ``fn(ctx) -> provenance`` as the step ``name`` (decorator)."""

    def deco(fn: Callable[[StepContext], dict]) -> Callable[[StepContext], dict]:
        if name in REGISTRY and REGISTRY[name].run is not fn:
            raise ValueError(f"step {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        REGISTRY[name] = Step(name, config, fn, dict(produces), needs, " ".join(doc.split()))
        return fn

    return deco


def steps() -> dict[str, Step]:
    """Every registered step, by name (the built-in ones are registered on first use)."""
    for module in BUILTIN:
        importlib.import_module(module)
    return REGISTRY


def get_step(name: str) -> Step:
    reg = steps()
    if name not in reg:
        raise RecipeError(f"unknown step {name!r} (known: {', '.join(reg)})")
    return reg[name]


def producers(kind: str) -> list[str]:
    return [s.name for s in steps().values() if kind in s.produces]


@dataclass(frozen=True)
class PlannedStep:
    """One step of a validated plan: its needs and which step provides each (or GIVEN)."""

    name: str
    step: Step
    config: Any
    needs: tuple[Need, ...]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.step.produces)

    def input_paths(self, recipe: Recipe, out: Path) -> dict[str, Path]:
        paths = {}
        for kind, source in self.sources.items():
            if source == GIVEN:
                paths[kind] = Path(recipe.inputs[kind])
            else:
                paths[kind] = step_path(out, source) / get_step(source).produces[kind]
        return paths

    def context(self, recipe: Recipe, out: str | Path) -> StepContext:
        """The run context; every input must exist on disk (else the error names its step)."""
        out = Path(out)
        inputs = self.input_paths(recipe, out)
        for kind, path in inputs.items():
            if not path.exists():
                source = self.sources[kind]
                hint = "a given input" if source == GIVEN else f"step {source!r}"
                fix = "fix the recipe's inputs" if source == GIVEN else f"run {source!r} first"
                raise FileNotFoundError(
                    f"step {self.name!r} needs {kind!r} from {hint}, but {path} does not "
                    f"exist: {fix}"
                )
        return StepContext(
            recipe=recipe,
            name=self.name,
            config=self.config,
            out=out,
            inputs=inputs,
            sources=dict(self.sources),
            csv=recipe.synth.csv,
        )

    def run(self, recipe: Recipe, out: str | Path) -> dict:
        """Run the step and check it made what it declares; returns its provenance."""
        ctx = self.context(recipe, out)
        prov = self.step.run(ctx)
        for kind, rel in self.step.produces.items():
            if not (step_path(ctx.out, self.name) / rel).exists():
                # its provenance goes, so the next rebuild runs it again, not resume it
                (step_path(ctx.out, self.name) / PROV).unlink(missing_ok=True)
                raise RuntimeError(f"step {self.name!r} did not produce {kind!r} ({rel})")
        return prov

    def describe(self) -> dict:
        """The plan row: needs, where each comes from, what the step produces."""
        return {
            "step": self.name,
            "needs": [str(n) for n in self.needs],
            "inputs": dict(self.sources),
            "produces": list(self.produces),
        }


def plan(recipe: Recipe, names: list[str] | None = None) -> list[PlannedStep]:
    """Resolve every step's needs against the steps before it (and the recipe's ``inputs``).

    The provider of a kind is the last earlier step producing it. Raises :class:`RecipeError`
    naming the step and the need when a required need has no provider.
    """
    reg = steps()
    names = list(recipe.steps if names is None else names)
    known = sorted({k for s in reg.values() for k in s.produces})
    unknown = sorted(set(recipe.inputs) - set(known))
    if unknown:
        raise RecipeError(
            f"recipe {recipe.name!r}: unknown input kind(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known)})"
        )
    available: dict[str, str] = dict.fromkeys(recipe.inputs, GIVEN)
    planned: list[PlannedStep] = []
    for name in names:
        if any(p.name == name for p in planned):
            raise RecipeError(
                f"recipe {recipe.name!r}: step {name!r} is listed twice (each step has one "
                "artifact directory)"
            )
        step = get_step(name)
        cfg = getattr(recipe, name)
        if not isinstance(cfg, step.config):
            raise RecipeError(f"step {name!r} expects a {step.config.__name__} config")
        needs = step.needs_for(cfg)
        sources = {}
        for need in needs:
            if need.kind in available:
                sources[need.kind] = available[need.kind]
            elif not need.optional:
                have = ", ".join(f"{k} (from {v})" for k, v in available.items()) or "nothing"
                makers = ", ".join(producers(need.kind)) or "no registered step"
                raise RecipeError(
                    f"recipe {recipe.name!r}: step {name!r} needs {need.kind!r}, which no "
                    f"earlier step or given input provides (available before {name!r}: {have}; "
                    f"{need.kind!r} is produced by: {makers}, or give it in the recipe's "
                    f"inputs: {{{need.kind}: PATH}})"
                )
        planned.append(PlannedStep(name, step, cfg, needs, sources))
        for kind in step.produces:
            available[kind] = name
    return planned


def plan_for(recipe: Recipe, name: str) -> PlannedStep:
    """The planned step ``name`` of the recipe; a step the recipe does not list is planned
    as if appended to its steps (``docqa train embedder --recipe smoke``)."""
    names = list(recipe.steps) if name in recipe.steps else [*recipe.steps, name]
    return next(p for p in plan(recipe, names) if p.name == name)
