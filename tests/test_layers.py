"""Arrows point down: every package imports only packages below it (docs/architecture.md)."""

from __future__ import annotations

import ast

from .conftest import ROOT

LAYERS = {
    "docqa": 1,
    "models": 2,
    "retrieval": 3,
    "server": 4,
    "eval": 5,
    "training": 6,
    "benchmarks": 6,
    "cli": 7,
}


def _imports(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_import_runs_back_up():
    bad = []
    for pkg, layer in LAYERS.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for target in set(_imports(path)):
                if target in LAYERS and target != pkg and LAYERS[target] >= layer:
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)
