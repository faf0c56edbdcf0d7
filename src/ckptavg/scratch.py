"""Scratch folders: temporary folders that belong to one process, for as long as it lives.

``interpolate`` averages each point into one, ``convert`` builds its GPT-2 folder in one. A scratch
folder is removed when its block ends, however it ends: success, an error, Ctrl-C, or SIGTERM (what
SLURM sends at a time limit), which ``sigterm_raises`` turns into the exception :class:`Terminated`
for as long as such a command runs, so that the same clean-up runs as on Ctrl-C. A process killed
outright (SIGKILL, out of memory, a lost node) cannot clean up; its folder stays, and a later run
removes it: ``remove_abandoned``.

Which folders are abandoned is told by a lock, not by names: the owner holds an ``flock`` on the folder
from the moment it exists until it is removed, and the kernel drops the lock when the process dies,
however it dies. A later run removes a same-prefix folder whose lock it can take (and holds that lock
while removing it); it keeps one whose lock is held, one of another user, and one whose lock it cannot
even try (a file system without flock). The writer's temporary output folders are locked the same way
(``writers/safetensors_folder.py``), and they differ in what a kill leaves: an averaging run's folder
holds progress the same command resumes, so it is kept, whereas a scratch folder holds nothing worth
resuming (one interpolation point, one conversion), so it is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType

from ckptavg.errors import Terminated


class _Gate:
    """What the handler of ``sigterm_raises`` consults: whether a step that must not be cut in two runs
    (``uninterrupted``), and whether it already raised (further signals wait for the clean-up)."""

    def __init__(self) -> None:
        self.closed = 0
        self.pending: int | None = None
        self.fired = False


_GATE = _Gate()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    SIGTERM during the clean-up is ignored, so it runs to the end); the previous handler is restored
    after. For a command line tool's commands: a library leaves signals to its caller. Off the main
    thread, where Python cannot install a handler, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if _GATE.fired or _GATE.pending is not None:
            return
        if _GATE.closed:
            _GATE.pending = signum
            return
        _GATE.fired = True
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _GATE.fired, _GATE.pending = False, None


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A SIGTERM that arrives during the block (with ``sigterm_raises`` active) is raised after it, if
    it succeeds: for steps that would lose data when cut in two (swapping an output for its replacement)."""
    _GATE.closed += 1
    try:
        yield
    finally:
        _GATE.closed -= 1
    if not _GATE.closed and _GATE.pending is not None:
        signum, _GATE.pending = _GATE.pending, None
        _GATE.fired = True
        raise Terminated(signum)


@contextlib.contextmanager
def scratch_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder in ``parent`` named ``prefix`` and 8 random characters, locked while the block runs
    and removed with what it holds when the block ends. ``parent`` must exist."""
    path, fd = _make_locked(parent, prefix)
    try:
        yield path
    finally:
        with uninterrupted():  # a SIGTERM now waits for the removal, rather than cutting it short
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def _make_locked(parent: Path, prefix: str) -> tuple[Path, int]:
    """Make and lock a folder. A later run's ``remove_abandoned`` may take the lock between the two and
    remove the folder: then the folder the lock is on is no longer the one at ``path``, and we start over."""
    for _ in range(100):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except BlockingIOError:  # that later run holds it now, and is removing it
            same = False
        except FileNotFoundError:
            same = False
        except OSError:  # no flock here (ENOLCK, EOPNOTSUPP): unlocked, so no run will take it for abandoned
            same = True
        if same:
            return path, fd
        os.close(fd)
    raise OSError(f"{parent}: could not make a temporary folder that stays ours")


def remove_abandoned(paths: Iterable[Path]) -> list[Path]:
    """Remove those of ``paths`` that are folders of this user whose lock no live process holds: left by
    a run killed outright. Files, symlinks and anything that cannot be locked are kept. Returns what was
    removed."""
    removed = []
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.lstat(p)):  # replaced since we looked
                continue
        except OSError:  # held by a live process, gone, or no flock here: not ours to judge
            continue
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


def with_prefix(parent: Path, prefix: str) -> list[Path]:
    """What lies in ``parent`` under a name that starts with ``prefix`` (by prefix, not by glob: a name
    may hold glob characters)."""
    try:
        return sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
