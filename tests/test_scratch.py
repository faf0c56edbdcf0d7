"""Scratch folders of interpolate: removed on SIGTERM as on Ctrl-C; a killed run's removed by the next.

The kills are real: ``python -m ckptavg interpolate`` on tiny real models in a subprocess, signalled once
its scratch folder holds a point's model.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import write_pythia_run

from ckptavg.cli import INTERPOLATE_PREFIX, cli

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs far away"] * 40)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interp") / "run"
    write_pythia_run(root, [1000, 2000], legacy_buffers=False)
    (root.parent / "heldout.txt").write_text(TEXT)
    return root


def interpolate(run: Path, alphas: str, *extra: str) -> list[str]:
    base = ["--data", str(run.parent / "heldout.txt"), "--max-tokens", "256", "--seq-len", "32"]
    return [sys.executable, "-m", "ckptavg", "interpolate", str(run / "step1000"), str(run / "step2000")] + [
        "--alphas",
        alphas,
        *base,
        *extra,
    ]


def start(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def scratch_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(INTERPOLATE_PREFIX))


def wait_for_work(proc: subprocess.Popen[str], folder: Path) -> Path:
    """The scratch folder, once a point is being averaged or evaluated in it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for p in scratch_in(folder):
            try:
                if os.listdir(p):
                    return p
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no scratch folder with work in {folder}: {proc.communicate()[1][-2000:]}")


def test_sigterm_cleans_up_and_a_sigkilled_runs_folder_goes_with_the_next_run(run: Path, tmp_path: Path):
    """SIGTERM (a SLURM time limit) cleans up as Ctrl-C does; SIGKILL cannot, and the next run that uses
    the same folder removes what it left, but not the folder of a live run. The two killed runs go side by
    side: each is mostly its imports."""
    results = tmp_path / "res" / "interp.json"  # the scratch folder goes beside --results by default
    results.parent.mkdir()
    termed = start(interpolate(run, "0:1:0.01", "--results", str(results)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    killed = start(interpolate(run, "0:1:0.01", "--tmp-dir", str(scratch)))

    wait_for_work(termed, results.parent)
    termed.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    left = wait_for_work(killed, scratch)
    killed.send_signal(signal.SIGKILL)
    _, stderr = termed.communicate(timeout=30)
    assert time.monotonic() - sent < 15  # mostly the interpreter's own exit (torch, transformers)
    assert termed.returncode == 1
    assert stderr.splitlines()[-1] == "ckptavg: terminated by SIGTERM; temporary folders were removed"
    assert "Traceback" not in stderr
    assert os.listdir(results.parent) == []  # no scratch folder, and no results from an unfinished line
    killed.wait()
    assert scratch_in(scratch) == [left]  # SIGKILL cannot clean up

    live = scratch / f"{INTERPOLATE_PREFIX}live0000"  # another interpolate, still running: it holds its lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        again = CliRunner().invoke(cli, interpolate(run, "0:1:1", "--tmp-dir", str(scratch))[3:])
    finally:
        os.close(fd)
    assert again.exit_code == 0, again.output
    assert [ln.split("\t")[0] for ln in again.stdout.splitlines()] == ["0", "1"]
    assert f"removed {left}, left by an interpolate that was killed" in again.stderr
    assert scratch_in(scratch) == [live]


@pytest.mark.parametrize(
    ("option", "where", "message"),
    [
        (
            "--results",
            "missing/r.json",
            "--results {path}: folder {parent} does not exist; create it or choose another --results",
        ),
        (
            "--plot",
            "file.txt/p.png",
            "--plot {path}: folder {parent} does not exist; create it or choose another --plot",
        ),
        ("--results", ".", "--results {path}: not a file; choose another --results"),
    ],
)
def test_results_and_plot_paths_are_checked_before_any_point(
    run: Path, tmp_path: Path, option: str, where: str, message: str
):
    (tmp_path / "file.txt").write_text("")
    path = tmp_path / where
    args = interpolate(run, "0:1:0.5", option, str(path), "--tmp-dir", str(tmp_path))[3:]
    r = CliRunner().invoke(cli, args)
    if where == ".":  # click refuses a folder for a file option itself, as a usage error
        assert r.exit_code == 2 and option in r.stderr
        return
    assert r.exit_code == 1
    assert r.stderr == "Error: " + message.format(path=path, parent=path.parent) + "\n"
    assert scratch_in(tmp_path) == []
