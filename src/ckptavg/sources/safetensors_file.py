"""Read a safetensors file's header and check it before trusting any offset in it.

Format: 8-byte little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets`` per
tensor, optional ``__metadata__``), then the tensor bytes. We parse the header ourselves because the
offsets are what lets us ``pread`` one slice without mapping the file; we check every offset against the
shape, the dtype and the file size, so a truncated file or a lying header fails at planning time, before
any output is written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources.checkpoint import TensorEntry, TensorInfo, open_regular

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
    # Low-precision floats: averaged like any float (the engine accumulates them in float32 or float64)
    # and written back in their own dtype.
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    # Wider unsigned integers (torch >= 2.3): copied from the newest member, like every integer tensor.
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):  # MX block scales; torch >= 2.7
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# dtypes the safetensors format defines that we refuse by name rather than misread: the packed ones hold
# two or more elements per byte (their shape counts elements, not bytes), and complex tensors have no
# meaning as a weight average here.
UNSUPPORTED_DTYPES = {
    "F4": "packed 4-bit floats",
    "F6_E2M3": "packed 6-bit floats",
    "F6_E3M2": "packed 6-bit floats",
    "C64": "complex numbers",
}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_INT64_MAX = 2**63 - 1
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_SHOWN = 80  # characters of a name or value a message shows


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def read_safetensors_index(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries in storage order, and the ``__metadata__`` strings."""
    try:
        with open_regular(path) as f:
            return read_safetensors_header(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise InvalidCheckpointError(path, f"cannot read ({e.strerror})") from e


def read_safetensors_header(
    f: BinaryIO, size: int, path: Path, *, where: str | None = None
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The same from any readable stream of ``size`` bytes (a local file, or a file on a Hub read by HTTP
    range); entries name ``path``, messages name ``where`` (default: the path).

    Every field is checked before it is used: a header that is not exactly what the format allows raises
    ``InvalidCheckpointError`` with one line naming the file and what is wrong.
    """
    label = where or str(path)
    head = f.read(8)
    if len(head) < 8:
        raise InvalidCheckpointError(label, f"only {size} bytes; not a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise InvalidCheckpointError(
            label, f"header length {n} does not fit in the file's {size} bytes (truncated or corrupt)"
        )
    raw = f.read(n)
    if len(raw) < n:
        raise InvalidCheckpointError(label, f"header cut short at {len(raw)} of {n} bytes (truncated?)")
    header = parse_json_object(raw, label)
    metadata = _metadata(header.pop("__metadata__", None), label)
    data_start = 8 + n
    data_size = size - data_start
    entries: list[tuple[int, int, str, TensorEntry]] = []
    for name, spec in header.items():
        info, begin, end = _entry(name, spec, label, data_size)
        entries.append((begin, end, name, TensorEntry(info, path, data_start + begin)))
    # Zero-size tensors at a tensor's start sort before it, as the safetensors library orders them.
    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for begin, end, name, _ in entries:
        if begin != cursor:
            raise InvalidCheckpointError(
                label,
                f"tensor '{name}' starts at byte {begin} of the data, expected {cursor} "
                "(overlapping or gapped offsets); the header is corrupt",
            )
        cursor = end
    if cursor > data_size:
        raise InvalidCheckpointError(
            label,
            f"header promises {cursor} bytes of tensor data but the file holds {data_size}; the file is truncated",
        )
    if cursor < data_size:
        raise InvalidCheckpointError(
            label, f"{data_size - cursor} bytes after the last tensor; the header does not describe the file"
        )
    return {name: entry for _, _, name, entry in entries}, metadata


def parse_json_object(raw: bytes, label: str, what: str = "header") -> dict[str, object]:
    """``raw`` as a JSON object, strictly: UTF-8 only (``json.loads`` of bytes would also guess UTF-16 and
    -32); a repeated key is refused, since readers disagree on which copy wins (Python's json keeps the
    last, the safetensors library accepts either silently); so are NaN and Infinity, which JSON does not
    have, nesting deep enough to exhaust the stack, and ints past ``sys.get_int_max_str_digits()``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidCheckpointError(label, f"{what} is not UTF-8 (byte {e.start})") from e
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise InvalidCheckpointError(label, f"{what} repeats the key {show(e.key)}") from e
    except RecursionError as e:
        raise InvalidCheckpointError(label, f"{what} is not valid JSON (nested too deeply)") from e
    except ValueError as e:  # JSONDecodeError, and int() of more digits than sys.get_int_max_str_digits()
        raise InvalidCheckpointError(label, f"{what} is not valid JSON ({_first_line(e)})") from e
    if not isinstance(obj, dict):
        raise InvalidCheckpointError(label, f"{what} is a JSON {kind(obj)}, not an object")
    return obj


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _metadata(value: object, label: str) -> dict[str, str]:
    """``__metadata__``: absent or null (as the safetensors library allows), or an object of strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidCheckpointError(label, f"__metadata__ is a JSON {kind(value)}, not an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidCheckpointError(
                label, f"__metadata__ value of {show(k)} is a JSON {kind(v)}; the format allows only strings"
            )
    return dict(value)


def _entry(name: str, spec: object, label: str, data_size: int) -> tuple[TensorInfo, int, int]:
    """One tensor's info and its [begin, end) in the data, each field checked."""
    check_name(name, label)
    where = f"{label}: tensor '{name}'"
    if not isinstance(spec, dict):
        raise InvalidCheckpointError(where, f"header entry is a JSON {kind(spec)}, not an object")
    missing = sorted(_ENTRY_KEYS - spec.keys())
    if missing:
        raise InvalidCheckpointError(where, f"header entry has no {', '.join(missing)}")
    extra = sorted(spec.keys() - _ENTRY_KEYS)
    if extra:  # a field we do not know might change how the bytes read; refuse rather than guess
        shown = ", ".join(show(k) for k in extra[:3])
        raise InvalidCheckpointError(where, f"header entry has unknown field(s) {shown}")
    code = spec["dtype"]
    if not isinstance(code, str):
        raise InvalidCheckpointError(where, f"dtype is a JSON {kind(code)}, not a string")
    if code in UNSUPPORTED_DTYPES:
        raise InvalidCheckpointError(where, f"dtype {code} ({UNSUPPORTED_DTYPES[code]}) is not supported")
    if code not in DTYPES:
        raise InvalidCheckpointError(where, f"unknown dtype {show(code)} (known: {', '.join(DTYPES)})")
    dtype = DTYPES[code]
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _INT64_MAX for d in shape):
        raise InvalidCheckpointError(where, f"shape {show(shape)} is not a list of non-negative integers")
    offsets = spec["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(x) and 0 <= x <= _INT64_MAX for x in offsets)
    ):
        raise InvalidCheckpointError(
            where, f"data_offsets {show(offsets)} is not a pair of non-negative 64-bit integers"
        )
    begin, end = offsets
    if begin > end:
        raise InvalidCheckpointError(where, f"data_offsets [{begin}, {end}) ends before it begins")
    nbytes = _nbytes_within(shape, dtype.itemsize, data_size)
    if nbytes is None:
        raise InvalidCheckpointError(
            where,
            f"shape {show(shape)} of {code} needs more than the file's {data_size} bytes of data; "
            "the header is corrupt",
        )
    info = TensorInfo(tuple(shape), dtype)
    if end - begin != nbytes:
        raise InvalidCheckpointError(
            label,
            f"header gives tensor '{name}' bytes [{begin}, {end}), but shape {list(shape)} of "
            f"{code} needs {nbytes} bytes; the header is corrupt",
        )
    return info, begin, end


def check_name(name: str, label: str) -> None:
    """A tensor name a message can show on one line and a file can store: non-empty, no C0/C1 control
    characters (NUL included), no lone surrogates."""
    if not name:
        raise InvalidCheckpointError(label, "a tensor has an empty name")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise InvalidCheckpointError(label, f"tensor name {show(name)} holds control characters")
    if any(0xD800 <= ord(c) < 0xE000 for c in name):  # "\ud800" is valid JSON but no UTF-8 can hold it
        raise InvalidCheckpointError(label, f"tensor name {show(name)} holds a lone UTF-16 surrogate")


def _nbytes_within(shape: list[int], itemsize: int, limit: int) -> int | None:
    """The bytes a tensor of ``shape`` takes, or None past ``limit``: the product stops growing there,
    so a header of many huge dimensions costs no more than a few multiplications each."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def kind(x: object) -> str:
    """What JSON calls the type of a parsed value."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(x), "null"
    )


def show(x: object) -> str:
    """``x`` for a message: JSON-quoted (so control characters are escaped) and cut to a few dozen chars."""
    try:
        s = json.dumps(x)
    except (ValueError, RecursionError):  # nested too deeply to print: say what it is
        s = f"<a JSON {kind(x)}>"
    return s if len(s) <= _SHOWN else s[: _SHOWN - 3] + "..."


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
