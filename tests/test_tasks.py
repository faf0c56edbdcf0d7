"""Splitting a plan over tasks (SLURM arrays or by hand), and the commands around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg import api
from ckptavg.cli import cli, task_from_env
from ckptavg.steps import StepRange

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-run"


def test_shares_are_contiguous_and_cover_the_plan_once():
    plan = api.plan_lawa(str(EXAMPLE), StepRange(5000, 10000), k=5, out=Path("o"))
    for n in (1, 2, 4, 6):
        shares = [api.task_share(plan, t, n) for t in range(n)]
        assert [o for s in shares for o in s.outputs] == plan.outputs
        for s in shares:  # a task opens only the members its windows need
            assert set(s.members) == {m for w in s.windows for m in w.steps}
    with pytest.raises(Exception, match="outside 0..3"):
        api.task_share(plan, 4, 4)


def test_array_spec():
    assert api.array_spec([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert api.array_spec([5]) == "5" and api.array_spec([]) == ""


@pytest.mark.parametrize(
    ("env", "index", "count", "expected"),
    [
        ({}, None, None, (0, 1)),
        ({}, 2, 4, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, None, None, (2, 4)),
        # A resubmitted subset (--array=5,17) describes only itself: an explicit --num-tasks keeps the absolute id.
        ({"SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "2"}, None, 20, (17, 20)),
        ({"SLURM_ARRAY_TASK_ID": "3"}, 1, 4, (1, 4)),
    ],
)
def test_task_from_env(monkeypatch, env, index, count, expected):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert task_from_env(index, count) == expected


def test_task_options_do_one_share(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["lawa", str(EXAMPLE), "--steps", "5000:10000", "--k", "5", "--out", "o", "--num-tasks", "3"]
    first = CliRunner().invoke(cli, [*base, "--task-index", "1"])
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == ["o/step7000", "o/step8000"]
    assert sorted(p.name for p in Path("o").iterdir()) == ["step7000", "step8000"]
    bad = CliRunner().invoke(cli, [*base, "--task-index", "3"])
    assert bad.exit_code == 2 and "outside 0..2" in bad.stderr

    rows = [json.loads(r) for r in CliRunner().invoke(cli, ["status", "--json", *base]).stdout.splitlines()]
    assert [(r["state"], r["task"]) for r in rows] == [
        ("missing", 0),
        ("missing", 0),
        ("complete", 1),
        ("complete", 1),
        ("missing", 2),
        ("missing", 2),
    ]
    assert CliRunner().invoke(cli, ["status", "--array", *base]).stdout == "0,2\n"
    (Path("o") / ".step10000.ckptavg-tmp-0123456789abcdef").mkdir()  # what a killed task leaves
    rows = [json.loads(r) for r in CliRunner().invoke(cli, ["status", "--json", *base]).stdout.splitlines()]
    assert rows[-1]["state"] == "partial"


def test_plan_json_is_stable():
    args = ["plan", str(EXAMPLE), "--steps", "5000:10000", "--k", "5", "--json"]
    first, second = (CliRunner().invoke(cli, args).stdout for _ in range(2))
    assert first == second
    row = json.loads(first.splitlines()[0])
    assert set(row) == {"method", "step", "members", "weights", "out", "bytes_to_read"}


def test_slurm_script(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = ["lawa", str(EXAMPLE), "--steps", "5000:10000", "--k", "5", "--out", "o"]
    result = CliRunner().invoke(cli, ["slurm", "--num-tasks", "2", "--partition", "cpu", "--time", "1:00:00", *cmd])
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in (
        "#SBATCH --array=0-1",
        "#SBATCH --partition=cpu",
        "#SBATCH --time=1:00:00",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --job-name=ckptavg-lawa",
    ):
        assert line in script.splitlines()
    assert 'ckptavg lawa --threads 2 --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks 2 ' in script
    assert script.rstrip().endswith("--out o")
    assert not Path("o").exists()  # it plans; it runs nothing
    nested = CliRunner().invoke(cli, ["slurm", *cmd, "--num-tasks", "2"])
    assert nested.exit_code == 2 and "leave --task-index/--num-tasks out" in nested.stderr


def test_examples_makefile_builds_only_what_is_missing(tmp_path: Path):
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(EXAMPLE, tmp_path / "run")
    makefile = EXAMPLE.parent / "Makefile"
    env = {**os.environ, "CKPTAVG": f"{sys.executable} -m ckptavg"}
    make = ["make", "-f", str(makefile), f"RUN={tmp_path / 'run'}", f"OUT={tmp_path / 'out'}"]
    assert subprocess.run([*make, "-j2", "lawa"], env=env, capture_output=True).returncode == 0
    assert len(list((tmp_path / "out" / "lawa").glob("step*/model.safetensors"))) == 6
    assert subprocess.run([*make, "-q", "lawa"], env=env).returncode == 0  # up to date
    shutil.rmtree(tmp_path / "out" / "lawa" / "step7000")
    dry = subprocess.run([*make, "-n", "lawa"], env=env, capture_output=True, text=True).stdout
    assert dry.count("ckptavg lawa") == 1 and "--steps 7000:7000" in dry

    pytest.importorskip("matplotlib")
    make = [*make, "-C", str(EXAMPLE.parent)]  # eval reads examples/heldout.txt
    built = subprocess.run([*make, "-j2", "plot"], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (tmp_path / "out" / "curves.png").is_file()
    assert subprocess.run([*make, "-q", "plot"], env=env).returncode == 0
