"""Find where each tensor of a torch zip file (``pytorch_model.bin``, nanoGPT's ``ckpt.pt``) lies.

``torch.load(mmap=True, weights_only=True)`` unpickles the structure (refusing any global that is not
plain data) and maps the file without reading tensor bytes. Every storage of such a load is a slice of
one mapping of the whole file, so ``storage pointer - mapping base`` is the storage's byte offset in the
file, which the zip directory confirms. The engine then reads slices with ``pread`` and never touches the
mapping, which keeps the file's pages out of our RSS and leaves optimizer state in a nanoGPT file unread.

Before ``torch.load`` sees a file, ``check_archive`` reads its zip directory and its pickle ourselves:
torch inflates compressed records (a small file could inflate to gigabytes), allocates every storage at the
size the pickle claims (under ``skip_data``), and trusts the pickle's storage sizes (a tensor longer than
its record is read past the record's end). So every record must be stored uncompressed and lie inside the
file without overlapping another, the pickle must be at most ``MAX_PICKLE_BYTES``, and every storage and
every tensor view the pickle describes must fit in its record. The pickle is read by an unpickler that
imports nothing and calls nothing: each global becomes an inert placeholder, so a hostile pickle runs no
code here and ``torch.load(weights_only=True)`` still gives its own verdict afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ckptavg.errors import CkptavgError, InvalidCheckpointError, UnsafePickleError
from ckptavg.sources.checkpoint import TensorEntry, TensorInfo, open_regular
from ckptavg.sources.safetensors_file import DTYPE_NAMES, check_name

_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
MAX_PICKLE_BYTES = 1 << 30  # Pythia-12B's shards hold pickles of tens of KB; a 1 GiB one is not a checkpoint


def load_torch_file(path: Path, *, allow_legacy: bool = False) -> tuple[object, Callable[[torch.Tensor], int]]:
    """The unpickled object (tensors unread) and a function giving a tensor's byte offset in ``path``.

    For legacy (non-zip) pickles, which cannot be mapped, the object is loaded whole when
    ``allow_legacy`` is set, and the offset function returns -1 (read from memory instead).
    """
    try:
        with open_regular(path) as f:
            magic = f.read(4)
    except OSError as e:
        raise InvalidCheckpointError(path, f"cannot read ({e.strerror})") from e
    if magic != _ZIP_MAGIC:
        if magic[:1] != b"\x80":
            raise InvalidCheckpointError(path, "not a torch checkpoint (neither a zip archive nor a pickle)")
        if not allow_legacy:
            raise InvalidCheckpointError(
                path,
                "legacy (non-zip) torch pickle, which cannot be read lazily; pass --allow-legacy-pickle "
                "to load it whole into memory, or re-save it with a current torch",
            )
        return _load(path, mmap=False), lambda t: -1
    try:
        with open_regular(path) as f:
            check_archive(f, os.fstat(f.fileno()).st_size, str(path))
    except OSError as e:
        raise InvalidCheckpointError(path, f"cannot read ({e.strerror})") from e
    obj = _load(path, mmap=True)
    return obj, _offset_finder(path, obj)


def read_torch_structure(f: BinaryIO, where: str) -> object:
    """The unpickled object of a torch zip file read as a stream (a file on a Hub, by HTTP range), with
    every tensor's shape and dtype but no data: under ``skip_data`` torch reads the zip directory and
    the pickle only. Storages are allocated but never touched, so they take address space, not memory."""
    if f.read(4) != _ZIP_MAGIC:
        raise InvalidCheckpointError(where, "not a torch zip file (a legacy pickle cannot be read from a Hub)")
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    check_archive(f, size, where)
    f.seek(0)
    with torch.serialization.skip_data():
        return _load(f, mmap=False, where=where)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _load(path: Path | BinaryIO, *, mmap: bool, where: str | None = None) -> object:
    where = where or str(path)
    try:
        if isinstance(path, Path) and not _utf8(str(path)):
            # torch's file reader takes a UTF-8 name; a path of other bytes is opened through its descriptor.
            fd = os.open(path, os.O_RDONLY)
            try:
                return torch.load(f"/proc/self/fd/{fd}", map_location="cpu", mmap=mmap, weights_only=True)
            finally:
                os.close(fd)
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except CkptavgError:
        raise
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise UnsafePickleError(
            where, f"holds objects other than plain weights, refused by weights_only=True ({detail})"
        ) from e
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        AssertionError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        NotImplementedError,
    ) as e:  # torch's own reading of what we checked
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidCheckpointError(where, f"cannot be read as a torch checkpoint ({first})") from e


def check_archive(f: BinaryIO, size: int, where: str) -> None:
    """Refuse a torch zip file of ``size`` bytes whose records or pickle ``torch.load`` should not be
    trusted with (see the module docstring); reads the zip directory and the pickle only."""
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            records = _check_records(infos, size, where)
            prefix = infos[0].filename.split("/")[0]
            pkl = records.get(f"{prefix}/data.pkl")
            if pkl is None:
                raise InvalidCheckpointError(where, f"no {prefix}/data.pkl record; not a torch checkpoint")
            if pkl.file_size > MAX_PICKLE_BYTES:
                raise InvalidCheckpointError(
                    where,
                    f"its pickle ({pkl.filename}) is {pkl.file_size} bytes, over the "
                    f"{MAX_PICKLE_BYTES} a checkpoint's structure can need; refused",
                )
            raw = z.read(pkl)  # stored, so exactly file_size bytes; zipfile also checks its CRC
    except CkptavgError:
        raise
    except zipfile.BadZipFile as e:
        raise InvalidCheckpointError(
            where, f"zip directory missing or damaged; the file is truncated or corrupt ({_first_line(e)})"
        ) from e
    except Exception as e:  # zipfile on hostile bytes: BadZipFile, NotImplementedError, OverflowError, ...
        raise InvalidCheckpointError(where, f"zip archive is corrupt ({_first_line(e)})") from e
    storages, tensors = _scan_pickle(raw, where)
    sizes = {
        name[len(prefix) + len("/data/") :]: zi.file_size
        for name, zi in records.items()
        if name.startswith(f"{prefix}/data/")
    }
    for name, (key, first, end) in tensors.items():
        if key in sizes and end > sizes[key]:
            raise InvalidCheckpointError(
                where,
                f"tensor '{name}' needs bytes [{first}, {end}) of storage record data/{key}, which "
                f"holds {sizes[key]}; the file is corrupt",
            )
    for key, nbytes in storages.items():
        if key not in sizes:
            raise InvalidCheckpointError(where, f"the pickle refers to storage {key!r}, which has no record")
        if nbytes > sizes[key]:
            raise InvalidCheckpointError(
                where,
                f"storage data/{key} claims {nbytes} bytes but its record holds {sizes[key]}; the file is corrupt",
            )


def _check_records(infos: list[zipfile.ZipInfo], size: int, where: str) -> dict[str, zipfile.ZipInfo]:
    """Records by name, each stored uncompressed, inside the file, and apart from every other."""
    if not infos:
        raise InvalidCheckpointError(where, "zip archive holds no records; not a torch checkpoint")
    records: dict[str, zipfile.ZipInfo] = {}
    spans = []
    for zi in infos:
        name = zi.filename
        shown = name if name.isprintable() and len(name) <= 200 else repr(name[:200])
        if name in records:
            raise InvalidCheckpointError(where, f"record {shown} appears twice in the zip directory")
        records[name] = zi
        if zi.compress_type != zipfile.ZIP_STORED:
            raise InvalidCheckpointError(
                where,
                f"record {shown} is compressed (zip method {zi.compress_type}); torch never writes "
                "compressed records, and inflating one could take any amount of memory",
            )
        if zi.flag_bits & 0x1:
            raise InvalidCheckpointError(where, f"record {shown} is encrypted")
        if zi.compress_size != zi.file_size:
            raise InvalidCheckpointError(
                where, f"record {shown} is stored but its sizes differ ({zi.compress_size} != {zi.file_size})"
            )
        # The name's length in the local header is the directory's; its extra field may add more.
        start = zi.header_offset
        end = start + _LOCAL_HEADER + len(zi.orig_filename.encode("utf-8")) + zi.compress_size
        if end > size:
            raise InvalidCheckpointError(
                where, f"record {shown} runs to byte {end}, past the file's {size}; the file is truncated"
            )
        spans.append((start, end, shown))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise InvalidCheckpointError(where, f"records {a} and {b} overlap; the zip directory is corrupt")
    return records


class _Corrupt(Exception):
    pass


@dataclass(frozen=True)
class _Storage:
    key: str
    nbytes: int
    itemsize: int


@dataclass(frozen=True)
class _View:
    """What ``torch._utils._rebuild_tensor_v2`` would build: a view of a storage."""

    storage: object
    offset: object
    shape: object
    stride: object

    def extent(self) -> tuple[str, int, int] | None:
        """(storage key, first byte, end byte) of the view, or None where torch itself will refuse it."""
        st, off = self.storage, self.offset
        if not isinstance(st, _Storage) or not isinstance(off, int) or isinstance(off, bool) or off < 0:
            return None
        if not isinstance(self.shape, tuple | list) or not isinstance(self.stride, tuple | list):
            return None
        shape, stride = list(self.shape), list(self.stride)
        if len(shape) != len(stride) or not all(_is_int(d) and d >= 0 for d in shape + stride):
            return None
        first = off * st.itemsize
        if 0 in shape:
            return st.key, first, first
        last = off + sum(d * s - s for d, s in zip(shape, stride, strict=True))
        return st.key, first, (last + 1) * st.itemsize


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        if name == "UntypedStorage":
            self.itemsize = 1
        else:
            try:
                self.itemsize = torch.serialization.StorageType(name).dtype.itemsize
            except (KeyError, AttributeError) as e:
                raise _Corrupt(f"unknown storage type {name[:80]!r}") from e


class _Inert:
    """Any global the pickle names: instances accept whatever the pickle does with them, and do nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _Dict(dict[object, object]):
    """OrderedDict, with a __dict__ for the ``_metadata`` that torch's state dicts carry."""


def _rebuild_tensor(storage: object, offset: object, shape: object, stride: object, *rest: object) -> _View:
    return _View(storage, offset, shape, stride)


def _rebuild_parameter(data: object, *rest: object) -> object:
    return data


class _Scanner(pickle._Unpickler):
    """Unpickles into inert placeholders: imports nothing, calls nothing, records storages and views.

    The pure-Python unpickler, not the C one: the C unpickler keeps its memo in an array grown to the
    largest index a LONG_BINPUT names, so four bytes of a pickle made it zero 19 GB (found by fuzzing);
    this one keeps a dict, as torch's weights_only unpickler does."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, int] = {}
        self.globals: dict[tuple[str, str], object] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.globals:
            self.globals[(module, name)] = self._placeholder(module, name)
        return self.globals[(module, name)]

    @staticmethod
    def _placeholder(module: str, name: str) -> object:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return _Dict
        if "Storage" in name:
            return _StorageType(name)
        return type("Inert", (_Inert,), {})

    def persistent_load(self, pid: object) -> object:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _Corrupt("a persistent id that is not a storage reference")
        _, kind, key, _location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise _Corrupt("a malformed storage reference")
        nbytes = numel * kind.itemsize
        if self.storages.setdefault(key, nbytes) != nbytes:
            raise _Corrupt(f"storage {key[:80]!r} is given two sizes")
        return _Storage(key, nbytes, kind.itemsize)


def _scan_pickle(raw: bytes, where: str) -> tuple[dict[str, int], dict[str, tuple[str, int, int]]]:
    """The storages the pickle refers to (key -> bytes it claims) and the byte extent of each tensor view
    in its storage, by the view's path in the object (``model.transformer.wte.weight``)."""
    scanner = _Scanner(io.BytesIO(raw))
    try:
        obj = scanner.load()
    except _Corrupt as e:
        raise InvalidCheckpointError(where, f"the pickle holds {e}; the file is corrupt") from e
    except Exception as e:  # any failure to parse hostile bytes is the file's fault, never ours
        raise InvalidCheckpointError(where, f"the pickle is corrupt ({type(e).__name__}: {_first_line(e)})") from e
    tensors: dict[str, tuple[str, int, int]] = {}
    seen: set[int] = set()
    stack: list[tuple[object, str]] = [(obj, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, _View):
            extent = x.extent()
            if extent is not None:
                tensors.setdefault(path or "<the object itself>", extent)
        elif isinstance(x, dict | list | tuple) and id(x) not in seen:
            seen.add(id(x))
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                part = k if isinstance(k, str) else str(k)
                stack.append((v, f"{path}.{part}" if path else part))
    return scanner.storages, tensors


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _record_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each ``*/data/<key>`` record's payload (after its local zip header)."""
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for zi in z.infolist():
            parts = zi.filename.split("/")
            if len(parts) < 2 or parts[-2] != "data":
                continue
            if zi.compress_type != zipfile.ZIP_STORED:
                raise InvalidCheckpointError(path, f"record {zi.filename} is compressed; torch never writes that")
            f.seek(zi.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offsets[zi.filename] = zi.header_offset + 30 + name_len + extra_len
    return offsets


def _offset_finder(path: Path, obj: object) -> Callable[[torch.Tensor], int]:
    record_offsets = sorted(_record_offsets(path).values())
    # Sparse and nested tensors have no storage of their own; state_dict_entries refuses them by name.
    dense = [t for t in iter_tensors(obj) if t.layout == torch.strided and not t.is_nested]
    pointers = sorted({t.untyped_storage().data_ptr() for t in dense if t.untyped_storage().nbytes()})
    if not pointers:
        return lambda t: -1
    base = pointers[0] - record_offsets[0] if record_offsets else 0
    known = set(record_offsets)
    if not record_offsets or any(p - base not in known for p in pointers):
        raise InvalidCheckpointError(path, "tensor storages do not line up with the zip records; cannot read it lazily")

    def offset(t: torch.Tensor) -> int:
        return int(t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size())

    return offset


def iter_tensors(obj: object) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, each container visited once: a pickle can share one
    list many times over (memo references), which a plain recursion would walk exponentially often, or
    nest lists deeper than Python's stack."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict | list | tuple) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(reversed(list(x.values() if isinstance(x, dict) else x)))
    return out


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
        raise InvalidCheckpointError(path, "expected a state dict of name -> tensor")
    entries: dict[str, TensorEntry] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    named: dict[str, torch.Tensor] = {}
    for raw, t in state_dict.items():
        check_name(raw, str(path))  # as a safetensors header's: a message shows it, an output stores it
        name = raw[len(strip_prefix) :] if strip_prefix and raw.startswith(strip_prefix) else raw
        if name in named:
            raise InvalidCheckpointError(
                path,
                f"tensor '{name}' appears both with and without the '{strip_prefix}' prefix; "
                "which one is the model is ambiguous",
            )
        if name == "__metadata__":  # a safetensors header keeps this key for its own strings
            raise InvalidCheckpointError(path, "a tensor is named '__metadata__', which a safetensors file cannot hold")
        if t.layout != torch.strided or t.is_nested:
            kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
            raise InvalidCheckpointError(path, f"tensor '{name}' is {kind}, not a dense tensor; re-save it dense")
        if t.dtype not in DTYPE_NAMES:
            raise InvalidCheckpointError(
                path, f"tensor '{name}' is {str(t.dtype).removeprefix('torch.')}, which a safetensors file cannot hold"
            )
        if not t.is_contiguous():
            raise InvalidCheckpointError(path, f"tensor '{name}' is not stored contiguously; re-save the file")
        named[name] = t

    # Names sharing one storage: the first in name order is the tensor, the others its aliases, so that
    # the same ties saved in another order (another script's dict) make the same entries.
    def where(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
        return t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype

    for name, t in sorted(named.items()):
        seen.setdefault(where(t), name)
    for name, t in named.items():
        tensor = seen[where(t)]
        if t.numel() and tensor != name:
            aliases[name] = tensor
            continue
        info = TensorInfo(tuple(t.shape), t.dtype)
        if offset is None:
            entries[name] = TensorEntry(info, path)
            continue
        off = offset(t)
        entries[name] = TensorEntry(info, path, off, tensor=t if off < 0 else None)
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[1].offset))
    return ordered, aliases
