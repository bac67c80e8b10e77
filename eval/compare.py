"""Target specs for `docqa eval compare`: NAME=SPEC[@model][+rag]."""

from __future__ import annotations


def parse_spec(spec: str) -> tuple[str, str, str | None, bool]:
    name, _, rest = spec.partition("=")
    if not rest:
        name, rest = spec, spec
    rag = rest.endswith("+rag")
    if rag:
        rest = rest[: -len("+rag")]
    model = None
    if "@" in rest:
        rest, model = rest.rsplit("@", 1)
    return name, rest, model, rag
