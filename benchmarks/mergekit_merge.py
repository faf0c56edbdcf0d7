#!/usr/bin/env python
"""mergekit contender: one `mergekit-yaml` linear merge per LAWA window.

Writes one YAML config per window (equal weights, dtype float16, members as local paths) and
runs them one after another with the mergekit CLI from its own virtualenv (default
$BENCH_DATA/mergekit-venv; BENCH_DATA defaults to benchdata/ in the repo). Stops at the first failing
merge and exits with its status.
Uses only the standard library (no torch import), so the driver adds nothing to peak RSS.

    mergekit_merge.py ROOT --lawa-ends 5000:5000 --k 5 --interval 1000 --out OUT
    mergekit_merge.py ROOT --window 1000,2000,3000,4000,5000 --out OUT --configs-only

By default each merge runs with --lazy-unpickle (mergekit's low-memory loader for .bin files, as
the issue asks); --no-lazy-unpickle uses mergekit's eager torch.load path instead. Flags this
script does not know are passed on to mergekit-yaml.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from windows_arg import add_window_args, windows_from_args  # the script's folder is on sys.path

DATA = Path(os.environ.get("BENCH_DATA", Path(__file__).resolve().parent.parent / "benchdata"))
DEFAULT_MERGEKIT = Path(os.environ.get("MERGEKIT_VENV", DATA / "mergekit-venv")) / "bin" / "mergekit-yaml"
# --no-copy-tokenizer: the synthetic run folders have no tokenizer files.
DEFAULT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def config_yaml(root: Path, steps: list[int]) -> str:
    lines = ["merge_method: linear", "dtype: float16", "parameters:", "  normalize: true", "models:"]
    w = 1.0 / len(steps)
    for s in steps:
        lines += [f"  - model: {(root / f'step{s}').resolve()}", "    parameters:", f"      weight: {w!r}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    add_window_args(ap)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="path to mergekit-yaml")
    ap.add_argument("--configs-only", action="store_true")
    ap.add_argument(
        "--no-lazy-unpickle",
        action="store_true",
        help="use mergekit's default (eager torch.load) loader instead of --lazy-unpickle",
    )
    args, extra = ap.parse_known_args(argv)  # unknown flags are passed on to mergekit-yaml

    windows = windows_from_args(ap, args)
    cfg_dir = args.out / "_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for w in windows:
        cfg = cfg_dir / f"step{w[-1]}.yml"
        cfg.write_text(config_yaml(args.root, w))
        if args.configs_only:
            print(cfg)
            continue
        out = args.out / f"step{w[-1]}"
        if out.exists():
            shutil.rmtree(out)
        lazy = [] if args.no_lazy_unpickle else ["--lazy-unpickle"]
        cmd = [str(args.mergekit), str(cfg), str(out), *lazy, *DEFAULT_FLAGS, *extra]
        t = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"mergekit window {w}: rc={rc} {time.perf_counter() - t:.1f}s", flush=True)
        if rc != 0:
            print("failed command: " + " ".join(cmd), file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
