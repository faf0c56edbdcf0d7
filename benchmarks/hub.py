#!/usr/bin/env python
"""The Hub path against local files: one trajectory from the loopback test Hub and from disk.

Serves a synthetic Pythia-layout run (made by make_checkpoints.py) from tests/hub_server.py on
127.0.0.1, runs `ckptavg lawa --repo ... --disk-budget ...` and `ckptavg lawa RUN ...` on the same
windows, and reports: wall time of each (the Hub path's overhead as a ratio), bytes downloaded against
what a naive approach downloads (every member of every window), and the cache's peak size against the
budget (sampled every 10 ms).

    .venv/bin/python benchmarks/hub.py --data /work/benchdata/pythia-160m --ends 5000:8000 --k 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost")

from hub_server import HubServer  # noqa: E402


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a run folder of step{N}/ checkpoints")
    ap.add_argument("--ends", default="5000:8000", help="window ends START:END (interval 1000)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--budget-windows", type=float, default=1.0, help="disk budget in windows' worth")
    args = ap.parse_args()
    start, end = (int(x) for x in args.ends.split(":"))
    steps = sorted({e - i * 1000 for e in range(start, end + 1, 1000) for i in range(args.k)})
    ckptavg = [sys.executable, "-m", "ckptavg"]
    with tempfile.TemporaryDirectory(prefix="ckptavg-hubbench-") as tmp:
        tmpd = Path(tmp)
        hub_root = tmpd / "hub" / "bench" / "pythia"
        for s in steps:  # hard links: the server reads the same bytes without copying gigabytes
            (hub_root / f"step{s}").mkdir(parents=True)
            for f in (args.data / f"step{s}").iterdir():
                os.link(f, hub_root / f"step{s}" / f.name)
        ckpt_bytes = max(tree_bytes(args.data / f"step{s}") for s in steps)
        budget = int(ckpt_bytes * args.k * args.budget_windows)
        windows = (end - start) // 1000 + 1
        subprocess.run(
            ["cat", *[str(p) for s in steps for p in (args.data / f"step{s}").iterdir()]],
            stdout=subprocess.DEVNULL,
            check=True,
        )  # warm the page cache for both contenders
        with HubServer(tmpd / "hub") as server:
            cache = tmpd / "cache"
            peak, stop = [0], threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    if cache.exists():
                        peak[0] = max(peak[0], tree_bytes(cache))
                    time.sleep(0.01)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            subprocess.run(
                [
                    *ckptavg,
                    "lawa",
                    "--repo",
                    "bench/pythia",
                    "--endpoint",
                    server.url,
                    "--cache-dir",
                    str(cache),
                    "--steps",
                    args.ends,
                    "--k",
                    str(args.k),
                    "--interval",
                    "1000",
                    "--disk-budget",
                    str(budget),
                    "--out",
                    str(tmpd / "hub-out"),
                    "-q",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            hub_s = time.perf_counter() - t0
            stop.set()
            watcher.join()
            downloaded = sum(
                int(r.split()[0] == "GET" and "/resolve/" in r and r.endswith((".bin", ".safetensors")))
                for r in server.requests
            )
        t0 = time.perf_counter()
        subprocess.run(
            [
                *ckptavg,
                "lawa",
                str(args.data),
                "--steps",
                args.ends,
                "--k",
                str(args.k),
                "--interval",
                "1000",
                "--out",
                str(tmpd / "local-out"),
                "-q",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        local_s = time.perf_counter() - t0
        naive = windows * args.k
        print(f"| trajectory | {windows} windows, k={args.k}, {len(steps)} checkpoints of {ckpt_bytes / 1e9:.3f} GB |")
        print("|---|---|")
        print(f"| local files | {local_s:.1f} s |")
        print(f"| loopback Hub | {hub_s:.1f} s ({hub_s / local_s:.2f}x local) |")
        print(
            f"| weight files downloaded | {downloaded} (naive, every member of every window: {naive}; "
            f"{downloaded / naive:.2f}x) |"
        )
        print(f"| peak cache | {peak[0] / 1e9:.3f} GB (budget {budget / 1e9:.3f} GB; {peak[0] / budget:.2f}x) |")


if __name__ == "__main__":
    main()
