#!/usr/bin/env python
"""The Hub path against local files: one trajectory from the loopback test Hub and from disk.

Serves a Pythia-layout run (made by make_checkpoints.py; optionally re-saved in N `.bin` shards with an
index, as Pythia-12B's are) from tests/hub_server.py on 127.0.0.1, and runs the same LAWA trajectory
with `ckptavg lawa --repo ... --disk-budget B` for each budget asked for and with `ckptavg lawa RUN` on
the very same files. Reports per run: wall time (the Hub path's overhead as a ratio to local files),
weight files downloaded against a naive approach (every member of every window), the cache's peak size
(sampled every 10 ms) against the budget and against one window's checkpoints, and the bytes planning
read from weight files (headers, by HTTP range).

    .venv/bin/python benchmarks/hub.py --data $BENCH_DATA/pythia-160m --ends 5000:8000 --k 5
    .venv/bin/python benchmarks/hub.py --data $BENCH_DATA/12b-slice --ends 5000:5000 --k 5 \\
        --shards 3 --budgets window,min

Budgets: `window` (the default: one window's checkpoints whole), `min` (k of the largest shard, plus
config and tokenizer files), or a number of bytes.

`--fault 500` runs each budget a second time with one HTTP 500 injected into the download of every weight
file (every shard of every revision); `--fault drop` with one dropped body (half sent, then the server
hangs up). The extra time should be the retry's backoff (0.5-1 s per file, several at once), and the
extra bytes served none for 500 and none for a drop (resumed by range), never a second download.

    .venv/bin/python benchmarks/hub.py --data $BENCH_DATA/pythia-160m --ends 5000:8000 --k 5 --fault 500
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost")

from hub_server import HubServer, PeakSize, tree_bytes  # noqa: E402

CKPTAVG = [sys.executable, "-m", "ckptavg"]
REPO = "bench/pythia"


def reshard(src: Path, dst: Path, shards: int) -> None:
    """Re-save one checkpoint as `shards` .bin files of about equal size, with Pythia's index."""
    import torch

    state = torch.load(src / "pytorch_model.bin", mmap=True, weights_only=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    parts: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        if size >= total * len(parts) / shards and len(parts) < shards:
            parts.append([])
        parts[-1].append(name)
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, names in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({n: state[n] for n in names}, dst / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    for f in src.iterdir():
        if f.name != "pytorch_model.bin":
            os.link(f, dst / f.name)


def floor(server: HubServer, weights: list[Path], scratch: Path) -> float:
    """Seconds to download every weight file once with huggingface_hub's downloader onto the same disk."""
    from huggingface_hub.file_download import http_get

    t0 = time.perf_counter()
    for f in weights:
        with open(scratch, "wb") as sink:
            http_get(f"{server.url}/{REPO}/resolve/{f.parent.name}/{f.name}", sink)
        scratch.unlink()
    return time.perf_counter() - t0


def lawa(source: list[str], args: argparse.Namespace, out: Path, *extra: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, from /usr/bin/time) of one `ckptavg lawa`."""
    t0 = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *CKPTAVG, "lawa", *source, "--steps", args.ends, "--k", str(args.k)]
        + ["--interval", "1000", "--out", str(out), "-q", *extra],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return time.perf_counter() - t0, int(done.stderr.split()[-1]) * 1024 / 1e9


def faulted(
    server: HubServer, args: argparse.Namespace, tmp: Path, weights: list[Path], budget: int, clean_s: float, clean: int
) -> list[str]:
    """The same Hub run with one fault injected into the download of every weight file."""
    server.requests.clear()
    server.bytes_sent = 0
    fault = {"status": 500} if args.fault == "500" else {"drop": True}
    for f in weights:  # one per file of each revision, which ckptavg asks for by commit
        commit = server.branches(REPO)[f.parent.name]
        server.inject("download", 1, file=f"{commit}/{f.name}", **fault)
    hub_s, _ = lawa(
        ["--repo", REPO, "--endpoint", server.url, "--cache-dir", str(tmp / "cache")],
        args,
        tmp / "out",
        "--disk-budget",
        str(budget),
    )
    left = server.pending().get("download", 0)
    server.queued["download"].clear()
    gets = [r for r in server.requests if r.startswith("GET") and re.search(r"\.bin( \[bytes=\d+-\])?$", r)]
    resumed = [r for r in gets if re.search(r"\[bytes=[1-9]\d*-\]$", r)]
    return [
        f"| &nbsp; with one {'HTTP 500' if args.fault == '500' else 'dropped body'} per weight file "
        f"({len(weights) - left} injected) | {hub_s:.1f} s ({hub_s - clean_s:+.1f} s against the fault-free run) |",
        f"| &nbsp; &nbsp; weight GETs, resumed by range, bytes served | {len(gets)}, {len(resumed)}, "
        f"{server.bytes_sent / 1e9:.3f} GB ({(server.bytes_sent - clean) / 1e6:+.1f} MB against the fault-free run) |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a run folder of step{N}/ checkpoints")
    ap.add_argument("--ends", default="5000:8000", help="window ends START:END (interval 1000)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--shards", type=int, default=1, help="serve each checkpoint in this many .bin shards")
    ap.add_argument("--budgets", default="window", help="comma list: window, min, or bytes")
    ap.add_argument("--rate", type=float, default=0, help="MB/s per connection, as a CDN limits a stream [none]")
    ap.add_argument(
        "--fault",
        choices=["500", "drop"],
        default=None,
        help="run each budget again with one HTTP 500 (or one dropped body) per weight file download",
    )
    args = ap.parse_args()
    start, end = (int(x) for x in args.ends.split(":"))
    steps = sorted({e - i * 1000 for e in range(start, end + 1, 1000) for i in range(args.k)})
    windows = (end - start) // 1000 + 1
    with tempfile.TemporaryDirectory(prefix="ckptavg-hubbench-", dir=args.data.parent) as tmp:
        tmpd = Path(tmp)
        run = tmpd / "hub" / REPO  # served by the Hub and read as a local run: the very same files
        for s in steps:
            (run / f"step{s}").mkdir(parents=True)
            if args.shards > 1:
                reshard(args.data / f"step{s}", run / f"step{s}", args.shards)
            else:  # hard links: the server reads the same bytes without copying gigabytes
                for f in (args.data / f"step{s}").iterdir():
                    os.link(f, run / f"step{s}" / f.name)
        ckpt_bytes = max(tree_bytes(run / f"step{s}") for s in steps)
        weights = [f for s in steps for f in (run / f"step{s}").glob("pytorch_model*.bin")]
        shard = max(f.stat().st_size for f in weights)
        small = max(
            tree_bytes(run / f"step{s}") - sum(f.stat().st_size for f in weights if f.parent.name == f"step{s}")
            for s in steps
        )
        subprocess.run(["cat", *map(str, weights)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
        local_s, local_rss = lawa([str(run)], args, tmpd / "local-out")
        rows = [
            f"| trajectory | {windows} window{'s' * (windows != 1)}, k={args.k}, {len(steps)} checkpoints of "
            f"{ckpt_bytes / 1e9:.3f} GB in {args.shards} file{'s' * (args.shards > 1)} |",
            "|---|---|",
            f"| local files | {local_s:.1f} s, peak RSS {local_rss:.2f} GB |",
        ]
        with HubServer(tmpd / "hub") as server:
            for f in weights:  # the real Hub has its content hashes ready; the test server computes them once
                server.etag(f)
            if args.rate:
                server.faults["rate"] = args.rate * 1e6
                rows.append(f"| server | at most {args.rate:g} MB/s per connection |")
            floor_s = floor(server, weights, tmpd / "floor.tmp")
            rows.append(f"| download floor (each weight file once, to disk, no averaging) | {floor_s:.1f} s |")
            for i, name in enumerate(args.budgets.split(",")):
                budget = {
                    "window": ckpt_bytes * args.k,
                    "min": args.k * shard + windows * small + 10**6,  # + index files, held to the end
                }.get(name) or int(name)
                cache = tmpd / f"cache{i}"
                server.requests.clear()
                server.bytes_sent = 0
                with PeakSize(cache, every=0.01) as sampled:
                    hub_s, hub_rss = lawa(
                        ["--repo", REPO, "--endpoint", server.url, "--cache-dir", str(cache)],
                        args,
                        tmpd / f"hub-out{i}",
                        "--disk-budget",
                        str(budget),
                    )
                clean_bytes = server.bytes_sent
                gets = [r for r in server.requests if r.startswith("GET") and re.search(r"\.bin( \[bytes=\d+-\])?$", r)]
                ranges = [tuple(map(int, m)) for r in server.requests for m in re.findall(r"\[bytes=(\d+)-(\d+)\]$", r)]
                header = sum(b + 1 - a for a, b in ranges)
                naive = windows * args.k * args.shards
                rows += [
                    f"| loopback Hub, budget {name} ({budget / 1e9:.2f} GB) | {hub_s:.1f} s "
                    f"({hub_s / local_s:.2f}x local, {hub_s / (local_s + floor_s):.2f}x local + download floor), "
                    f"peak RSS {hub_rss:.2f} GB |",
                    f"| &nbsp; weight files downloaded | {len(gets)} (naive, every member of every window: {naive}; "
                    f"{len(gets) / naive:.2f}x) |",
                    f"| &nbsp; peak cache | {sampled.peak / 1e9:.2f} GB ({sampled.peak / budget:.2f}x the budget, "
                    f"{sampled.peak / (ckpt_bytes * args.k):.2f}x one window's checkpoints) |",
                    f"| &nbsp; read by planning | {header / 1e6:.2f} MB in {len(ranges)} range requests "
                    f"({header / sum(f.stat().st_size for f in weights):.1e} of the weight bytes) |",
                ]
                if args.fault:
                    rows += faulted(server, args, tmpd / f"faulted{i}", weights, budget, hub_s, clean_bytes)
        print("\n".join(rows))


if __name__ == "__main__":
    main()
