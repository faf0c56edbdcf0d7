#!/usr/bin/env python
"""Run every contender of one benchmark scenario side by side and print a markdown table.

    /work/main/.venv/bin/python benchmarks/run.py 1b-window
    /work/main/.venv/bin/python benchmarks/run.py 160m-trajectory
    /work/main/.venv/bin/python benchmarks/run.py 12b-slice-window --only naive,mergekit-eager

Each contender runs as its own process under `/usr/bin/time -v`; wall time and "Maximum resident
set size" come from there. Before each contender the harness (untimed) runs `sync`, removes the
contender's old output, and for contenders that read the checkpoints re-warms the page cache with
`cat inputs > /dev/null`. Outputs go to DATA/out/<scenario>/<contender> and are deleted after their
size is recorded (--keep-outputs keeps them). Results are printed and written to
benchmarks/results/<scenario>.md. Contenders that are missing or fail get an "n/a (reason)" row.
Only the standard library is used here; each contender brings its own Python.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = Path(os.environ.get("BENCH_PYTHON", REPO / ".venv" / "bin" / "python"))
CKPTAVG = Path(os.environ.get("CKPTAVG", REPO / ".venv" / "bin" / "ckptavg"))
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/benchdata/mergekit-venv"))
TIME = "/usr/bin/time"

# name -> (preset, checkpoint steps on disk, first window end, last window end)
SCENARIOS = {
    "1b-window": ("pythia-1b", (1000, 5000), (5000, 5000)),
    "12b-slice-window": ("12b-slice", (1000, 5000), (5000, 5000)),
    "160m-trajectory": ("pythia-160m", (1000, 20000), (5000, 20000)),
}
K, INTERVAL = 5, 1000
ALL = ["cat", "write", "floor", "ckptavg", "naive", "mergekit-lazy", "mergekit-eager"]
LABELS = {
    "cat": "read inputs once (`cat > /dev/null`)",
    "write": "write outputs once (`dd` from /dev/zero)",
    "floor-whole": "arithmetic floor (a) whole-tensor torch",
    "floor-blocked": "arithmetic floor (b) cache-blocked 1M",
    "ckptavg": "**ckptavg**",
    "naive": "naive torch.load + fp32 sum + save_file",
    "mergekit-lazy": "mergekit linear `--lazy-unpickle`",
    "mergekit-eager": "mergekit linear (default loader)",
}


@dataclass
class Row:
    key: str
    wall: float | None = None
    rss_kb: int | None = None
    note: str = ""
    out_bytes: int | None = None
    cmd: str = ""
    extra: dict = field(default_factory=dict)


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=False)


def parse_time_v(text: str) -> tuple[float | None, int | None, int | None]:
    wall = rss = status = None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        wall = 0.0
        for p in parts:
            wall = wall * 60 + p
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        rss = int(m.group(1))
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        status = int(m.group(1))
    return wall, rss, status


def failure_reason(log: str, rc: int | None) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    err = [ln for ln in lines if re.search(r"(Error|Exception|error:|Killed|No such file)", ln)]
    msg = (err[-1] if err else (lines[-1] if lines else f"exit {rc}"))
    msg = msg.replace("|", "/")
    return (msg[:140] + "...") if len(msg) > 140 else msg


def dir_bytes(p: Path) -> int:
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and "_configs" not in f.parts)


def timed(argv: list[str], log_path: Path, env: dict | None = None) -> tuple[float | None, int | None, int, str]:
    tv = log_path.with_suffix(".time")
    with open(log_path, "w") as log:
        proc = subprocess.run([TIME, "-v", "-o", str(tv), *argv], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    wall, rss, status = parse_time_v(tv.read_text() if tv.exists() else "")
    rc = proc.returncode if status is None else status
    return wall, rss, rc, log_path.read_text(errors="replace")


def machine_info(data: Path) -> str:
    cpu = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal"):
                mem = f"{int(ln.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        torch_v = subprocess.run([str(PY), "-c", "import torch;print(torch.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
    except OSError:
        torch_v = "?"
    mk = subprocess.run([str(MERGEKIT_VENV / "bin" / "python"), "-c",
                         "import importlib.metadata as m;print(m.version('mergekit'))"],
                        capture_output=True, text=True).stdout.strip() if MERGEKIT_VENV.exists() else "not installed"
    fs = subprocess.run(["df", "-h", "--output=source,fstype,size", str(data)], capture_output=True,
                        text=True).stdout.strip().splitlines()[-1:]
    return (f"nproc {os.cpu_count()}, RAM {mem}, CPU {cpu}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch_v}, mergekit {mk}, data disk `{' '.join(fs)}`")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "/work/benchdata")))
    ap.add_argument("--only", help=f"comma list out of {','.join(ALL)}")
    ap.add_argument("--skip", default="", help="comma list of contenders to leave out")
    ap.add_argument("--no-make", action="store_true", help="do not (re)generate missing checkpoints")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    if not Path(TIME).exists():
        print(f"{TIME} missing: apt-get update && apt-get install -y time", file=sys.stderr)
        return 2
    preset, (s0, s1), (e0, e1) = SCENARIOS[args.scenario]
    root = args.data / preset
    steps = list(range(s0, s1 + 1, INTERVAL))
    windows = [[e - (K - 1 - i) * INTERVAL for i in range(K)] for e in range(e0, e1 + 1, INTERVAL)]
    used = sorted({s for w in windows for s in w})
    inputs = [root / f"step{s}" / "pytorch_model.bin" for s in used]
    out_root = args.data / "out" / args.scenario
    logs = args.data / "logs" / args.scenario
    logs.mkdir(parents=True, exist_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(ALL)
    chosen = [c for c in chosen if c not in set(args.skip.split(","))]
    for c in chosen:
        if c not in ALL:
            ap.error(f"unknown contender {c}")

    if not args.no_make:
        subprocess.run([str(PY), str(HERE / "make_checkpoints.py"), "--preset", preset, "--root", str(root),
                        "--steps", f"{s0}:{s1}:{INTERVAL}"], check=True)
    missing = [p for p in inputs if not p.exists()]
    if missing:
        print(f"missing inputs: {missing[:3]}...", file=sys.stderr)
        return 2
    in_bytes = sum(p.stat().st_size for p in inputs)
    one_ckpt = inputs[-1].stat().st_size
    print(f"# {args.scenario}: {len(windows)} window(s) of k={K}, {len(inputs)} inputs, "
          f"{in_bytes / 1e9:.2f} GB read once", flush=True)

    def warm() -> None:
        sh("cat " + " ".join(shlex.quote(str(p)) for p in inputs) + " > /dev/null")

    rows: list[Row] = []
    ends = f"{e0}:{e1}"
    for c in chosen:
        out = out_root / c
        if out.exists():
            shutil.rmtree(out)
        sh("sync")
        log = logs / f"{c}.log"
        env = None
        if c == "cat":
            warm()
            argv_ = ["bash", "-c", "cat " + " ".join(shlex.quote(str(p)) for p in inputs) + " > /dev/null"]
        elif c == "write":
            out.mkdir(parents=True)
            loop = "; ".join(
                f"dd if=/dev/zero of={shlex.quote(str(out / f'w{i}.bin'))} bs=16M count={one_ckpt} "
                f"iflag=count_bytes status=none" for i in range(len(windows)))
            argv_ = ["bash", "-c", loop]
        elif c == "floor":
            out.mkdir(parents=True)
            argv_ = [str(PY), str(HERE / "arithmetic_floor.py"), "--preset", preset, "--k", str(K),
                     "--windows", str(len(windows)), "--mode", "both", "--json", str(out / "floor.json")]
        elif c == "ckptavg":
            warm()
            argv_ = [str(CKPTAVG), "lawa", str(root), "--steps", ends, "--k", str(K), "--interval",
                     str(INTERVAL), "--out", str(out), "--overwrite"]
        elif c == "naive":
            warm()
            argv_ = [str(PY), str(HERE / "naive_average.py"), str(root), "--lawa-ends", ends, "--k", str(K),
                     "--interval", str(INTERVAL), "--out", str(out)]
        elif c.startswith("mergekit"):
            warm()
            argv_ = [sys.executable, str(HERE / "mergekit_merge.py"), str(root), "--lawa-ends", ends, "--k",
                     str(K), "--interval", str(INTERVAL), "--out", str(out),
                     "--mergekit", str(MERGEKIT_VENV / "bin" / "mergekit-yaml")]
            if c == "mergekit-eager":
                argv_.append("--no-lazy-unpickle")
        cmd_str = " ".join(shlex.quote(a) for a in argv_)
        if len(cmd_str) > 300:
            cmd_str = cmd_str[:300] + " ..."
        print(f"## {c}: {cmd_str}", flush=True)

        if c == "ckptavg" and not CKPTAVG.exists():
            rows.append(Row(c, note=f"n/a ({CKPTAVG} not found)", cmd=cmd_str))
            print(f"   n/a: {CKPTAVG} not found", flush=True)
            continue
        if c.startswith("mergekit") and not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
            rows.append(Row(c, note="n/a (mergekit venv missing; see README)", cmd=cmd_str))
            continue

        wall, rss, rc, text = timed(argv_, log, env)
        if rc != 0:
            r = Row(c, wall=None, rss_kb=rss, note=f"n/a (exit {rc} after {wall or 0:.1f}s: "
                    f"{failure_reason(text, rc)})", cmd=cmd_str)
            rows.append(r)
            print(f"   FAILED rc={rc}: {r.note}  (log: {log})", flush=True)
        elif c == "floor":
            res = json.loads((out / "floor.json").read_text())
            for mode in ("whole", "blocked"):
                rows.append(Row(f"floor-{mode}", wall=res[mode], rss_kb=rss, cmd=cmd_str,
                                note=f"timed arithmetic only; process wall {wall:.1f}s incl. making "
                                     f"{K} in-memory inputs; RSS = those inputs"))
            print(f"   whole {res['whole']:.2f}s blocked {res['blocked']:.2f}s, process {wall:.1f}s "
                  f"{rss / 2**20:.2f} GiB", flush=True)
        else:
            ob = dir_bytes(out) if c not in ("cat",) else None
            rows.append(Row(c, wall=wall, rss_kb=rss, out_bytes=ob, cmd=cmd_str))
            print(f"   {wall:.2f}s  {rss / 1e6:.2f} GB  out {((ob or 0) / 1e9):.2f} GB", flush=True)
        if not args.keep_outputs and out.exists():
            shutil.rmtree(out)

    ref = next((r for r in rows if r.key == "ckptavg" and r.wall is not None), None)
    hdr = ("| contender | wall s | peak RSS GB | wall ratio vs ckptavg | RSS ratio vs ckptavg | output GB | note |\n"
           "|---|---:|---:|---:|---:|---:|---|")
    lines = [hdr]
    for r in rows:
        wall = f"{r.wall:.2f}" if r.wall is not None else "n/a"
        rss = f"{r.rss_kb * 1024 / 1e9:.2f}" if r.rss_kb is not None else "n/a"
        if ref and r.wall is not None and r.key != "ckptavg":
            wr = f"{r.wall / ref.wall:.2f}x"
            rr = f"{r.rss_kb / ref.rss_kb:.2f}x" if r.rss_kb and ref.rss_kb else "–"
        elif ref and r.key == "ckptavg":
            wr = rr = "1.00x"
        else:
            wr = rr = "–"
        ob = f"{r.out_bytes / 1e9:.2f}" if r.out_bytes else ""
        lines.append(f"| {LABELS.get(r.key, r.key)} | {wall} | {rss} | {wr} | {rr} | {ob} | {r.note} |")
    table = "\n".join(lines)
    print()
    print(table)

    args.results.mkdir(parents=True, exist_ok=True)
    invocation = " ".join(shlex.quote(a) for a in [str(PY), "benchmarks/run.py", *(argv if argv is not None
                                                                                   else sys.argv[1:])])
    md = [f"# {args.scenario}", "",
          f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
          f"- machine: {machine_info(args.data)}",
          f"- command: `{invocation}` (from the repo root)",
          f"- scenario: preset `{preset}`, {len(windows)} window(s), k={K}, interval {INTERVAL}, window ends "
          f"{e0}..{e1}; {len(inputs)} input files, {in_bytes / 1e9:.2f} GB read once, "
          f"{one_ckpt / 1e9:.3f} GB per checkpoint",
          "- page cache warm (untimed `cat inputs > /dev/null` before each reading contender); `sync` before each",
          "- wall and peak RSS from `/usr/bin/time -v` (peak RSS = largest single process of the tree)",
          "", table, "", "Contender commands:", ""]
    md += [f"- {r.key}: `{r.cmd}`" for r in rows if r.cmd and not r.key.startswith("floor-blocked")]
    md.append("")
    path = args.results / f"{args.scenario}.md"
    path.write_text("\n".join(md))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
