"""Runs on local disk: a folder of step checkpoints, or a set of nanoGPT ``ckpt.pt`` files.

A folder run holds one checkpoint per step in the layout Pythia uses on the Hub (``step{N}/``) or the
HF Trainer's (``checkpoint-{N}/``). A nanoGPT run is a folder searched two levels deep for ``.pt`` files,
or a glob, each file knowing its own step (``iter_num``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckptavg.errors import InvalidCheckpointError, InvalidRunError, StepNotFoundError
from ckptavg.sources.checkpoint import Checkpoint
from ckptavg.sources.hf_folder import find_weights, open_hf_checkpoint
from ckptavg.sources.nanogpt import open_nanogpt_checkpoint
from ckptavg.sources.source import Listing
from ckptavg.steps import STEP_DIR

_TORCH_SUFFIXES = (".pt", ".pth")


class LocalRun:
    """A run on disk (implements ``Source``); each checkpoint's header is read once, when first asked for."""

    def __init__(
        self, label: str, paths: dict[int, Path], *, allow_legacy: bool, opened: dict[int, Checkpoint]
    ) -> None:
        self.label = label
        self.discovered_from: str | None = label  # the folder or glob as given: where outputs must not go
        self.origin: dict[str, Any] = {"run": label}
        self.paths = paths
        self.allow_legacy = allow_legacy
        self._open = dict(opened)

    def steps(self) -> list[int]:
        return sorted(self.paths)

    def checkpoint(self, step: int) -> Checkpoint:
        if step not in self.paths:
            raise StepNotFoundError([step], self.paths, self.label)
        if step not in self._open:
            self._open[step] = open_checkpoint(self.paths[step], step, allow_legacy=self.allow_legacy)
        return self._open[step]

    def checkpoints(self, steps: Iterable[int]) -> dict[int, Checkpoint]:
        wanted = sorted(set(steps))
        missing = [s for s in wanted if s not in self.paths]
        if missing:
            raise StepNotFoundError(missing, self.paths, self.label)
        return {s: self.checkpoint(s) for s in wanted}

    def listing(self, step: int) -> Listing:
        c = self.checkpoint(step)
        fmt = c.format + (f" ({len(c.files)} shards)" if len(c.files) > 1 else "")
        return Listing(fmt, sum(f.stat().st_size for f in c.files), c.label, c.name)


def open_checkpoint(path: Path, step: int = 0, *, allow_legacy: bool = False) -> Checkpoint:
    """One checkpoint: a transformers folder or a nanoGPT ``.pt`` file."""
    if path.is_dir():
        return open_hf_checkpoint(path, step, allow_legacy=allow_legacy)
    if path.is_file():
        return open_nanogpt_checkpoint(path, allow_legacy=allow_legacy)
    if path.exists():
        raise InvalidCheckpointError(path, "neither a regular file nor a folder (a pipe, device or socket?)")
    raise InvalidCheckpointError(path, "no such file or folder")


def open_run(source: str, *, allow_legacy: bool = False) -> LocalRun:
    """Find the checkpoints of a run from a folder or a glob of nanoGPT files."""
    if glob.has_magic(source):
        # Regular files only, as in a folder: a named pipe would block the open forever, and a folder
        # (an output made as --out runs/soup.pt) is no checkpoint.
        files = sorted(Path(p) for p in glob.glob(source) if p.endswith(_TORCH_SUFFIXES) and os.path.isfile(p))
        if not files:
            raise InvalidRunError(source, "the pattern matches no .pt files")
        return _nanogpt_run(source, files, allow_legacy)
    root = Path(source)
    if not root.is_dir():
        raise InvalidRunError(source, "no such run folder")
    step_dirs: dict[int, Path] = {}
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            step = int(m.group(1))
            if step in step_dirs:
                raise InvalidRunError(source, f"step {step} appears twice ({step_dirs[step].name}, {p.name})")
            step_dirs[step] = p
    if step_dirs:
        return LocalRun(source, step_dirs, allow_legacy=allow_legacy, opened={})
    files = sorted(
        p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.suffix in _TORCH_SUFFIXES and p.is_file()
    )
    if files:
        return _nanogpt_run(source, files, allow_legacy)
    if find_weights(root):
        raise InvalidRunError(source, "this is one checkpoint, not a run of step folders; use `ckptavg avg`")
    raise InvalidRunError(source, "no step{N}/ folders and no nanoGPT .pt files found")


def _nanogpt_run(label: str, files: list[Path], allow_legacy: bool) -> LocalRun:
    paths: dict[int, Path] = {}
    opened: dict[int, Checkpoint] = {}
    for f in files:
        ckpt = open_nanogpt_checkpoint(f, allow_legacy=allow_legacy)
        if ckpt.step in paths:
            raise InvalidRunError(label, f"iter_num {ckpt.step} is in both {paths[ckpt.step]} and {f}")
        paths[ckpt.step] = f
        opened[ckpt.step] = ckpt
    return LocalRun(label, paths, allow_legacy=allow_legacy, opened=opened)
