"""Output folders: which ones a stage may replace, one-step publication, stale temporary folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgetl import paths
from edgetl.errors import UserError
from edgetl.paths import atomic_dir, claim_output, clean_stale
from tests.conftest import REPO, tree_digest


def _made_by_edgetl(folder: Path, kind: str, manifest: str = "manifest.json") -> Path:
    folder.mkdir(parents=True)
    (folder / manifest).write_text(json.dumps({"kind": kind}))
    (folder / "model.tflite").write_bytes(b"old model")
    return folder


def test_a_missing_or_empty_folder_or_one_of_the_same_kind_may_be_replaced(tmp_path: Path) -> None:
    assert claim_output(tmp_path / "new", "edgetl.export") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    claim_output(tmp_path / "empty", "edgetl.export")
    claim_output(_made_by_edgetl(tmp_path / "export", "edgetl.export"), "edgetl.export")
    bundle = _made_by_edgetl(tmp_path / "b", "edgetl.bundle", "bundle.json")
    claim_output(bundle, "edgetl.bundle", manifest="bundle.json")


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda root: (root / "photos").mkdir() or (root / "photos" / "cat.jpg").write_bytes(b"x"), "did not make"),
        (lambda root: _made_by_edgetl(root / "photos", "edgetl.checkpoint"), "'edgetl.checkpoint' folder"),
        (lambda root: (root / "photos").mkdir() or (root / "photos" / "manifest.json").write_text("[1]"),
         "no edgetl manifest.json"),
        (lambda root: (root / "photos").write_text("a file"), "not a folder"),
    ],
)
def test_anything_else_is_refused_with_one_line_naming_it(tmp_path: Path, setup, fragment: str) -> None:
    setup(tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(UserError, match=fragment) as caught:
        claim_output(tmp_path / "photos", "edgetl.export")
    assert str(tmp_path / "photos") in str(caught.value) and "\n" not in str(caught.value)
    assert tree_digest(tmp_path) == before


def test_never_the_input_or_a_folder_that_holds_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoint = _made_by_edgetl(run / "checkpoint", "edgetl.export")  # even when the kind would match
    with pytest.raises(UserError, match="holds this stage's input"):
        claim_output(run, "edgetl.export", [checkpoint])
    with pytest.raises(UserError, match="is this stage's input"):
        claim_output(checkpoint, "edgetl.export", [checkpoint])
    with pytest.raises(UserError, match="is this stage's input"):  # the same folder under another spelling
        claim_output(tmp_path / "run" / ".." / "run" / "checkpoint", "edgetl.export", [checkpoint])
    with pytest.raises(UserError, match="inside the data folder"):
        claim_output(tmp_path / "data" / "checkpoint", "edgetl.checkpoint", keep_out_of=[tmp_path / "data"])
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    with pytest.raises(UserError, match="symbolic link"):
        claim_output(link, "edgetl.export")


def test_publication_replaces_the_folder_in_one_step_and_leaves_nothing_behind(tmp_path: Path) -> None:
    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.tmp-")
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in final.iterdir()) == [paths.CONTENTS_FILE, "new.txt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_or_ctrl_c_leaves_the_previous_folder_exactly_as_it_was(tmp_path: Path, error) -> None:
    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    before = tree_digest(tmp_path)
    with pytest.raises(type(error)), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        raise error
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_check_that_fails_publishes_nothing(tmp_path: Path) -> None:
    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    before = tree_digest(tmp_path)

    def refuse(folder: Path) -> None:
        assert (folder / "empty-result.json").is_file()
        raise UserError("nothing worth publishing")

    with pytest.raises(UserError), atomic_dir(final, check=refuse) as tmp:
        (tmp / "empty-result.json").write_text("{}")
    assert tree_digest(tmp_path) == before


def test_without_an_atomic_exchange_the_two_renames_still_end_in_one_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)  # macOS, old kernels, some file systems
    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (final / "new.txt").is_file()


_KILLED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from edgetl.paths import atomic_dir
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "partial.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(60)
""")


def test_the_next_run_removes_what_a_killed_run_left_and_nothing_else(tmp_path: Path) -> None:
    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    before = tree_digest(final)
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(final)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
    leftover = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert leftover.is_dir() and tree_digest(final) == before  # killed: its temporary folder stays for now
    alive = tmp_path / f".export.tmp-{os.getpid()}-{paths._process_start(os.getpid())}@{paths._host()}-abcdefgh"
    alive.mkdir()  # a live run's temporary folder
    other = tmp_path / ".photos.tmp-1-1@elsewhere-abcdefgh"
    other.mkdir()  # another folder's, another machine's
    (tmp_path / ".export.notes").write_text("the user's")
    assert clean_stale(final) == [leftover.name]
    assert not leftover.exists() and alive.is_dir() and other.is_dir() and (tmp_path / ".export.notes").is_file()
    assert tree_digest(final) == before


def test_a_swap_killed_between_its_two_renames_is_undone(tmp_path: Path) -> None:
    """Without renameat2 the previous folder is moved aside first; if the run dies right there, the next run
    puts it back under its name."""
    moved = tmp_path / f".export.old-999999-1@{paths._host()}-abcdefgh"
    _made_by_edgetl(moved, "edgetl.export")
    before = tree_digest(moved)
    clean_stale(tmp_path / "export")
    assert tree_digest(tmp_path / "export") == before and not moved.exists()


def test_published_folders_and_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """mkdtemp/mkstemp make 0700/0600 entries; a published export must be readable like any other folder."""
    from edgetl.paths import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "export") as tmp:
            atomic_write_bytes(tmp / "model.tflite", b"bytes")
    finally:
        os.umask(mask)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "export" / "model.tflite").stat().st_mode & 0o777 == 0o644


def test_a_ctrl_c_that_a_library_swallowed_still_stops_the_publication(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised inside a finaliser or caught by a bare `except:` vanishes; the press is
    counted all the same, and atomic_dir publishes nothing."""
    import signal as signals

    from edgetl import errors

    final = _made_by_edgetl(tmp_path / "export", "edgetl.export")
    before = tree_digest(tmp_path)
    previous = signals.getsignal(signals.SIGINT)
    errors.watch_interrupts()
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
            try:
                os.kill(os.getpid(), signals.SIGINT)
                time.sleep(0.5)
            except BaseException:  # noqa: BLE001 - what a careless library does
                pass
    finally:
        signals.signal(signals.SIGINT, previous)
        errors._interrupts["count"] = 0
    assert tree_digest(tmp_path) == before


def test_a_users_own_file_in_an_edgetl_folder_is_named_and_never_deleted(tmp_path: Path) -> None:
    """The folder records what its stage wrote; a file or folder a user put there since stops the next run."""
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "edgetl.export"}))
        (tmp / "parts").mkdir()
        (tmp / "parts" / "a.pte").write_bytes(b"a")
    claim_output(final, "edgetl.export")  # nothing of the user's: it may be replaced
    (final / "notes.txt").write_text("my notes")
    (final / "photos").mkdir()
    (final / "photos" / "cat.jpg").write_bytes(b"cat")
    (final / "parts" / "mine.txt").write_text("mine")
    before = tree_digest(tmp_path)
    with pytest.raises(UserError) as caught:
        claim_output(final, "edgetl.export")
    message = str(caught.value)
    assert "3 file(s) edgetl did not write" in message and "\n" not in message
    assert all(name in message for name in ("'notes.txt'", "'photos/'", "'parts/mine.txt'")), message
    assert tree_digest(tmp_path) == before


def test_a_folder_made_before_contents_were_recorded_is_still_replaced(tmp_path: Path) -> None:
    claim_output(_made_by_edgetl(tmp_path / "export", "edgetl.export"), "edgetl.export")


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tmp_path: Path) -> None:
    """Another process holds the folder (as a running stage does from its claim to its publication)."""
    final = tmp_path / "export"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edgetl.paths import lock_output
        lock_output(Path({str(final)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=r"being written by another edgetl run \(process \d+@"):
            claim_output(final, "edgetl.export")
        with pytest.raises(UserError, match="being written by another edgetl run"), atomic_dir(final):
            pass
        assert not final.exists()
    finally:
        holder.kill()
        holder.wait()
    with atomic_dir(final) as tmp:  # the killed holder's lock file is taken over, then removed
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_checks_of_one_folder_at_the_same_moment_never_refuse_each_other(tmp_path: Path) -> None:
    """The ranks of one distributed run check their checkpoint folder together: the check's brief lock is no
    other run writing it. Two processes checking 300 times each, side by side, are never refused."""
    final = tmp_path / "checkpoint"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from edgetl.paths import claim_output
        sys.stdin.readline()
        for _ in range(300):
            claim_output(Path({str(final)!r}), "edgetl.checkpoint")
    """)
    checkers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=REPO) for _ in range(2)]
    for checker in checkers:  # both start checking once both have imported edgetl
        checker.stdin.write("go\n")
        checker.stdin.flush()
    for checker in checkers:
        assert checker.wait(timeout=120) == 0, checker.stderr.read()[-2000:]
    assert not list(tmp_path.iterdir())  # no lock file left behind


def test_a_lock_held_without_a_name_is_waited_for_then_refused(tmp_path: Path) -> None:
    """A holder that has not written its pid is a check about to release, or a run about to sign: waited for
    briefly, and refused (naming no process) only when it keeps the lock."""
    final = tmp_path / "export"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(tmp_path / ".export.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(float(sys.argv[1]))
    """), "0.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        claim_output(final, "edgetl.export")  # waited until the holder exited
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(tmp_path / ".export.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(UserError, match=r"being written by another edgetl run \(process unknown\)"):
            claim_output(final, "edgetl.export")
        assert 1.5 < time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


def test_a_mount_point_is_refused_before_any_work(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = tmp_path / "mnt"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        with pytest.raises(UserError, match="is a mount point") as caught:
            claim_output(where, "edgetl.export")
        assert str(where / "mnt") in str(caught.value)
        (where / "manifest.json").write_text(json.dumps({"kind": "edgetl.export"}))
        with pytest.raises(UserError, match="is a mount point"):
            claim_output(where, "edgetl.export")
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_folder_built_inside_a_temporary_folder_takes_no_lock(tmp_path: Path) -> None:
    """A sweep's exports are built inside the sweep's temporary folder: private to that run, no lock file in them."""
    with atomic_dir(tmp_path / "sweep") as outer, atomic_dir(outer / "variants" / "export") as inner:
        assert not list((outer / "variants").glob(".*.lock"))
        (inner / "x").write_text("x")
    assert sorted(p.name for p in (tmp_path / "sweep" / "variants").iterdir()) == ["export"]


def test_a_users_file_under_the_lock_name_is_never_overwritten(tmp_path: Path) -> None:
    """`.export.lock` beside the folder that edgetl did not write (other content, or a symlink) is refused, kept."""
    (tmp_path / ".export.lock").write_text("my shopping list")
    with pytest.raises(UserError, match="not an edgetl lock file"):
        claim_output(tmp_path / "export", "edgetl.export")
    assert (tmp_path / ".export.lock").read_text() == "my shopping list"
    (tmp_path / ".export.lock").unlink()
    (tmp_path / "target.txt").write_text("keep")
    (tmp_path / ".export.lock").symlink_to(tmp_path / "target.txt")
    with pytest.raises(UserError, match="symbolic link"):
        claim_output(tmp_path / "export", "edgetl.export")
    assert (tmp_path / "target.txt").read_text() == "keep" and (tmp_path / ".export.lock").is_symlink()
