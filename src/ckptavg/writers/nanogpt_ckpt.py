"""nanoGPT's own checkpoint format for an averaged model, so ``train.py --init_from=resume`` and
``sample.py`` take it as is. ``torch.save`` needs the whole state dict at once, so this holds the
output model in memory one time; nanoGPT models are small enough for that, the 12B Pythia path never
comes here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def write_nanogpt_ckpt(folder: Path, *, iter_num: int, meta: dict[str, object], aliases: dict[str, str]) -> Path:
    """Write ``folder/ckpt.pt`` from the safetensors files in ``folder``: model, model_args, iter_num, config.

    Tied names share one tensor again (nanoGPT ties ``lm_head.weight`` to ``transformer.wte.weight``),
    and there is no optimizer state: resuming training from it starts a fresh optimizer.
    """
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    ckpt = {"model": state, "iter_num": iter_num, **{k: v for k, v in meta.items() if k in ("model_args", "config")}}
    path = folder / "ckpt.pt"
    torch.save(ckpt, path)
    return path
