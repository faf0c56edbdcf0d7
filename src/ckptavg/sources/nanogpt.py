"""nanoGPT's ``ckpt.pt``: ``model``, ``optimizer``, ``model_args``, ``iter_num``, ``best_val_loss``, ``config``.

train.py overwrites one ``ckpt.pt`` at every evaluation, so users keep a copy per step; the step is the
``iter_num`` inside. Planning reads only ``model`` (the optimizer, twice the model again, stays on disk).
With ``compile=True`` every key starts with ``_orig_mod.``, which nanoGPT strips on load and so do we.
``transformer.wte.weight`` and ``lm_head.weight`` share storage: they are read and averaged once.

``read_training_state`` reads the rest for an output's ``ckpt.pt`` (``--format ckpt``): the newest
member's ``best_val_loss`` and, unless ``--optimizer none``, its ``optimizer``. The file goes through the
same checks as at planning (``check_archive``: the zip records and a scan of the pickle that imports
nothing) before ``torch.load(weights_only=True, mmap=True)``, so the optimizer's tensors are mapped, not
read, until ``torch.save`` copies them into the output. AdamW's state is two fp32 tensors per parameter,
about twice the model; nanoGPT models are small (GPT-2 124M: 0.5 GB of weights, 1 GB of optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainingState:
    """What a nanoGPT checkpoint holds besides its weights and step; None where the file has no such entry."""

    model_args: dict[object, object] | None
    config: dict[object, object] | None
    best_val_loss: float | torch.Tensor | None
    optimizer: dict[object, object] | None  # a torch optimizer state dict, its tensors mapped from the file


def read_training_state(path: Path, step: int, *, optimizer: bool) -> TrainingState:
    """The training state of the nanoGPT checkpoint ``path``, planned as ``iter_num`` ``step``.

    With ``optimizer``, the file must hold an ``optimizer`` and a ``best_val_loss``, which train.py
    ``--init_from=resume`` reads; without, its optimizer state is left out and a ``best_val_loss`` is
    taken where there is one. Raises InvalidCheckpointError naming ``path``.
    """
    # The plan opened this file already: a legacy pickle here was allowed by --allow-legacy-pickle, and
    # weights_only applies to it as to a zip file.
    obj, _ = load_torch_file(path, allow_legacy=True)
    if not isinstance(obj, dict) or "iter_num" not in obj or _step(obj["iter_num"], path) != step:
        raise InvalidCheckpointError(path, f"changed since the run was planned (as iter_num {step}); run it again")
    hint = "pass --optimizer none to write a ckpt.pt without the optimizer state (sample.py needs none)"
    if optimizer:
        for key in ("optimizer", "best_val_loss"):
            if key not in obj:
                raise InvalidCheckpointError(
                    path, f"has no '{key}', which nanoGPT's train.py --init_from=resume reads; {hint}"
                )
    opt = obj.get("optimizer") if optimizer else None
    if opt is not None and not _optimizer_state(opt):
        raise InvalidCheckpointError(
            path, f"its 'optimizer' is not a torch optimizer state dict ('state' and 'param_groups'); {hint}"
        )
    loss = _loss(obj["best_val_loss"], path) if "best_val_loss" in obj else None
    model_args, config = (obj.get(k) for k in ("model_args", "config"))
    return TrainingState(
        model_args if isinstance(model_args, dict) else None,
        config if isinstance(config, dict) else None,
        loss,
        opt,
    )


def _optimizer_state(x: object) -> bool:
    """Shaped as ``torch.optim.Optimizer.state_dict()``; whether it fits the model is for load_state_dict."""
    if not isinstance(x, dict) or not isinstance(x.get("state"), dict) or not isinstance(x.get("param_groups"), list):
        return False
    return all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in x["param_groups"])


def _loss(value: object, path: Path) -> float | torch.Tensor:
    """``best_val_loss`` as train.py saves it (a 0-dim float tensor: a mean of losses) or a plain number;
    a tensor is copied out of the file's mapping."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.detach().clone()
    if isinstance(value, int | float) and not isinstance(value, bool):  # NaN too: a diverged run saves one
        return value
    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:80]
    raise InvalidCheckpointError(path, f"its 'best_val_loss' is {shown}, not a loss (a number)")


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
