"""A transformers checkpoint folder (one Pythia step): safetensors or .bin, whole or sharded.

Pythia's step branches hold ``pytorch_model.bin`` (fp16, torch zip format), or for 12B three ``.bin``
shards with ``pytorch_model.bin.index.json``; only some ``main`` branches add ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources.checkpoint import Checkpoint, TensorEntry, open_regular
from ckptavg.sources.extras import extra_files
from ckptavg.sources.index import MAX_INDEX_BYTES, shard_files
from ckptavg.sources.safetensors_file import read_safetensors_index
from ckptavg.sources.torch_file import load_torch_file, state_dict_entries

# In order of preference when a folder holds more than one.
WEIGHT_FILES = (
    ("model.safetensors", "safetensors"),
    ("model.safetensors.index.json", "safetensors"),
    ("pytorch_model.bin", "bin"),
    ("pytorch_model.bin.index.json", "bin"),
)
PROVENANCE_FILE = "ckptavg.json"


def find_weights(folder: Path) -> tuple[str, list[Path]] | None:
    """The format and weight files of a checkpoint folder, or None when it has none we read."""
    for name, fmt in WEIGHT_FILES:
        p = folder / name
        if p.is_file():
            return fmt, (_shards_from_index(p) if name.endswith(".index.json") else [p])
    return None


def _shards_from_index(index: Path) -> list[Path]:
    try:
        with open_regular(index) as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise InvalidCheckpointError(index, f"cannot read ({e.strerror})") from e
    # Names are checked as written (plain relative paths), not by where symlinks lead: the Hub cache's
    # snapshot folders are symlinks into a blobs folder, and that is fine; '../../x' or '/etc/x' is not.
    shards = [index.parent / f for f in shard_files(raw, str(index))]
    for p in shards:
        if not p.is_file():
            raise InvalidCheckpointError(index, f"weight_map names '{p.name}', which does not exist")
    return shards


def open_weight_file(
    path: Path, fmt: str, *, allow_legacy: bool = False
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one weight file (a whole checkpoint or one shard), and its tied names."""
    if fmt == "safetensors":
        return read_safetensors_index(path)[0], {}
    obj, offset = load_torch_file(path, allow_legacy=allow_legacy)
    return state_dict_entries(path, obj, offset)


def open_hf_checkpoint(folder: Path, step: int, *, allow_legacy: bool = False) -> Checkpoint:
    found = find_weights(folder)
    if found is None:
        raise InvalidCheckpointError(folder, f"no weights found (looked for {', '.join(n for n, _ in WEIGHT_FILES)})")
    fmt, shards = found
    entries: dict[str, TensorEntry] = {}
    aliases: dict[str, str] = {}
    for shard in shards:
        part, part_aliases = open_weight_file(shard, fmt, allow_legacy=allow_legacy)
        dup = set(part) & set(entries)
        if dup:
            raise InvalidCheckpointError(folder, f"tensor '{sorted(dup)[0]}' appears in more than one shard")
        entries.update(part)
        aliases.update(part_aliases)
    files, extras = list(shards), extra_files(folder)
    return Checkpoint(step, str(folder), fmt, entries, aliases, files, extras, path=folder, name=folder.name)
