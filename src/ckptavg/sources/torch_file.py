"""Find where each tensor of a torch zip file (``pytorch_model.bin``, nanoGPT's ``ckpt.pt``) lies.

``torch.load(mmap=True, weights_only=True)`` unpickles the structure (refusing any global that is not
plain data) and maps the file without reading tensor bytes. Every storage of such a load is a slice of
one mapping of the whole file, so ``storage pointer - mapping base`` is the storage's byte offset in the
file, which the zip directory confirms. The engine then reads slices with ``pread`` and never touches the
mapping, which keeps the file's pages out of our RSS and leaves optimizer state in a nanoGPT file unread.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from ckptavg.errors import CheckpointFormatError, CkptavgError, UnsafePickleError
from ckptavg.sources.checkpoint import TensorEntry, TensorInfo

_ZIP_MAGIC = b"PK\x03\x04"


def load_torch_file(path: Path, *, allow_legacy: bool = False) -> tuple[object, Callable[[torch.Tensor], int]]:
    """The unpickled object (tensors unread) and a function giving a tensor's byte offset in ``path``.

    For legacy (non-zip) pickles, which cannot be mapped, the object is loaded whole when
    ``allow_legacy`` is set, and the offset function returns -1 (read from memory instead).
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror})") from e
    if magic != _ZIP_MAGIC:
        if magic[:1] != b"\x80":
            raise CheckpointFormatError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
        if not allow_legacy:
            raise CheckpointFormatError(
                f"{path}: legacy (non-zip) torch pickle, which cannot be read lazily; pass --allow-legacy-pickle "
                "to load it whole into memory, or re-save it with a current torch"
            )
        return _load(path, mmap=False), lambda t: -1
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(f"{path}: zip directory missing; the file is truncated or corrupt")
    obj = _load(path, mmap=True)
    return obj, _offset_finder(path, obj)


def read_torch_structure(f: BinaryIO, where: str) -> object:
    """The unpickled object of a torch zip file read as a stream (a file on a Hub, by HTTP range), with
    every tensor's shape and dtype but no data: under ``skip_data`` torch reads the zip directory and
    the pickle only. Storages are allocated but never touched, so they take address space, not memory."""
    if f.read(4) != _ZIP_MAGIC:
        raise CheckpointFormatError(f"{where}: not a torch zip file (a legacy pickle cannot be read from a Hub)")
    f.seek(0)
    with torch.serialization.skip_data():
        return _load(f, mmap=False, where=where)


def _load(path: Path | BinaryIO, *, mmap: bool, where: str | None = None) -> object:
    where = where or str(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except CkptavgError:
        raise
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise UnsafePickleError(
            f"{where}: holds objects other than plain weights, refused by weights_only=True ({detail})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f"{where}: cannot be read as a torch checkpoint ({first})") from e


def _record_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each ``*/data/<key>`` record's payload (after its local zip header)."""
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for zi in z.infolist():
            parts = zi.filename.split("/")
            if len(parts) < 2 or parts[-2] != "data":
                continue
            if zi.compress_type != zipfile.ZIP_STORED:
                raise CheckpointFormatError(f"{path}: record {zi.filename} is compressed; torch never writes that")
            f.seek(zi.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offsets[zi.filename] = zi.header_offset + 30 + name_len + extra_len
    return offsets


def _offset_finder(path: Path, obj: object) -> Callable[[torch.Tensor], int]:
    record_offsets = sorted(_record_offsets(path).values())
    pointers = sorted({t.untyped_storage().data_ptr() for t in iter_tensors(obj) if t.untyped_storage().nbytes()})
    if not pointers:
        return lambda t: -1
    base = pointers[0] - record_offsets[0] if record_offsets else 0
    known = set(record_offsets)
    if not record_offsets or any(p - base not in known for p in pointers):
        raise CheckpointFormatError(
            f"{path}: tensor storages do not line up with the zip records; cannot read it lazily"
        )

    def offset(t: torch.Tensor) -> int:
        return int(t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size())

    return offset


def iter_tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in iter_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in iter_tensors(v)]
    return []


def state_dict_entries(
    path: Path, state_dict: object, offset: Callable[[torch.Tensor], int] | None, *, strip_prefix: str = ""
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Entries for a flat ``{name: tensor}`` dict, and the aliases among names sharing one storage.

    ``offset`` gives a tensor's byte offset in ``path`` (-1: keep the loaded tensor and read from
    memory); None means the file is not here yet, and the entries only describe its tensors.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointFormatError(f"{path}: expected a state dict of name -> tensor")
    entries: dict[str, TensorEntry] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for raw, t in state_dict.items():
        name = raw[len(strip_prefix) :] if strip_prefix and raw.startswith(strip_prefix) else raw
        if not t.is_contiguous():
            raise CheckpointFormatError(f"{path}: tensor '{name}' is not stored contiguously; re-save the file")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        info = TensorInfo(tuple(t.shape), t.dtype)
        if offset is None:
            entries[name] = TensorEntry(info, path)
            continue
        off = offset(t)
        entries[name] = TensorEntry(info, path, off, tensor=t if off < 0 else None)
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[1].offset))
    return ordered, aliases
