#!/usr/bin/env python
"""The script a user would write to average checkpoints (the 'naive' contender).

For each window: torch.load every member's pytorch_model.bin whole, sum the float tensors in
fp32, divide by k, cast back to the checkpoint dtype and save with safetensors.torch.save_file.
Non-float buffers (Pythia's bool causal masks) are copied from the newest member. Non-finite
float buffers (masked_bias = -inf) are averaged like everything else, as a naive script would.

    naive_average.py ROOT --window 1000,2000,3000,4000,5000 [--window ...] --out OUT
    naive_average.py ROOT --lawa-ends 5000:20000 --k 5 --interval 1000 --out OUT
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from windows_arg import add_window_args, windows_from_args  # the script's folder is on sys.path


def average_window(root: Path, steps: list[int], out_dir: Path) -> None:
    acc: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    for step in steps:
        sd = torch.load(root / f"step{step}" / "pytorch_model.bin", map_location="cpu", weights_only=True)
        for name, t in sd.items():
            if t.is_floating_point():
                if name in acc:
                    acc[name] += t.float()
                else:
                    acc[name] = t.float()
            else:
                newest[name] = t
        dtypes = {n: t.dtype for n, t in sd.items()}
        del sd
    out = {}
    for name, a in acc.items():
        out[name] = (a / len(steps)).to(dtypes[name]).contiguous()
    out.update({n: t.contiguous() for n, t in newest.items()})
    del acc
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(root / f"step{steps[-1]}" / "config.json", out_dir / "config.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    add_window_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    windows = windows_from_args(ap, args)
    for w in windows:
        average_window(args.root, w, args.out / f"step{w[-1]}")
        print(f"averaged {w} -> {args.out / f'step{w[-1]}'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
