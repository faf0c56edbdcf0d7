"""Where checkpoints come from: every kind of run implements ``Source`` (``source.py``); the engine sees
``Checkpoint`` headers and ``Reader`` objects, no more.

Local runs (``local.py``): a folder of ``step{N}/`` or ``checkpoint-{N}/`` folders, or nanoGPT ``ckpt.pt``
files (a folder searched two levels deep, or a glob). Hub runs (``hub.py``): one revision per step, its
name matched by a ``RevisionPattern`` (``revisions.py``).
"""

from __future__ import annotations

from typing import Any

from ckptavg.sources.checkpoint import Checkpoint, EntryReader, FileTable, Reader, TensorEntry, TensorInfo
from ckptavg.sources.local import LocalRun, open_checkpoint, open_run
from ckptavg.sources.revisions import RevisionPattern
from ckptavg.sources.source import Listing, Source

__all__ = [
    "Checkpoint",
    "EntryReader",
    "FileTable",
    "Listing",
    "LocalRun",
    "Reader",
    "RevisionPattern",
    "Source",
    "TensorEntry",
    "TensorInfo",
    "open_checkpoint",
    "open_hub_run",
    "open_run",
]


def open_hub_run(repo: str, **options: Any) -> Source:
    """A run on the Hub (or a Hub-like endpoint): steps from its revisions, files fetched when averaged."""
    from ckptavg.sources.hub import HubSource
    from ckptavg.tokens import clean_token

    options["token"] = clean_token(options.get("token"), "the token argument")  # a header, not a traceback
    # endpoint, token, cache_dir, pattern (a revisions.RevisionPattern), allow_legacy, retry_time
    return HubSource(repo, **options)
