#!/usr/bin/env python
"""Run every contender of one benchmark scenario side by side and print a markdown table.

    .venv/bin/python benchmarks/run.py 1b-window
    .venv/bin/python benchmarks/run.py 160m-trajectory
    .venv/bin/python benchmarks/run.py 12b-slice-window --only naive,mergekit-eager

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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = Path(os.environ.get("BENCH_PYTHON", REPO / ".venv" / "bin" / "python"))
CKPTAVG = Path(os.environ.get("CKPTAVG", REPO / ".venv" / "bin" / "ckptavg"))
DATA = Path(os.environ.get("BENCH_DATA", REPO / "benchdata"))  # tens of GB; git ignores benchdata/
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", DATA / "mergekit-venv"))
TIME = "/usr/bin/time"

# name -> (preset, checkpoint steps on disk, first window end, last window end)
SCENARIOS = {
    "1b-window": ("pythia-1b", (1000, 5000), (5000, 5000)),
    "12b-slice-window": ("12b-slice", (1000, 5000), (5000, 5000)),
    "160m-trajectory": ("pythia-160m", (1000, 20000), (5000, 20000)),
}
K, INTERVAL = 5, 1000
# Run order: the floor first, while memory is free of this scenario's page cache (it holds k copies
# of the model in RAM); the table is printed in DISPLAY order.
ALL = ["floor", "cat", "write", "write-fsync", "ckptavg", "naive", "mergekit-lazy", "mergekit-eager"]
DISPLAY = [
    "cat",
    "write",
    "write-fsync",
    "floor-whole",
    "floor-blocked",
    "ckptavg",
    "naive",
    "mergekit-lazy",
    "mergekit-eager",
]
LABELS = {
    "cat": "read inputs once (`cat > /dev/null`)",
    "write": "write outputs once (`dd` from /dev/zero)",
    "write-fsync": "write outputs once, durable (`dd conv=fsync`)",
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
    cached: float | None = None
    others: float | None = None
    steal: float | None = None
    out_bytes: int | None = None
    cmd: str = ""
    extra: dict = field(default_factory=dict)


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=False)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal


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
    msg = err[-1] if err else (lines[-1] if lines else f"exit {rc}")
    msg = msg.replace("|", "/")
    return (msg[:140] + "...") if len(msg) > 140 else msg


def dir_bytes(p: Path) -> int:
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and "_configs" not in f.parts)


def timed(argv: list[str], log_path: Path) -> tuple[float | None, int | None, float, int, str]:
    """Run under /usr/bin/time -v: (wall s, peak RSS kB, user+sys s, exit status, log text)."""
    tv = log_path.with_suffix(".time")
    with open(log_path, "w") as log:
        proc = subprocess.run([TIME, "-v", "-o", str(tv), *argv], stdout=log, stderr=subprocess.STDOUT)
    report = tv.read_text() if tv.exists() else ""
    wall, rss, status = parse_time_v(report)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", report))
    rc = proc.returncode if status is None else status
    return wall, rss, cpu, rc, log_path.read_text(errors="replace")


def evict(paths: list[Path]) -> None:
    """Drop these files (ours only) from the page cache, so another scenario's data does not sit on
    the kernel's active list and keep this scenario's inputs from staying cached."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: list[Path]) -> float | None:
    """Share of the inputs' bytes in the page cache right now (util-linux fincore)."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, paths)], capture_output=True, text=True
    )
    res = size = 0
    for ln in r.stdout.splitlines():
        a, b = ln.split()[:2]
        res, size = res + int(a), size + int(b)
    return res / size if size else None


def ckptavg_version() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    head = r.stdout.strip() or "no commit yet"
    d = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True
    ).stdout.strip()
    return head + (" + uncommitted changes in src/" if d else "")


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
        torch_v = subprocess.run(
            [str(PY), "-c", "import torch;print(torch.__version__)"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        torch_v = "?"
    mk = (
        subprocess.run(
            [
                str(MERGEKIT_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m;print(m.version('mergekit'))",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if MERGEKIT_VENV.exists()
        else "not installed"
    )
    fs = (
        subprocess.run(["df", "-h", "--output=source,fstype,size", str(data)], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1:]
    )
    return (
        f"nproc {os.cpu_count()}, RAM {mem}, CPU {cpu}, kernel {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch_v}, mergekit {mk}, data disk `{' '.join(fs)}`"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", help=f"comma list out of {','.join(ALL)}")
    ap.add_argument("--skip", default="", help="comma list of contenders to leave out")
    ap.add_argument("--no-make", action="store_true", help="do not (re)generate missing checkpoints")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is reported")
    ap.add_argument("--floor-passes", type=int, default=3, help="minimum timed window passes of the floor")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    if not Path(TIME).exists():
        print(f"{TIME} missing: apt-get update && apt-get install -y time", file=sys.stderr)
        return 2
    preset, (s0, s1), (e0, e1) = SCENARIOS[args.scenario]
    root = args.data / preset
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
        subprocess.run(
            [
                str(PY),
                str(HERE / "make_checkpoints.py"),
                "--preset",
                preset,
                "--root",
                str(root),
                "--steps",
                f"{s0}:{s1}:{INTERVAL}",
            ],
            check=True,
        )
    missing = [p for p in inputs if not p.exists()]
    if missing:
        print(f"missing inputs: {missing[:3]}...", file=sys.stderr)
        return 2
    in_bytes = sum(p.stat().st_size for p in inputs)
    one_ckpt = inputs[-1].stat().st_size
    print(
        f"# {args.scenario}: {len(windows)} window(s) of k={K}, {len(inputs)} inputs, "
        f"{in_bytes / 1e9:.2f} GB read once",
        flush=True,
    )

    def warm() -> None:
        # Twice: the second read moves the pages to the kernel's active list.
        for _ in range(2):
            sh("cat " + " ".join(shlex.quote(str(p)) for p in inputs) + " > /dev/null")

    in_set = set(inputs)
    others = [
        p
        for d in args.data.iterdir()
        if d.is_dir() and "venv" not in d.name
        for p in d.rglob("*")
        if p.suffix in (".bin", ".safetensors") and p not in in_set and p.is_file()
    ]
    evict(others)

    load_at_start = " ".join(open("/proc/loadavg").read().split()[:3])
    ends = f"{e0}:{e1}"
    lawa = ["--lawa-ends", ends, "--k", str(K), "--interval", str(INTERVAL)]
    mergekit_bin = MERGEKIT_VENV / "bin" / "mergekit-yaml"

    def command(c: str, out: Path) -> tuple[list[str], bool]:
        """(argv, whether the page cache must be warmed first)"""
        if c == "cat":
            return ["bash", "-c", "cat " + " ".join(shlex.quote(str(p)) for p in inputs) + " > /dev/null"], True
        if c in ("write", "write-fsync"):  # ckptavg fsyncs its outputs (a crash loses nothing): both floors
            durable = " conv=fsync" if c == "write-fsync" else ""
            loop = "; ".join(
                f"dd if=/dev/zero of={shlex.quote(str(out / f'w{i}.bin'))} bs=16M count={one_ckpt} "
                f"iflag=count_bytes status=none{durable}"
                for i in range(len(windows))
            )
            return ["bash", "-c", f"mkdir -p {shlex.quote(str(out))}; {loop}"], False
        if c == "floor":
            floor = [str(PY), str(HERE / "arithmetic_floor.py"), "--preset", preset, "--k", str(K)]
            floor += ["--windows", str(len(windows)), "--passes", str(args.floor_passes), "--mode", "both"]
            return floor + ["--json", str(out / "floor.json")], False
        if c == "ckptavg":
            cmd = [str(CKPTAVG), "lawa", str(root), "--steps", ends, "--k", str(K), "--interval", str(INTERVAL)]
            return cmd + ["--out", str(out), "--overwrite"], True
        if c == "naive":
            return [str(PY), str(HERE / "naive_average.py"), str(root), *lawa, "--out", str(out)], True
        assert c.startswith("mergekit")
        cmd = [sys.executable, str(HERE / "mergekit_merge.py"), str(root), *lawa, "--out", str(out)]
        cmd += ["--mergekit", str(mergekit_bin)]
        return cmd + (["--no-lazy-unpickle"] if c == "mergekit-eager" else []), True

    rows: list[Row] = []
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    for c in chosen:
        out = out_root / c
        argv_, needs_warm = command(c, out)
        cmd_str = " ".join(shlex.quote(a) for a in argv_)
        if len(cmd_str) > 400:
            cmd_str = cmd_str[:400] + " ..."
        print(f"## {c}: {cmd_str}", flush=True)
        if c == "ckptavg" and not CKPTAVG.exists():
            rows.append(Row(c, note=f"n/a ({CKPTAVG} not found)", cmd=cmd_str))
            print(f"   n/a: {CKPTAVG} not found", flush=True)
            continue
        if c.startswith("mergekit") and not mergekit_bin.exists():
            rows.append(Row(c, note=f"n/a ({mergekit_bin} missing; see README)", cmd=cmd_str))
            continue
        repeats = 1 if c == "floor" else args.repeat
        best: Row | None = None
        walls = []
        for rep in range(repeats):
            if out.exists():
                shutil.rmtree(out)
            if c == "floor":
                out.mkdir(parents=True)
            sh("sync")
            if needs_warm:
                warm()
            frac = cached_fraction(inputs) if needs_warm else None
            log = logs / (f"{c}.log" if repeats == 1 else f"{c}.{rep}.log")
            b0, st0 = cpu_jiffies()
            wall, rss, cpu_s, rc, text = timed(argv_, log)
            b1, st1 = cpu_jiffies()
            span = max(wall or 0.0, 1e-3) * ncpu
            others = max(0.0, ((b1 - b0) / hz - cpu_s) / span)
            steal = (st1 - st0) / hz / span
            if rc != 0:
                why = failure_reason(text, rc)
                best = Row(
                    c, rss_kb=rss, cached=frac, cmd=cmd_str, note=f"n/a (exit {rc} after {wall or 0:.1f}s: {why})"
                )
                print(f"   FAILED rc={rc}: {best.note}  (log: {log})", flush=True)
                break
            r = Row(c, wall=wall, rss_kb=rss, cached=frac, cmd=cmd_str, others=others, steal=steal)
            if c == "floor":
                r.extra = json.loads((out / "floor.json").read_text())
            elif c != "cat":
                r.out_bytes = dir_bytes(out)
            walls.append(wall)
            cached = f"inputs cached {100 * frac:.0f}%, " if frac is not None else ""
            print(
                f"   run {rep + 1}/{repeats}: {wall:.2f}s  {rss * 1024 / 1e9:.2f} GB  ({cached}"
                f"others' CPU {100 * others:.0f}%, steal {100 * steal:.0f}%)",
                flush=True,
            )
            if best is None or wall < (best.wall or 1e30):
                best = r
        if not args.keep_outputs and out.exists():
            shutil.rmtree(out)
        assert best is not None
        if len(walls) > 1:
            best.note = f"best of {len(walls)}: " + ", ".join(f"{w:.1f}" for w in walls) + " s"
        if c == "floor" and best.wall is not None:
            res, proc_wall = best.extra, best.wall
            for mode in ("whole", "blocked"):
                m = res[mode]
                rows.append(
                    Row(
                        f"floor-{mode}",
                        wall=m["estimate"],
                        rss_kb=best.rss_kb,
                        cmd=cmd_str,
                        others=best.others,
                        steal=best.steal,
                        note=f"timed arithmetic only: {len(windows)} x fastest of {m['passes']} window passes "
                        f"({m['min']:.2f}-{m['max']:.2f} s each); process {proc_wall:.0f}s incl. setup; "
                        f"RSS = {K} in-memory copies",
                    )
                )
        else:
            rows.append(best)

    rows.sort(key=lambda r: DISPLAY.index(r.key) if r.key in DISPLAY else len(DISPLAY))
    ref = next((r for r in rows if r.key == "ckptavg" and r.wall is not None), None)
    hdr = (
        "| contender | wall s | peak RSS GB | wall ratio vs ckptavg | RSS ratio vs ckptavg | output GB "
        "| inputs cached | others' CPU | note |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
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
        cf = f"{100 * r.cached:.0f}%" if r.cached is not None else ""
        oc = f"{100 * r.others:.0f}%" if r.others is not None else ""
        note = r.note + (f"; steal {100 * r.steal:.0f}%" if r.steal and r.steal > 0.05 else "")
        lines.append(f"| {LABELS.get(r.key, r.key)} | {wall} | {rss} | {wr} | {rr} | {ob} | {cf} | {oc} | {note} |")
    walls = {r.key: r.wall for r in rows if r.wall is not None}
    for write in ("write", "write-fsync"):  # the target: ckptavg / (read + write + cache-blocked arithmetic)
        parts = [walls.get(k) for k in ("cat", write, "floor-blocked")]
        if ref and ref.wall is not None and all(w is not None for w in parts):
            floors = sum(w for w in parts if w is not None)
            what = "durable write" if write == "write-fsync" else "write"
            lines.append(
                f"| sum of floors: read + {what} + cache-blocked arithmetic | {floors:.2f} | | "
                f"{floors / ref.wall:.2f}x | | | | | ckptavg / sum = {ref.wall / floors:.2f} |"
            )
    table = "\n".join(lines)
    print()
    print(table)

    args.results.mkdir(parents=True, exist_ok=True)
    invocation = " ".join(
        shlex.quote(a) for a in [str(PY), "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    md = [
        f"# {args.scenario}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine_info(args.data)}",
        f"- ckptavg: `{CKPTAVG}` from the working tree at {ckptavg_version()}",
        f"- load average at start: {load_at_start}",
        f"- command: `{invocation}` (from the repo root)",
        f"- scenario: preset `{preset}`, {len(windows)} window(s), k={K}, interval {INTERVAL}, window ends "
        f"{e0}..{e1}; {len(inputs)} input files, {in_bytes / 1e9:.2f} GB read once, "
        f"{one_ckpt / 1e9:.3f} GB per checkpoint",
        "- page cache: other benchmark files evicted (fadvise DONTNEED) at start; untimed `cat inputs > /dev/null`"
        " twice before each reading contender; `sync` before each",
        "- wall and peak RSS from `/usr/bin/time -v` (peak RSS = largest single process of the tree);"
        f" --repeat {args.repeat}: fastest run shown",
        "- 'inputs cached': fincore's share of input bytes in the page cache just before the timed command;"
        " 'others' CPU': share of the machine's CPU time during the run used by other processes"
        " (/proc/stat busy minus the contender's user+sys); high values mean the number is inflated",
        "",
        table,
        "",
        "Contender commands:",
        "",
    ]
    md += [f"- {r.key}: `{r.cmd}`" for r in rows if r.cmd and not r.key.startswith("floor-blocked")]
    md.append("")
    path = args.results / f"{args.scenario}.md"
    path.write_text("\n".join(md))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
