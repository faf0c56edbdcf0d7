"""One checkpoint as the engine sees it: tensor names, shapes and dtypes, and a way to read a slice.

Both on-disk formats we read (safetensors and torch zip files) store every tensor as one contiguous
run of bytes at a known offset, so a checkpoint reduces to a table of (file, offset) per tensor and a
plain ``pread`` reads any slice. We do not map files into memory to read them: touched pages of a
mapping count in the process's RSS for as long as it lives, which for a 12B model is more memory than
the machine has.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptavg.errors import CheckpointFormatError


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``offset`` in ``path``, or ``tensor`` when loaded eagerly."""

    info: TensorInfo
    path: Path
    offset: int = -1
    tensor: torch.Tensor | None = None


@dataclass
class Checkpoint:
    """The weights of one training step, possibly spread over several shard files."""

    step: int
    label: str  # how messages name it: a folder or file path
    format: str  # "safetensors", "bin", "nanogpt" ...
    entries: dict[str, TensorEntry]  # in storage order
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name whose bytes it shares
    files: list[Path] = field(default_factory=list)  # weight files, for provenance and sizes
    extra_files: list[Path] = field(default_factory=list)  # config and tokenizer files to copy
    meta: dict[str, object] = field(default_factory=dict)  # format specifics (nanoGPT model_args ...)
    # A checkpoint still on a remote: planned from its file list, downloaded by fetch() when averaged.
    fetch: Callable[[], Checkpoint] | None = None
    download_bytes: int = 0
    downloaded: list[Path] = field(default_factory=list)  # files this run fetched (others were cached before)

    @property
    def nbytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries.values()) if self.entries else self.download_bytes

    def read(self, name: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of tensor ``name`` (flattened), read into the uint8 buffer ``buf``."""
        entry = self.entries[name]
        dtype = entry.info.dtype
        if entry.tensor is not None:
            return entry.tensor.reshape(-1)[start:stop]
        size = dtype.itemsize
        nbytes = (stop - start) * size
        view = buf[:nbytes]
        offset = entry.offset + start * size
        got = _FILES.pread_into(entry.path, view, offset)
        if got != nbytes:
            raise CheckpointFormatError(
                f"{entry.path}: file ends inside tensor '{name}' (wanted {nbytes} bytes at offset {offset}, "
                f"got {got}); the file is truncated"
            )
        return view.view(dtype)


class _OpenFiles:
    """File descriptors shared by the reader threads; ``pread`` needs no seek, so one fd serves all."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointFormatError(f"{path}: cannot open ({e.strerror})") from e
                    self._fds[path] = fd
        return fd

    def pread_into(self, path: Path, view: torch.Tensor, offset: int) -> int:
        mv = memoryview(view.numpy()).cast("B")  # type: ignore[arg-type]
        fd = self.fd(path)
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close_all(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


_FILES = _OpenFiles()


def close_files() -> None:
    """Release every file descriptor the readers opened (the engine calls this when a run ends)."""
    _FILES.close_all()
