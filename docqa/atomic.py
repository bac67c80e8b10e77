"""Folders written whole or not at all: indexes, training step artifacts, cached query encoders.

``atomic_dir(target)`` yields a fresh temporary folder beside ``target``
(``.NAME.tmp-PID.TOKEN-*``: the writer's process id and a token drawn once per process, so a
later process with the same id, such as a restarted container's PID 1, knows the folder is
not its own). When the block ends without an exception its files are flushed to disk
(fsync) and the folder replaces ``target``: the previous ``target`` is first renamed aside to
a backup (``.NAME.old-PID.TOKEN-*``), the new folder is renamed into place, the parent folder
is flushed (a power loss cannot keep the rename and lose the data), then the backup is
removed. When the block raises, the temporary folder is removed and ``target`` is left as it
was.

A process that dies between the two renames leaves no ``target`` but a complete backup:
``resolve(target)`` returns that backup, so readers keep working, and the next successful write
removes it. Leftovers of writers that are no longer running are swept by the next write,
and by ``recover(target, marker)``, which a reader that owns ``target`` (the server, at start)
calls: it puts a complete backup back in place when ``target`` is missing, and removes the
leftovers only once ``target`` is whole. Those of a live process (another writer at work) are
never touched.

Between its steps the writer calls ``_step(name)`` (a no-op): tests replace it to kill the
writer in each window of the swap (``STEPS``), the way a crash would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_SWAP_TRIES = 10  # rounds lost to concurrent writers of the same target before giving up

# The windows of a write, in order: a crash test stops the writer at each (``_step``).
STEPS = (
    "written",  # the temporary folder is complete; nothing renamed yet
    "aside",  # the previous target renamed to its backup; the new one not in place yet
    "swapped",  # the new target in place; the backup not removed yet
    "cleaned",  # the backup removed; the last sweep not run yet
)


_TOKEN = secrets.token_hex(4)  # this process's, in its folder names (see the module's doc)


def _step(name: str) -> None:
    """A hook between the steps of a write (see ``STEPS``); tests replace it."""


def owner() -> str:
    """How this process names its temporary folders and backups: ``PID.TOKEN``."""
    return f"{os.getpid()}.{_TOKEN}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync(p)
        _fsync(Path(dirpath))


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _siblings(target: Path, kind: str) -> list[Path]:
    """The ``kind`` ("tmp" or "old") folders of ``target``, newest first."""
    if not target.parent.is_dir():
        return []
    prefix = _prefix(target, kind)
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=_mtime, reverse=True)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:  # removed meanwhile by its writer
        return -1.0


def _stale(path: Path, target: Path, kind: str) -> bool:
    """True when the writer that named ``path`` is no longer running (or is unknown). A name
    with this process's id but not its token is an earlier process's (the id was reused)."""
    who = path.name[len(_prefix(target, kind)) :].split("-", 1)[0]
    pid, _, token = who.partition(".")
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return token != _TOKEN
    return not _alive(int(pid))


def leftovers(target: str | Path) -> list[Path]:
    """Temporary folders and backups of ``target`` left by writers that are no longer running.
    A backup counts only while ``target`` exists: without it, the backup is the last good copy."""
    target = Path(target)
    kinds = ("tmp", "old") if target.exists() else ("tmp",)
    return [p for k in kinds for p in _siblings(target, k) if _stale(p, target, k)]


def _sweep(target: Path) -> None:
    for p in leftovers(target):
        log.info("removing leftover %s", p)
        shutil.rmtree(p, ignore_errors=True)


def resolve(target: str | Path, marker: str | None = None) -> Path:
    """``target`` when it is there (holding ``marker``, if given); otherwise the newest backup
    that is (a writer died between its two renames); otherwise ``target`` itself."""
    target = Path(target)

    def whole(p: Path) -> bool:
        return (p / marker).exists() if marker else p.exists()

    if whole(target):
        return target
    for backup in _siblings(target, "old"):
        if whole(backup):
            log.warning("%s is missing or incomplete; using its backup %s", target, backup)
            return backup
    return target


def recover(target: str | Path, marker: str) -> Path:
    """Put ``target`` back in order after a crash, for the process that owns it (at start):
    when ``target`` is missing and a backup holding ``marker`` exists (a writer died between
    its two renames), the newest such backup is renamed into place; then, once ``target``
    holds ``marker``, the leftovers of writers that are no longer running are removed. With
    no whole copy anywhere nothing is touched (someone may want to look). -> ``resolve``'s
    answer afterwards."""
    target = Path(target)
    if not target.exists():
        for backup in _siblings(target, "old"):
            if (backup / marker).exists() and _stale(backup, target, "old"):
                try:
                    os.rename(backup, target)
                except OSError as exc:  # another process got there first: fine
                    log.warning("could not restore %s from %s: %s", target, backup, exc)
                else:
                    log.warning("%s was missing: restored from its backup %s", target, backup)
                break
    if (target / marker).exists():
        _sweep(target)
    return resolve(target, marker)


def _swap(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, moving what was there aside first and removing it after.
    A folder another writer puts in place between the two renames is moved aside too (the last
    writer wins); when the rename fails otherwise, the previous ``target`` is put back."""
    stem = f"{_prefix(target, 'old')}{owner()}-{tmp.name.rsplit('-', 1)[-1]}"
    aside: list[Path] = []
    for attempt in range(_SWAP_TRIES):
        backup = target.with_name(f"{stem}-{attempt}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, backup)
            aside.append(backup)
        _step("aside")
        try:
            os.rename(tmp, target)
            break
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt + 1 < _SWAP_TRIES:
                continue  # another writer renamed its folder in between
            if aside and not target.exists():
                with contextlib.suppress(OSError):
                    os.rename(aside.pop(), target)
            for p in aside:
                shutil.rmtree(p, ignore_errors=True)
            raise
    _fsync(target.parent)  # the renames themselves reach the disk before the backup goes
    _step("swapped")
    for p in aside:
        shutil.rmtree(p, ignore_errors=True)
    _step("cleaned")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it replaces
    ``target``, when it raises it is removed and ``target`` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    prefix = f"{_prefix(target, 'tmp')}{owner()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        _sync_tree(tmp)
        _step("written")
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sweep(target)
