"""Load a task's JSONL items from beside its YAML, wherever lm-evaluation-harness is run from.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset("json", ...)``, which reads a
relative path from the current directory, not from the YAML's. A task YAML here names this loader as its
``custom_dataset`` (lm-eval imports ``!function`` modules from the YAML's folder) and keeps its data files
relative, so the tasks work offline from any directory, with ``ckptavg eval --tasks`` or ``lm_eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata: Any) -> Any:
    """A DatasetDict with one split per entry of ``data_files`` (paths relative to this folder)."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        with open(HERE / name, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
