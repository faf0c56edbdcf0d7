#!/usr/bin/env python
"""One ckptavg command from two source trees, run alternately: what a change costs, as a ratio.

    git worktree add --detach /tmp/ckptavg-before <commit>
    .venv/bin/python benchmarks/before_after.py --before /tmp/ckptavg-before/src --repeat 3 1b-window
    .venv/bin/python benchmarks/before_after.py --before /tmp/ckptavg-before/src --repeat 3 160m-trajectory

Both trees run under this Python, on the same data (made by benchmarks/run.py or make_checkpoints.py
under --data), with the inputs read twice untimed before each run so the page cache is warm, and an
output folder emptied before each run. Runs alternate (before, after, before, after, ...), so a slow
spell of this shared machine hits both. Every run is printed, then the best of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = {  # the same commands as benchmarks/run.py
    "1b-window": ("pythia-1b", "5000:5000", list(range(1000, 5001, 1000))),
    "160m-trajectory": ("pythia-160m", "5000:20000", list(range(1000, 20001, 1000))),
}


def warm(files: list[Path]) -> None:
    for _ in range(2):
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_once(src: Path, root: Path, ends: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ckptavg", "lawa", str(root), "--steps", ends, "--k", "5", "--interval", "1000"]
    cmd += ["--out", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--before", type=Path, required=True, help="src/ folder of the tree to compare against")
    ap.add_argument("--after", type=Path, default=HERE.parent / "src")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", HERE.parent / "benchdata")))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    name, ends, steps = SCENARIOS[args.scenario]
    root = args.data / name
    files = [root / f"step{s}" / "pytorch_model.bin" for s in steps]
    missing = [f for f in files if not f.is_file()]
    if missing:
        sys.exit(f"missing {missing[0]}: make the data with benchmarks/run.py {args.scenario} first")
    out = args.data / "before-after-out"
    times: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(args.repeat):
        for label, src in (("before", args.before), ("after", args.after)):
            warm(files)
            t = run_once(src, root, ends, out / label)
            times[label].append(t)
            print(f"run {i + 1} {label:6s} {t:7.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.scenario}: before {best['before']:.2f} s, after {best['after']:.2f} s (best of {args.repeat}); ")
    print(f"after/before = {best['after'] / best['before']:.3f}")
    print("all runs: " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()))


if __name__ == "__main__":
    main()
