"""docqa.atomic: folders replaced whole or not at all, crashes recovered, leftovers swept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from docqa.atomic import atomic_dir, leftovers, resolve

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
    mine = tmp_path / f".ix.tmp-{os.getpid()}-busy"  # a live writer's folder is not touched
    mine.mkdir()
    assert sorted(leftovers(target)) == sorted([stale[0], legacy])

    with atomic_dir(target) as tmp:
        _write(tmp, "new")
    assert _hidden(tmp_path) == sorted([mine.name, *(p.name for p in leftovers(other))])
    assert (target / "data.txt").read_text() == "new"
    assert (other / "data.txt").read_text() == "other"  # another target's remains are its own
