"""docqa.atomic: folders replaced whole or not at all, crashes recovered, leftovers swept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from docqa import atomic
from docqa.atomic import atomic_dir, leftovers, recover, resolve

ROOT = Path(__file__).resolve().parents[1]


def _write(d: Path, text: str) -> None:
    (d / "data.txt").write_text(text)
    (d / "done").write_text("")


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _crash(target: Path, where: str) -> None:
    """Run a writer of ``target`` in a child process that dies (no cleanup, like a kill)
    ``where`` = "block": inside the with-block; "swap": between the two renames."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from docqa.atomic import atomic_dir

        real = os.rename
        calls = []

        def rename(src, dst):
            calls.append(dst)
            if {where!r} == "swap" and len(calls) == 2:
                os._exit(3)  # the old target is aside, the new one not yet in place
            real(src, dst)

        os.rename = rename
        with atomic_dir(Path({str(target)!r})) as tmp:
            (tmp / "data.txt").write_text("half")
            if {where!r} == "block":
                os._exit(3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr


def test_success_replaces_target_and_leaves_nothing(tmp_path):
    target = tmp_path / "ix"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ix.tmp-") and not target.exists()
        _write(tmp, "one")
    assert (target / "data.txt").read_text() == "one"
    with atomic_dir(target) as tmp:
        assert not any(tmp.iterdir())  # a fresh folder, not a copy of the old one
        _write(tmp, "two")
        assert (target / "data.txt").read_text() == "one"  # untouched until the block ends
    assert (target / "data.txt").read_text() == "two"
    assert _hidden(tmp_path) == []


def test_nested_parent_is_created(tmp_path):
    with atomic_dir(tmp_path / "a" / "b" / "ix") as tmp:
        _write(tmp, "x")
    assert (tmp_path / "a" / "b" / "ix" / "done").is_file()


def test_failure_keeps_previous_target(tmp_path):
    target = tmp_path / "ix"
    with atomic_dir(target) as tmp:
        _write(tmp, "good")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "data.txt").write_text("partial")
            raise OSError("disk full")
    assert (target / "data.txt").read_text() == "good"
    assert _hidden(tmp_path) == []  # the temp folder is gone


def test_failure_without_previous_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "ix") as tmp:
            _write(tmp, "x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_puts_previous_target_back(tmp_path, monkeypatch):
    target = tmp_path / "ix"
    with atomic_dir(target) as tmp:
        _write(tmp, "good")
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ix.tmp-"):
            raise PermissionError("denied")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(PermissionError):
        with atomic_dir(target) as tmp:
            _write(tmp, "new")
    monkeypatch.undo()
    assert (target / "data.txt").read_text() == "good"
    assert _hidden(tmp_path) == []


def test_crash_between_renames_is_recovered(tmp_path):
    target = tmp_path / "ix"
    with atomic_dir(target) as tmp:
        _write(tmp, "good")
    _crash(target, "swap")
    assert not target.exists()
    backup = resolve(target, "done")
    assert backup.name.startswith(".ix.old-") and (backup / "data.txt").read_text() == "good"
    assert resolve(target) == backup  # without a marker: the backup exists
    assert leftovers(target) == [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert backup.exists()  # the last good copy is not a leftover while the target is missing

    with atomic_dir(target) as tmp:  # the next write sweeps the crash's remains
        assert backup.exists()
        _write(tmp, "new")
    assert resolve(target, "done") == target
    assert (target / "data.txt").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_resolve_prefers_a_whole_target(tmp_path):
    target = tmp_path / "ix"
    assert resolve(target) == target  # nothing at all: the caller reports it missing
    target.mkdir()
    assert resolve(target) == target
    assert resolve(target, "done") == target  # no backup holds it either
    backup = tmp_path / ".ix.old-1-x"
    backup.mkdir()
    _write(backup, "old")
    assert resolve(target, "done") == backup  # the target lacks the marker
    _write(target, "new")
    assert resolve(target, "done") == target


def test_leftovers_of_dead_writers_are_swept(tmp_path):
    target = tmp_path / "ix"
    other = tmp_path / "ix2"
    with atomic_dir(target) as tmp:
        _write(tmp, "good")
    with atomic_dir(other) as tmp:
        _write(tmp, "other")
    _crash(target, "block")
    _crash(other, "block")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".ix.tmp-")]
    assert len(stale) == 1 and (stale[0] / "data.txt").read_text() == "half"
    legacy = tmp_path / ".ix.old-notapid"  # an unparseable owner counts as gone
    legacy.mkdir()
    mine = tmp_path / f".ix.tmp-{atomic.owner()}-busy"  # a live writer's folder is not touched
    mine.mkdir()
    assert sorted(leftovers(target)) == sorted([stale[0], legacy])

    with atomic_dir(target) as tmp:
        _write(tmp, "new")
    assert _hidden(tmp_path) == sorted([mine.name, *(p.name for p in leftovers(other))])
    assert (target / "data.txt").read_text() == "new"
    assert (other / "data.txt").read_text() == "other"  # another target's remains are its own


def test_a_reused_process_id_is_not_mistaken_for_a_live_writer(tmp_path):
    """A restarted container's server is PID 1 again: the leftovers of the process before it
    carry the same id. They are that earlier process's (another token, or none in the older
    naming), so a missing target is restored from its backup and the rest is swept (before:
    taken for this process's own, the backup served from aside and every crash left two full
    copies behind)."""
    target = tmp_path / "ix"
    pid = os.getpid()
    backup = tmp_path / f".ix.old-{pid}.0badc0de-abcd-0"  # died between the two renames
    backup.mkdir()
    _write(backup, "good")
    half = tmp_path / f".ix.tmp-{pid}-abcd"  # the older naming, this id
    half.mkdir()
    assert sorted(leftovers(target)) == [half]  # the backup is the last good copy
    assert recover(target, "done") == target
    assert (target / "data.txt").read_text() == "good"
    assert _hidden(tmp_path) == []
    live = tmp_path / f".ix.tmp-{atomic.owner()}-x"  # this process's own, at work
    live.mkdir()
    assert leftovers(target) == []


def test_a_write_reaches_the_disk_before_the_swap(tmp_path, monkeypatch):
    """Every file and folder of the new copy is flushed before it replaces the target, and the
    parent after the renames, before the backup is removed: a power loss cannot leave a
    manifest naming data files that never reached the disk, with no backup left."""
    target = tmp_path / "ix"
    with atomic_dir(target) as tmp:
        _write(tmp, "old")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    steps: list[tuple[str, int]] = []
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_step", lambda name: steps.append((name, len(synced))))
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.npy").write_bytes(b"x" * 10)
        _write(tmp, "new")
        names = {str(tmp / "data.txt"), str(tmp / "done"), str(tmp / "sub" / "part.npy")}
        folders = {str(tmp), str(tmp / "sub")}
    before_swap = dict(steps)["written"]
    assert names | folders <= set(synced[:before_swap])
    assert synced[before_swap : dict(steps)["swapped"]] == [str(tmp_path)]
    assert (target / "data.txt").read_text() == "new"
