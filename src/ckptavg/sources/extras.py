"""Which files besides the weights go into an output: one allow-list, for local folders and the Hub alike.

An output must load in ``transformers`` (``from_pretrained``), ``lm-evaluation-harness`` and nanoGPT as it
is, so it needs the newest member's model config, generation config and tokenizer files, and nothing else:
users push outputs to the Hub, and a file copied because it happened to lie in a checkpoint folder (an
``.env``, a key, a colleague's notes) would go with them. Only these names, at the top of the checkpoint
folder, are copied; everything else is left alone.

A local file counts only if it is a regular file inside the checkpoint folder, or a symlink that stays
there or points into the ``blobs`` folder of the huggingface_hub cache that the folder is a snapshot of
(every file of a snapshot is such a link). A symlink elsewhere (``config.json -> ~/.ssh/id_rsa``) is
refused by name rather than skipped: a config that is silently missing makes an output that does not
load.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptavg.errors import InvalidCheckpointError

EXTRA_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def is_extra_file(name: str) -> bool:
    """Whether a file of this name (relative to the checkpoint folder) goes into the outputs."""
    return name in EXTRA_FILES


def extra_files(folder: Path) -> dict[str, Path]:
    """The allowed extra files of a local checkpoint folder: output name -> the real file to copy."""
    found = {}
    for name in sorted(EXTRA_FILES):
        path = folder / name
        if not os.path.lexists(path):
            continue
        real = Path(os.path.realpath(path))
        if not _within(real, folder):
            raise InvalidCheckpointError(
                path,
                f"a symlink to {real}, outside the checkpoint folder; not copied into outputs "
                "(replace the link by a copy of the file, or remove it)",
            )
        if not real.is_file():
            raise InvalidCheckpointError(path, "not a regular file")
        found[name] = real
    return found


def _within(real: Path, folder: Path) -> bool:
    root = Path(os.path.realpath(folder))
    if real.is_relative_to(root):
        return True
    # A snapshot of the huggingface_hub cache: <repo>/snapshots/<commit>/<file> -> <repo>/blobs/<hash>.
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
