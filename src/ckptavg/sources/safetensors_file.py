"""Read a safetensors file's header and check it before trusting any offset in it.

Format: 8-byte little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets`` per
tensor, optional ``__metadata__``), then the tensor bytes. We parse the header ourselves because the
offsets are what lets us ``pread`` one slice without mapping the file; we check every offset against the
shape, the dtype and the file size, so a truncated file or a lying header fails at planning time, before
any output is written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ckptavg.errors import CheckpointFormatError
from ckptavg.sources.checkpoint import TensorEntry, TensorInfo

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_safetensors_index(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries in storage order, and the ``__metadata__`` strings."""
    try:
        with open(path, "rb") as f:
            return read_safetensors_header(f, path.stat().st_size, path)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e.strerror})") from e


def read_safetensors_header(
    f: BinaryIO, size: int, path: Path, *, where: str | None = None
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The same from any readable stream of ``size`` bytes (a local file, or a file on a Hub read by HTTP
    range); entries name ``path``, messages name ``where`` (default: the path)."""
    label = where or str(path)
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointFormatError(f"{label}: only {size} bytes; not a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointFormatError(
            f"{label}: header length {n} does not fit in the file's {size} bytes (truncated or corrupt)"
        )
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{label}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{label}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    entries: list[tuple[int, str, TensorEntry]] = []
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{label}: header entry for tensor '{name}' is malformed ({e!r})") from e
        info = TensorInfo(shape, dtype)
        if begin < 0 or end - begin != info.nbytes:
            raise CheckpointFormatError(
                f"{label}: header gives tensor '{name}' bytes [{begin}, {end}), but shape {list(shape)} of "
                f"{spec['dtype']} needs {info.nbytes} bytes; the header is corrupt"
            )
        entries.append((begin, name, TensorEntry(info, path, data_start + begin)))
    entries.sort(key=lambda e: e[0])
    cursor = 0
    for begin, name, entry in entries:
        if begin != cursor:
            raise CheckpointFormatError(
                f"{label}: tensor '{name}' starts at byte {begin} of the data, expected {cursor} "
                "(overlapping or gapped offsets); the header is corrupt"
            )
        cursor = begin + entry.info.nbytes
    if cursor > data_size:
        raise CheckpointFormatError(
            f"{label}: header promises {cursor} bytes of tensor data but the file holds {data_size}; "
            "the file is truncated"
        )
    if cursor < data_size:
        raise CheckpointFormatError(
            f"{label}: {data_size - cursor} bytes after the last tensor; the header does not describe the file"
        )
    return {name: entry for _, name, entry in entries}, {str(k): str(v) for k, v in metadata.items()}
