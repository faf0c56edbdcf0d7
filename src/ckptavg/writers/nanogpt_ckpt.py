"""nanoGPT's own checkpoint format for an averaged model, so ``sample.py`` and ``train.py
--init_from=resume`` take it as is: ``model``, ``optimizer``, ``model_args``, ``iter_num``,
``best_val_loss``, ``config``, as train.py saves them.

The weights are the average; ``iter_num`` is the window's end. The rest is the newest member's: its
``model_args`` and ``config``, its ``best_val_loss`` (the averaged model was never evaluated, so this is
the run's best as of that member: with ``always_save_checkpoint=False`` a resumed run saves again only when
it beats it), and with ``--optimizer newest`` (the default) its optimizer state, which train.py loads with
``optimizer.load_state_dict`` (AdamW's moments belong to the member's weights, not the average: a resumed
run starts from the average with the newest member's moments and step count). ``--optimizer none``
leaves it out: sample.py is unaffected, and train.py's resume then stops at
``optimizer.load_state_dict(checkpoint['optimizer'])`` with a KeyError unless the user starts a fresh
optimizer there.

``torch.save`` needs the whole state dict at once, so this holds the output model in memory one time and
the optimizer state mapped from the member's file (about twice the model in fp32): its pages count in the
process's RSS while torch.save copies them, as clean file pages the kernel can drop (measured on a 23M
parameter model: peak RSS 522 MB with --optimizer newest, 335 MB with none, 279 MB without ckpt.pt).
nanoGPT models are small enough for that; the 12B Pythia path never comes here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ckptavg.errors import OptionError
from ckptavg.sources.checkpoint import Checkpoint
from ckptavg.sources.nanogpt import TrainingState, read_training_state

OPTIMIZER_CHOICES = ("newest", "none")


def ckpt_training_state(newest: Checkpoint, optimizer: str) -> TrainingState:
    """What an output's ``ckpt.pt`` takes from its newest member ``newest``, read and checked before any
    averaging, so a member that cannot give it fails the run before anything is written."""
    if optimizer not in OPTIMIZER_CHOICES:
        raise OptionError("--optimizer", f"must be one of {', '.join(OPTIMIZER_CHOICES)}, got {optimizer!r}")
    if newest.path is None:  # api.average refuses --format ckpt for anything but local nanoGPT files
        raise OptionError("--format ckpt", f"writes nanoGPT's ckpt.pt, from nanoGPT files only ({newest.label})")
    return read_training_state(newest.path, newest.step, optimizer=optimizer == "newest")


def write_nanogpt_ckpt(folder: Path, *, iter_num: int, state: TrainingState, aliases: dict[str, str]) -> Path:
    """Write ``folder/ckpt.pt`` from the safetensors files in ``folder`` and the newest member's ``state``.

    Tied names share one tensor again (nanoGPT ties ``lm_head.weight`` to ``transformer.wte.weight``).
    An entry the member did not have is left out rather than made up.
    """
    model: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        model.update(load_file(shard))
    for alias, canonical in aliases.items():
        model[alias] = model[canonical]
    entries = {
        "model": model,
        "optimizer": state.optimizer,
        "model_args": state.model_args,
        "iter_num": iter_num,
        "best_val_loss": state.best_val_loss,
        "config": state.config,
    }
    path = folder / "ckpt.pt"
    torch.save({k: v for k, v in entries.items() if v is not None}, path)
    return path
