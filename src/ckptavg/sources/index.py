"""Read a shard index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) and check it.

One parser for local folders and the Hub: the index is ``{"metadata": {...}, "weight_map": {tensor: file}}``
and names the files that hold a checkpoint's tensors. Every file name is checked to be a plain relative
path before anything joins it to a folder or a URL, so an index cannot point outside its checkpoint.
"""

from __future__ import annotations

from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources.safetensors_file import check_name, kind, parse_json_object, show

MAX_INDEX_BYTES = 64 * 1024 * 1024  # Pythia-12B's index is 28 KB; a 100k-tensor model's about 10 MB


def weight_map(raw: bytes, where: str) -> dict[str, str]:
    """The index's tensor name -> shard file name, every entry checked; messages start with ``where``."""
    if len(raw) > MAX_INDEX_BYTES:
        raise InvalidCheckpointError(
            where, f"index is {len(raw)} bytes, over the {MAX_INDEX_BYTES} a shard index can need; refused"
        )
    index = parse_json_object(raw, where, "index")
    if "weight_map" not in index:
        raise InvalidCheckpointError(where, "index has no weight_map")
    mapping = index["weight_map"]
    if not isinstance(mapping, dict):
        raise InvalidCheckpointError(where, f"weight_map is a JSON {kind(mapping)}, not an object")
    if not mapping:
        raise InvalidCheckpointError(where, "weight_map is empty; the index names no tensors")
    for name, file in mapping.items():
        check_name(name, where)
        if not isinstance(file, str):
            raise InvalidCheckpointError(
                where, f"weight_map gives tensor '{name}' a JSON {kind(file)}, not a file name"
            )
        _check_file_name(file, name, where)
    return dict(mapping)


def shard_files(raw: bytes, where: str) -> list[str]:
    """The distinct shard file names of the index, in order of first appearance."""
    return list(dict.fromkeys(weight_map(raw, where).values()))


def _check_file_name(file: str, tensor: str, where: str) -> None:
    why = _bad_path(file)
    if why:
        raise InvalidCheckpointError(
            where,
            f"weight_map puts tensor '{tensor}' in {show(file)}, which {why}; "
            "an index may only name files inside the checkpoint folder",
        )


def _bad_path(file: str) -> str | None:
    """Why ``file`` is not a plain relative path of plain parts, or None when it is one."""
    if not file:
        return "is empty"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in file):
        return "holds control characters"
    if any(0xD800 <= ord(c) < 0xE000 for c in file):
        return "holds a lone UTF-16 surrogate"
    if "\\" in file:
        return "holds a backslash"
    if file.startswith("/"):
        return "is an absolute path (outside the checkpoint folder)"
    if len(file) >= 2 and file[1] == ":":
        return "starts with a drive letter"
    parts = file.split("/")
    if ".." in parts:
        return "climbs out with '..' (outside the checkpoint folder)"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' part"
    if file.endswith(".index.json"):
        return "is an index, not a shard"
    return None
