"""nanoGPT's ``ckpt.pt``: ``model``, ``optimizer``, ``model_args``, ``iter_num``, ``best_val_loss``, ``config``.

train.py overwrites one ``ckpt.pt`` at every evaluation, so users keep a copy per step; the step is the
``iter_num`` inside. Only ``model`` is read (the optimizer, twice the model again, stays on disk). With
``compile=True`` every key starts with ``_orig_mod.``, which nanoGPT strips on load and so do we.
``transformer.wte.weight`` and ``lm_head.weight`` share storage: they are read and averaged once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources.checkpoint import Checkpoint
from ckptavg.sources.torch_file import load_torch_file, state_dict_entries

COMPILE_PREFIX = "_orig_mod."


def open_nanogpt_checkpoint(path: Path, *, allow_legacy: bool = False) -> Checkpoint:
    obj, offset = load_torch_file(path, allow_legacy=allow_legacy)
    if not isinstance(obj, dict) or "model" not in obj:
        raise InvalidCheckpointError(path, "not a nanoGPT checkpoint (no 'model' key)")
    if "iter_num" not in obj:
        raise InvalidCheckpointError(path, "nanoGPT checkpoint without an integer 'iter_num'")
    iter_num = _step(obj["iter_num"], path)
    entries, aliases = state_dict_entries(path, obj["model"], offset, strip_prefix=COMPILE_PREFIX)
    meta = {k: obj[k] for k in ("model_args", "config") if isinstance(obj.get(k), dict)}
    return Checkpoint(iter_num, str(path), "nanogpt", entries, aliases, [path], {}, meta, path=path, name=path.stem)


def _step(iter_num: object, path: Path) -> int:
    """``iter_num`` as a step: a non-negative int, or a one-element integer tensor holding one (a bool is
    not a step, a float is rounded by nobody, and step ranges start at 0)."""
    value = iter_num
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item() if value.dtype != torch.bool else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(iter_num, torch.Tensor) and iter_num.numel() != 1:
        shown = f"a tensor of {iter_num.numel()} elements"
    else:
        shown = repr(iter_num)[:80]
    raise InvalidCheckpointError(
        path, f"nanoGPT checkpoint's 'iter_num' is {shown}, not a step (a non-negative integer)"
    )
