"""The one seam between where checkpoints come from and everything else: the ``Source`` protocol.

Every kind of run implements it: a local folder of step checkpoints or nanoGPT files
(``sources/local.py``) and a Hub repository (``sources/hub.py``). Planning asks a source for its
steps and for the validated headers of the steps it needs (``Checkpoint``: names, shapes, dtypes, tied
names, and the config and tokenizer files an output takes from it); the engine then reads tensor slices
through a ``Reader`` (``Checkpoint.open`` for local files; for a Hub revision, the reader of a download,
which the run's download stage hands out once the files are on disk). Nothing asks a source which kind
it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ckptavg.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class Listing:
    """One step as ``ckptavg ls`` shows it."""

    format: str  # "safetensors", "bin", "nanogpt", with " (N shards)" when sharded
    nbytes: int  # on disk, or to download (weights, config and tokenizer files)
    where: str  # a path, or repo@revision
    name: str  # what the run calls it (Checkpoint.name): a Hub revision, a folder's name, a file's stem


class Source(Protocol):
    """The checkpoints of one training run, by step."""

    label: str  # how messages and provenance name the run
    discovered_from: str | None  # the folder or glob a local run's checkpoints are found by; None: remote
    # Where the run is, as provenance records it (a local run's folder or glob; a Hub repo, its endpoint
    # and revision pattern): enough to find the inputs again, not part of what decides the arithmetic.
    origin: dict[str, Any]

    def steps(self) -> list[int]:
        """Every step the run has, ascending."""
        ...

    def checkpoints(self, steps: Iterable[int]) -> dict[int, Checkpoint]:
        """The validated headers of ``steps`` (raises ``StepNotFoundError`` for a step the run lacks)."""
        ...

    def listing(self, step: int) -> Listing:
        """What ``ls`` shows of ``step``, as cheaply as the source allows."""
        ...
