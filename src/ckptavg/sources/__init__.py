"""Where checkpoints come from. Every source yields :class:`Checkpoint` objects; the engine sees no more.

A run is a folder of step checkpoints in the layout Pythia uses on the Hub (``step{N}/`` or the HF
Trainer's ``checkpoint-{N}/``), or a set of nanoGPT ``ckpt.pt`` files (a folder searched two levels
deep, or a glob), each knowing its own step.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.errors import CheckpointFormatError, CkptavgError, StepNotFoundError
from ckptavg.sources.checkpoint import Checkpoint, FileTable, TensorEntry, TensorInfo
from ckptavg.sources.hf_folder import find_weights, open_hf_checkpoint
from ckptavg.sources.nanogpt import open_nanogpt_checkpoint

__all__ = [
    "Checkpoint",
    "FileTable",
    "Run",
    "TensorEntry",
    "TensorInfo",
    "open_checkpoint",
    "open_hub_run",
    "open_run",
]

_STEP_DIR = re.compile(r"^(?:step|checkpoint-)(\d+)$")
_TORCH_SUFFIXES = (".pt", ".pth")


@dataclass
class Run:
    """The checkpoints of one training run, by step; opened lazily (headers only) and cached."""

    label: str
    kind: str  # "hf" or "nanogpt"
    paths: dict[int, Path]
    allow_legacy: bool = False
    opener: Callable[[int], Checkpoint] | None = None  # remote runs: how a step becomes a Checkpoint
    summary: Callable[[int], tuple[str, int, int]] | None = None  # remote runs: format, files, bytes (for ls)
    _open: dict[int, Checkpoint] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.paths)

    def checkpoint(self, step: int) -> Checkpoint:
        if step not in self.paths:
            raise StepNotFoundError([step], self.paths, self.label)
        if step not in self._open:
            if self.opener is not None:
                self._open[step] = self.opener(step)
            else:
                self._open[step] = open_checkpoint(self.paths[step], step, allow_legacy=self.allow_legacy)
        return self._open[step]


def open_checkpoint(path: Path, step: int = 0, *, allow_legacy: bool = False) -> Checkpoint:
    """One checkpoint: a transformers folder or a nanoGPT ``.pt`` file."""
    if path.is_dir():
        return open_hf_checkpoint(path, step, allow_legacy=allow_legacy)
    if path.is_file():
        return open_nanogpt_checkpoint(path, allow_legacy=allow_legacy)
    raise CheckpointFormatError(f"{path}: no such file or folder")


def open_run(source: str, *, allow_legacy: bool = False) -> Run:
    """Find the checkpoints of a run from a folder or a glob of nanoGPT files."""
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source) if p.endswith(_TORCH_SUFFIXES))
        if not files:
            raise CkptavgError(f"{source}: the pattern matches no .pt files")
        return _nanogpt_run(source, files, allow_legacy)
    root = Path(source)
    if not root.is_dir():
        raise CkptavgError(f"{source}: no such run folder")
    step_dirs: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            step = int(m.group(1))
            if step in step_dirs:
                raise CkptavgError(f"{source}: step {step} appears twice ({step_dirs[step].name}, {p.name})")
            step_dirs[step] = p
    if step_dirs:
        return Run(source, "hf", step_dirs, allow_legacy)
    files = sorted(
        p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.suffix in _TORCH_SUFFIXES and p.is_file()
    )
    if files:
        return _nanogpt_run(source, files, allow_legacy)
    if find_weights(root):
        raise CkptavgError(f"{source}: this is one checkpoint, not a run of step folders; use `ckptavg avg`")
    raise CkptavgError(f"{source}: no step{{N}}/ folders and no nanoGPT .pt files found")


def _nanogpt_run(label: str, files: list[Path], allow_legacy: bool) -> Run:
    run = Run(label, "nanogpt", {}, allow_legacy)
    for f in files:
        ckpt = open_nanogpt_checkpoint(f, allow_legacy=allow_legacy)
        if ckpt.step in run.paths:
            raise CkptavgError(f"{label}: iter_num {ckpt.step} is in both {run.paths[ckpt.step]} and {f}")
        run.paths[ckpt.step] = f
        run._open[ckpt.step] = ckpt
    return run


def open_hub_run(repo: str, **options: Any) -> Run:
    """A run on the Hub (or a Hub-like endpoint): steps from its revisions, files fetched when averaged."""
    from ckptavg.sources.hub import HubSource
    from ckptavg.tokens import clean_token

    options["token"] = clean_token(options.get("token"), "the token argument")  # a header, not a traceback
    hub = HubSource(repo, **options)  # endpoint, token, cache_dir, template, allow_legacy, retry_time
    paths = {step: Path(name) for step, (name, _) in hub.revisions.items()}
    return Run(repo, "hub", paths, hub.allow_legacy, opener=hub.plan_checkpoint, summary=hub.summary)
