"""Options are checked before any work: an out-of-range value is one line naming the option, exit 2 (a usage
error, caught by the option's type) or 1 (caught by the library against the run), and nothing under --out.

The pathological rows would take minutes or gigabytes if a check slipped behind the work it guards
(``--steps 0:10**12 --interval 1`` once listed a trillion window ends), so a regression shows as a
failure of the watchdog below (or a MemoryError), not as a slower green test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import error_line
from safetensors.torch import load_file

from ckptavg.cli import cli, task_from_env
from ckptavg.errors import InvalidArgumentError
from ckptavg.sizes import parse_size

STEPS = [1000, 2000, 3000, 4000, 5000]
BIG = str(10**12)
HUGE = str(10**30)
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """Each test gets 60 s (they take well under one): a check that runs after the work it guards fails here."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("over 60 s: an option was not checked before the work it guards")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def run(make_st_run, tmp_path: Path) -> Path:
    make_st_run(STEPS)
    return tmp_path / "run"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], f"left under {out}: {list(out.iterdir())}"


LAWA = ["lawa", "{run}", "--steps", "3000:5000", "--k", "2", "--out", "{out}"]
AVG = ["avg", "{run}/step1000", "{run}/step2000", "--out", "{out}"]

# (arguments, exit code, a fragment the one line holds). {run} and {out} are filled in per test.
CASES = [
    # --steps: checked against the steps that exist before any window is listed
    (["lawa", "{run}", "--steps", f"0:{BIG}", "--interval", "1", "--k", "1", "--out", "{out}"], 1,
     f"--steps 0:{BIG}: {{run}} has steps 1000..5000 (5 checkpoints), but the last window would end at step {BIG}"),
    (["lawa", "{run}", "--steps", "2000:50000000", "--k", "1", "--out", "{out}"], 1,
     "end --steps at or before step 5000"),
    (["lawa", "{run}", "--steps", "1000:5000", "--interval", "1", "--k", "1", "--out", "{out}"], 1,
     "window ends every 1 steps would make 4001 outputs; give a larger --interval"),
    (["ema", "{run}", "--steps", f"1000:{BIG}", "--interval", "1", "--out", "{out}"], 1, f"--steps 1000:{BIG}: "),
    (["swa", "{run}", "--steps", f"1000:{BIG}", "--every", "1", "--out", "{out}"], 1, f"--steps 1000:{BIG}: "),
    (["plan", "{run}", "--steps", f"0:{BIG}", "--interval", "1", "--k", "1"], 1, f"--steps 0:{BIG}: "),
    (["status", "lawa", "{run}", "--steps", f"0:{BIG}", "--interval", "1", "--k", "1", "--out", "{out}"], 1,
     f"--steps 0:{BIG}: "),
    (["lawa", "{run}", "--steps", f"0:{HUGE}", "--k", "1", "--out", "{out}"], 2, "more than 18 digits"),
    # members: a window, sequence or SWA grid with more members than the run has checkpoints
    (["lawa", "{run}", "--steps", "5000:5000", "--k", BIG, "--k-stepsize", "1", "--out", "{out}"], 1,
     f"k={BIG} checkpoints nu=1 steps apart"),
    (["ema", "{run}", "--steps", "1000:5000", "--every", "1", "--out", "{out}"], 1,
     "--every 1 over --steps 1000:5000 makes an EMA sequence of 4001 steps"),
    (["ema", "{run}", "--steps", "1000:5000", "--every", "3000", "--out", "{out}"], 1,
     "are not on the EMA sequence 1000, 4000, ..."),
    (["swa", "{run}", "--steps", "5000:5000", "--start", "0", "--every", "1", "--out", "{out}"], 1,
     "--start 0 --every 1 up to step 5000 averages 5001 checkpoints"),
    # strides and first steps: 0 would silently become the default, so the option's type refuses it
    ([*LAWA, "--interval", "0"], 2, "'--interval': 0 is not in the range x>=1"),
    ([*LAWA, "--interval", "-1000"], 2, "'--interval': -1000 is not in the range x>=1"),
    ([*LAWA, "--k-stepsize", "0"], 2, "'--k-stepsize' / '--nu': 0 is not in the range x>=1"),
    (["ema", "{run}", "--steps", "1000:3000", "--every", "0", "--out", "{out}"], 2, "'--every': 0 is not"),
    (["ema", "{run}", "--steps", "1000:3000", "--interval", "0", "--out", "{out}"], 2, "'--interval': 0 is not"),
    (["swa", "{run}", "--steps", "3000:5000", "--every", "-1", "--out", "{out}"], 2, "'--every': -1 is not"),
    (["swa", "{run}", "--steps", "3000:5000", "--start", "-1", "--out", "{out}"], 2, "'--start': -1 is not"),
    (["swa", "{run}", "--steps", "3000:5000", "--interval", "0", "--out", "{out}"], 2, "'--interval': 0 is not"),
    (["plan", "{run}", "--steps", "3000:5000", "--interval", "0"], 2, "'--interval': 0 is not"),
    (["plan", "{run}", "--steps", "3000:5000", "--method", "swa", "--start", "-5"], 2, "'--start': -5 is not"),
    (["plan", "{run}", "--steps", "3000:5000", "--method", "ema", "--every", "0"], 2, "'--every': 0 is not"),
    (["status", "lawa", "{run}", "--steps", "3000:5000", "--interval", "0", "--out", "{out}"], 2, "'--interval'"),
    # k and decay: usage errors, like every other option out of range
    ([*LAWA[:-2], "--k", "0", "--out", "{out}"], 2, "'--k': 0 is not in the range x>=1"),
    (["ema", "{run}", "--steps", "1000:3000", "--decay", "nan", "--out", "{out}"], 2, "'--decay': nan is not a finite"),
    (["ema", "{run}", "--steps", "1000:3000", "--decay", "inf", "--out", "{out}"], 2, "'--decay': inf is not in the"),
    (["plan", "{run}", "--steps", "3000:5000", "--method", "ema", "--decay", "-inf"], 2, "'--decay': -inf is not"),
    # sizes
    ([*LAWA, "--max-shard-size", "0"], 2, "'--max-shard-size': '0' is 0 bytes; give at least 1 byte"),
    ([*LAWA, "--max-shard-size", "-1GB"], 2, "'--max-shard-size': '-1GB' is negative"),
    ([*LAWA, "--max-shard-size", "5XB"], 2, "'--max-shard-size': '5XB' is not a size; write e.g. 5GB"),
    ([*LAWA, "--max-shard-size", "1e400GB"], 2, "'1e400GB' is not a size"),
    ([*LAWA, "--max-shard-size", "9999999TB"], 2, "'9999999TB' is too large: at most 9223372036854775807 bytes"),
    ([*LAWA, "--max-shard-size", "0.4B"], 2, "'0.4B' is 0 bytes"),
    ([*LAWA, "--disk-budget", "0"], 2, "'--disk-budget': '0' is 0 bytes"),
    ([*LAWA, "--disk-budget", "nan"], 2, "'--disk-budget': 'nan' is not a size"),
    # the Hub's retry time, the hidden chunk size, tasks
    ([*LAWA, "--retry-time", "nan"], 2, "'--retry-time': nan is not a finite number"),
    ([*LAWA, "--retry-time", "inf"], 2, "'--retry-time': inf is not in the range 0<=x<=604800"),
    ([*LAWA, "--retry-time", "1e30"], 2, "'--retry-time'"),
    ([*LAWA, "--retry-time", "-1"], 2, "'--retry-time'"),
    (["ls", "{run}", "--retry-time", "nan"], 2, "'--retry-time': nan is not a finite number"),
    ([*LAWA, "--chunk", HUGE], 2, "'--chunk'"),
    ([*LAWA, "--task-index", "-1"], 2, "'--task-index'"),
    ([*LAWA, "--task-index", HUGE], 2, "'--task-index'"),
    ([*LAWA, "--num-tasks", "0"], 2, "'--num-tasks'"),
    ([*LAWA, "--num-tasks", HUGE], 2, "'--num-tasks': 1000000000000000000000000000000 is not in the range"),
    ([*LAWA, "--num-tasks", "2", "--task-index", "2"], 2, "--task-index 2 is outside 0..1 (--num-tasks 2)"),
    (["slurm", "--num-tasks", HUGE, *LAWA], 2, "'--num-tasks'"),
    # weights
    ([*AVG, "--weights", "nan,1"], 2, "--weights must be finite numbers, got nan in nan, 1"),
    ([*AVG, "--weights", "1,inf"], 2, "--weights must be finite numbers, got inf in 1, inf"),
    ([*AVG, "--weights", "1,1e400"], 2, "--weights must be finite numbers"),
    ([*AVG, "--weights", "-1,2"], 2, "--weights must not be negative, got -1, 2"),
    ([*AVG, "--weights", "0,0"], 2, "--weights are all zero (0, 0); give at least one positive weight"),
    ([*AVG, "--weights", "1,x"], 2, "'--weights': '1,x' is not a comma-separated list of numbers"),
    ([*AVG, "--weights", "1,2,3"], 1, "--weights: got 3 weights for 2 checkpoints"),
    # interpolate's alphas
    (["interpolate", "{run}/step1000", "{run}/step2000", "--data", "{run}/step1000/config.json",
      "--alphas", "0:1:1e-300"], 2, "'0:1:1e-300' makes 1e+300 points; at most 10001"),
    (["interpolate", "{run}/step1000", "{run}/step2000", "--data", "{run}/step1000/config.json",
      "--alphas", "0:2:0.5"], 2, "every point must lie in 0..1"),
    (["interpolate", "{run}/step1000", "{run}/step2000", "--data", "{run}/step1000/config.json",
      "--alphas", "nan"], 2, "every number must be finite"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "fragment"), CASES, ids=[" ".join(a for a in c[0] if "{" not in a) for c in CASES]
)
def test_out_of_range_option_is_one_line(run: Path, tmp_path: Path, args: list[str], code: int, fragment: str):
    out = tmp_path / "out"
    fill = {"run": str(run), "out": str(out)}
    msg = error_line(invoke(*(a.format(**fill) for a in args)), code)
    assert fragment.format(**fill) in msg, msg
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SLURM_ARRAY_TASK_ID": "abc"}, "SLURM_ARRAY_TASK_ID='abc' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "-1"}, "SLURM_ARRAY_TASK_ID='-1' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": ""}, "SLURM_ARRAY_TASK_ID='' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": "+1"}, "SLURM_ARRAY_TASK_ID='+1' is not a whole number"),
        ({"SLURM_ARRAY_TASK_ID": HUGE}, f"SLURM_ARRAY_TASK_ID='{HUGE}' is past the largest SLURM job array"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1.0"}, "SLURM_ARRAY_TASK_MIN='1.0' is not"),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "two"}, "SLURM_ARRAY_TASK_COUNT='two' is not"),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"}, "SLURM_ARRAY_TASK_COUNT='0' is below 1"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "5"}, "SLURM_ARRAY_TASK_ID=3 is outside 5..5"),
        (
            {"SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "2"},
            "SLURM_ARRAY_TASK_ID=17 is outside 5..6, the array that SLURM_ARRAY_TASK_MIN=5 and "
            "SLURM_ARRAY_TASK_COUNT=2 describe; for an array with gaps (--array=5,17) give --num-tasks N",
        ),
    ],
)
def test_bad_slurm_variable_is_one_line(run: Path, tmp_path: Path, monkeypatch, env: dict[str, str], fragment: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    msg = error_line(invoke("lawa", run, "--steps", "3000:5000", "--k", "2", "--out", out), 1)
    assert fragment in msg, msg
    assert_nothing_written(out)


def test_slurm_id_past_explicit_num_tasks_names_the_variable(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    with pytest.raises(InvalidArgumentError, match=r"^SLURM_ARRAY_TASK_ID=5 is outside 0..2 \(--num-tasks 3\)$"):
        task_from_env(None, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "x")
    with pytest.raises(InvalidArgumentError, match="SLURM_ARRAY_TASK_ID='x'"):
        task_from_env(None, 3)
    assert task_from_env(1, 3) == (1, 3)  # explicit options never read the variable


def test_huge_equal_weights_average_to_the_mean(run: Path, tmp_path: Path):
    """1e308+1e308 overflows: summed first, the weights were 1e308/inf = 0, and the output all zeros."""
    out = tmp_path / "soup"
    planned = invoke("avg", run / "step1000", run / "step2000", "--weights", "1e308,1e308", "--out", out, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "weights=0.5,0.5" in planned.stdout
    made = invoke("avg", run / "step1000", run / "step2000", "--weights", "1e308,1e308", "--out", out)
    assert made.exit_code == 0, made.output
    got = load_file(out / "model.safetensors")
    a, b = load_file(run / "step1000" / "model.safetensors"), load_file(run / "step2000" / "model.safetensors")
    for name, t in got.items():
        want = ((a[name].double() + b[name].double()) / 2).to(t.dtype)
        torch.testing.assert_close(t, want, rtol=0, atol=1e-3)
    assert json.loads((out / "ckptavg.json").read_text())["params"]["weights"] == [0.5, 0.5]


def test_help_shows_size_and_sizes_parse():
    helped = invoke("lawa", "--help")
    assert "--max-shard-size SIZE" in helped.stdout and "--disk-budget SIZE" in helped.stdout
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.1GB") == 1_100_000_000 and parse_size("2GiB") == 2 << 30
    assert parse_size(" 500 mb ") == 500 * 10**6 and parse_size("123") == 123 and parse_size(".5KB") == 500
    assert parse_size(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(ValueError, match=r"^'9{40}\.\.\.' is too large"):
        parse_size("9" * 5000)  # quoted short, and past int() string limits without a traceback


def test_valid_options_still_work(run: Path, tmp_path: Path):
    out = tmp_path / "out"
    ok = invoke(*[a.format(run=run, out=out) for a in LAWA], "--max-shard-size", "1.5kB", "--retry-time", "0")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.split() == [str(out / f"step{s}") for s in (3000, 4000, 5000)]
    assert len(list((out / "step3000").glob("model-*.safetensors"))) > 1  # sharded at 1500 bytes


def test_real_process_fails_fast_with_one_line(run: Path, tmp_path: Path):
    """The console entry point, not CliRunner: exit code and stderr as a shell sees them."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ckptavg", "lawa", str(run), "--steps", f"0:{BIG}", "--interval", "1"]
    done = subprocess.run([*cmd, "--k", "1", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"Error: --steps 0:{BIG}: "), done.stderr
    assert done.stdout == ""
    assert_nothing_written(out)
