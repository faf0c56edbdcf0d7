"""One checkpoint as the engine sees it: tensor names, shapes and dtypes, and a way to read a slice.

Both on-disk formats we read (safetensors and torch zip files) store every tensor as one contiguous
run of bytes at a known offset, so a checkpoint reduces to a table of (file, offset) per tensor and a
plain ``pread`` reads any slice. We do not map files into memory to read them: touched pages of a
mapping count in the process's RSS for as long as it lives, which for a 12B model is more memory than
the machine has.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from ckptavg.errors import InvalidCheckpointError


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


class Remote(Protocol):
    """Where a checkpoint's weight files come from when they are not on disk yet (a Hub revision).

    Tensor entries of such a checkpoint are known from the files' headers, read by HTTP range; their
    ``path`` is the remote file name and they cannot be read until the file is downloaded, when
    ``local_entries`` tells where each tensor's bytes are in the local copy. Nothing edits the
    checkpoint's own entries: a run keeps the local ones beside them while the file is on disk.
    """

    sizes: dict[str, int]  # weight file -> bytes, as the server lists it
    file_of: dict[str, str]  # tensor name -> the weight file holding it
    extras: dict[str, int]  # config and tokenizer files -> bytes

    def download(self, filename: str, cancel: threading.Event | None = None) -> tuple[Path, bool]:
        """The file in the local cache, held in use until ``done_with``; and whether this call brought it
        there (what a disk budget counts). Setting ``cancel`` stops a download in progress (it raises)."""
        ...

    def done_with(self, filename: str, *, keep: bool = False) -> None:
        """The run no longer needs the file: the remote deletes it if it brought it in, unless ``keep``
        (a run that failed on a transient fault keeps its downloads for the next run)."""
        ...

    def local_entries(self, filename: str, local: Path) -> dict[str, TensorEntry]:
        """Where the tensors of ``filename`` are in its downloaded copy ``local`` (checked against the plan)."""
        ...


class Reader(Protocol):
    """Reads slices of a checkpoint's tensors: what the engine sees of a source once bytes can be had."""

    @property
    def label(self) -> str:
        """How messages name what is read (a folder, a file, a Hub revision)."""
        ...

    def read(self, name: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of tensor ``name`` (flattened), read into the uint8 buffer ``buf``."""
        ...


@dataclass(frozen=True)
class EntryReader:
    """A ``Reader`` over files on local disk: each tensor one contiguous run of bytes, read by ``pread``."""

    files: FileTable
    entries: dict[str, TensorEntry]
    label: str

    def read(self, name: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        return read_slice(self.files, self.entries[name], start, stop, buf, name=name, where=self.label)


@dataclass
class Checkpoint:
    """The weights of one training step as its headers describe them, possibly over several shard files.

    A plan is made of these (names, shapes, dtypes, tied names) without reading a tensor; ``open`` gives
    the reader once the bytes are on disk.
    """

    step: int
    label: str  # how messages name it: a folder or file path, or repo@revision
    format: str  # "safetensors", "bin", "nanogpt" ...
    entries: dict[str, TensorEntry]  # in storage order
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name whose bytes it shares
    files: list[Path] = field(default_factory=list)  # local weight files, for provenance and sizes
    extra_files: dict[str, Path] = field(default_factory=dict)  # output name -> file to copy (sources/extras.py)
    meta: dict[str, object] = field(default_factory=dict)  # format specifics (nanoGPT model_args ...)
    remote: Remote | None = None  # set when the weight files are still on a Hub
    path: Path | None = None  # the local folder or file it was read from
    name: str = ""  # what the run calls it: a Hub revision, a step folder's name, a nanoGPT file's stem

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {n: e.info for n, e in self.entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries.values())

    def files_of(self, names: list[str]) -> set[str]:
        """The remote weight files holding the tensors ``names`` (empty for a local checkpoint)."""
        if self.remote is None:
            return set()
        return {self.remote.file_of[n] for n in names}

    def open(self, files: FileTable) -> Reader:
        """The reader of a local checkpoint (a Hub revision's readers come from its downloads)."""
        if self.remote is not None:
            raise RuntimeError(f"{self.label}: opened before its files were downloaded")
        return EntryReader(files, self.entries, self.label)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (symlinks followed). Anything else raises
    ``InvalidCheckpointError`` before a read: a named pipe blocks until a writer comes, a device such as
    /dev/zero never ends, and neither is a checkpoint. Opened without blocking, then checked by ``fstat``,
    so what is checked is what is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidCheckpointError(path, "not a regular file (a pipe, device or socket); not a checkpoint")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_slice(
    files: FileTable, entry: TensorEntry, start: int, stop: int, buf: torch.Tensor, *, name: str, where: str
) -> torch.Tensor:
    """Elements [start, stop) of the tensor at ``entry`` (flattened), read into the uint8 buffer ``buf``."""
    dtype = entry.info.dtype
    if entry.tensor is not None:
        return entry.tensor.reshape(-1)[start:stop]
    if entry.offset < 0:
        raise RuntimeError(f"{where}: tensor '{name}' is read before its file was downloaded")
    size = dtype.itemsize
    nbytes = (stop - start) * size
    view = buf[:nbytes]
    offset = entry.offset + start * size
    got = files.pread_into(entry.path, view, offset)
    if got != nbytes:
        raise InvalidCheckpointError(
            entry.path,
            f"file ends inside tensor '{name}' (wanted {nbytes} bytes at offset {offset}, "
            f"got {got}); the file is truncated",
        )
    return view.view(dtype)


def read_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint in memory, tied names included (for small models: ``convert``)."""
    state: dict[str, torch.Tensor] = {}
    with FileTable() as files:
        reader = checkpoint.open(files)
        for name, e in checkpoint.entries.items():
            buf = torch.empty(e.info.nbytes, dtype=torch.uint8)
            state[name] = reader.read(name, 0, e.info.numel, buf).clone().reshape(e.info.shape)
    for alias, name in checkpoint.aliases.items():
        state[alias] = state[name]
    return state


class FileTable:
    """The file descriptors one run reads through; ``pread`` needs no seek, so one fd serves all threads.

    Owned by the run and closed when it ends (a library caller inherits nothing). A deleted file's space
    comes back only when its last descriptor closes: evicting a download must ``close`` it first, or the
    disk budget would count space that is still taken.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a file swapped for a pipe must not hang
                except OSError as e:
                    raise InvalidCheckpointError(path, f"cannot open ({e.strerror})") from e
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise InvalidCheckpointError(path, "no longer a regular file (changed since planning)")
                self._fds[path] = fd
            return fd

    def pread_into(self, path: Path, view: torch.Tensor, offset: int) -> int:
        mv = memoryview(view.numpy()).cast("B")  # type: ignore[arg-type]
        fd = self.fd(path)
        done = 0
        while done < len(mv):
            try:
                n = os.preadv(fd, [mv[done:]], offset + done)
            except OSError as e:  # e.g. ESTALE: deleted by another node of a shared file system
                raise InvalidCheckpointError(path, f"cannot read ({e.strerror or e})") from e
            if n == 0:
                break
            done += n
        return done

    def close(self, path: Path) -> None:
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> FileTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()
