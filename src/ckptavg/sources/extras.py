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

The tokenizer's names on the list (``TOKENIZER_FILES``) may come from elsewhere: ``--tokenizer DIR|REPO``
(``resolve_tokenizer``) takes them from a folder by the same rule, or from a Hub repository (only those
names are fetched), for every output, in place of the run's; ``convert --tokenizer`` and ``eval
--tokenizer`` use the same rule.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.errors import HubError, InvalidArgumentError, InvalidCheckpointError
from ckptavg.tokens import public_url

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


# The model's own files; every other name on the list belongs to the tokenizer.
MODEL_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = EXTRA_FILES - MODEL_FILES
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # how the Hub names repositories
_HASH_BLOCK = 16 << 20  # bytes per read when hashing: few system calls, and little memory


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


def has_tokenizer(names: Iterable[str]) -> bool:
    """Whether a checkpoint whose extra files are ``names`` carries a tokenizer (any of its files)."""
    return any(n in TOKENIZER_FILES for n in names)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in large blocks into one reused buffer."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size  # a small file gets a small buffer (zeroing 16 MiB costs ms)
        view = memoryview(bytearray(min(_HASH_BLOCK, max(size, 1 << 16))))
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


@dataclass(frozen=True)
class Tokenizer:
    """Tokenizer files that replace a run's own in every output (``--tokenizer DIR|REPO``).

    ``folder``: where they are (what transformers loads them from); ``files``: output name -> the local
    file to copy (checked by the rule of every extra file); ``origin``: where they came from, for
    provenance (``{"path": ...}``, or a Hub repository, its endpoint and the commit fetched)."""

    folder: Path
    files: dict[str, Path]
    origin: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def digests(self) -> dict[str, str]:
        """sha256 of each file (read once): what decides whether an output made with them is current."""
        return {name: sha256_file(path) for name, path in sorted(self.files.items())}


def tokenizer_files(folder: Path, option: str = "--tokenizer") -> dict[str, Path]:
    """The tokenizer files of ``folder`` by the rule every extra file follows; its model config is not
    one of them (an output keeps its own). A folder without any is an error naming it."""
    if not folder.is_dir():
        raise InvalidCheckpointError(folder, f"{option} needs a folder of tokenizer files")
    found = _tokenizer_files_in(folder)
    if not found:
        raise InvalidCheckpointError(
            folder, f"{option}: no tokenizer files here (looked for tokenizer.json, vocab.json, tokenizer.model, ...)"
        )
    return found


def _tokenizer_files_in(folder: Path) -> dict[str, Path]:
    return {n: p for n, p in extra_files(folder).items() if n in TOKENIZER_FILES}


def local_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer(folder, tokenizer_files(folder), {"path": str(folder.absolute())})


def resolve_tokenizer(
    spec: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
    option: str = "--tokenizer",
) -> Tokenizer:
    """``spec`` is a folder (when one exists by that name) or a Hub repository id, whose tokenizer files
    (and only those) are fetched with huggingface_hub into its cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return local_tokenizer(path)
    if os.path.lexists(path):
        raise InvalidArgumentError(f"{option} {spec}: not a folder (give a folder of tokenizer files, or a Hub repo)")
    if not _REPO_ID.fullmatch(spec):  # fullmatch: '$' would take a trailing newline
        raise InvalidArgumentError(f"{option} {spec}: no such folder, and not a Hub repository id (ORG/NAME)")
    folder = _fetch(spec, endpoint=endpoint, token=token, cache_dir=cache_dir, option=option)
    files = _tokenizer_files_in(folder)
    where = public_url(endpoint) or "the Hugging Face Hub"
    if not files:
        raise HubError(f"{option} {spec}: the repository on {where} holds no tokenizer files", repo=spec)
    return Tokenizer(folder, files, {"repo": spec, "endpoint": public_url(endpoint), "commit": folder.name})


def _fetch(spec: str, *, endpoint: str | None, token: str | None, cache_dir: str | None, option: str) -> Path:
    """The snapshot folder of ``spec``'s main revision holding its tokenizer files (a one-line HubError
    for what the client raises: the repository missing or private, HTTP errors, no connection)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    host = public_url(endpoint) or "the Hugging Face Hub"
    fail = f"{option} {spec}: no such folder, and"
    try:
        return Path(
            snapshot_download(
                spec,
                allow_patterns=sorted(TOKENIZER_FILES),
                endpoint=endpoint,
                token=token,
                cache_dir=cache_dir,
            )
        )
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise HubError(f"{fail} no such repository on {host} (if private: pass --token)", repo=spec) from e
    except HfHubHTTPError as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        raise HubError(f"{fail} {host} answered HTTP {code or '?'} for the repository", repo=spec, status=code) from e
    except Exception as e:
        # Transport errors come from the client's HTTP library (its name changes between versions).
        if isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests")):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HubError(f"{fail} {host} cannot be reached ({type(e).__name__}: {first})", repo=spec) from e
        raise
