"""Review of issue 12's changes (multi-worker Reads, --threads, the reducer choice, 64 MiB durable points):
what an attempt to break them found (each once a failing test, now fixed) and covered beside test_threads.py."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import weight_bytes
from safetensors.torch import save_file

from ckptavg.cli import cli


def signed_zero_run(root: Path, steps: list[int], n: int = 64) -> None:
    """fp16 checkpoints whose tensor 'w' is -0 at every even element in every checkpoint (a weight that
    stayed at -0 through training: e.g. a masked or decayed-to-zero entry) and random elsewhere."""
    for s in steps:
        g = torch.Generator().manual_seed(s)
        w = torch.randn(n, generator=g, dtype=torch.float64).to(torch.float16)
        w[::2] = -0.0
        (root / f"step{s}").mkdir(parents=True)
        save_file({"w": w}, root / f"step{s}" / "model.safetensors", metadata={"format": "pt"})
        (root / f"step{s}" / "config.json").write_text(json.dumps({"model_type": "toy"}) + "\n")


def lawa(tmp_path: Path, out: Path, *extra: str) -> None:
    args = ["lawa", str(tmp_path / "run"), "--steps", "4000:8000", "--k", "4", "--out", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)


def test_the_sign_of_a_zero_mean_does_not_depend_on_the_task_share(tmp_path: Path):
    """LAWA k=4 over fp16 takes running sums (8 members + 5 windows < 20 additions). A window's mean where
    every member is -0 comes out -0 when its running sum starts afresh (snapshot None: the sum is the first
    member, -0) and +0 when it is a difference of running sums (-0 - -0 = +0). Which of the two a window
    gets depends on which windows share the run: in the whole run window step6000 starts while step4000
    and step5000 are open (+0), in task 1 of 2 it is the first window (-0). Now a fresh sum's zero is made +0
    too, so "every output's bits are a function of its window and the plan alone" holds."""
    signed_zero_run(tmp_path / "run", list(range(1000, 8001, 1000)))
    lawa(tmp_path, tmp_path / "whole")
    lawa(tmp_path, tmp_path / "t0", "--task-index", "0", "--num-tasks", "2")
    lawa(tmp_path, tmp_path / "t1", "--task-index", "1", "--num-tasks", "2")
    whole = weight_bytes(tmp_path / "whole")
    split = {**weight_bytes(tmp_path / "t0"), **weight_bytes(tmp_path / "t1")}
    assert sorted(whole) == sorted(split) and len(whole) == 5
    differ = sorted(k for k in whole if whole[k] != split[k])
    assert differ == [], f"outputs whose bytes depend on the task share: {differ}"


def test_the_sign_of_a_zero_mean_does_not_depend_on_which_outputs_a_rerun_still_makes(tmp_path: Path):
    """The same cut, by a rerun: finished outputs are skipped ("the same command resumes"), so a run killed
    after committing step4000 and step5000 (or an array resubmitted for the tasks `status` lists) makes
    step6000 as the first window of its run: it wrote -0 where the uninterrupted run wrote +0."""
    signed_zero_run(tmp_path / "run", list(range(1000, 8001, 1000)))
    lawa(tmp_path, tmp_path / "whole")
    lawa(tmp_path, tmp_path / "again")
    for step in (6000, 7000, 8000):
        shutil.rmtree(tmp_path / "again" / f"step{step}")
    lawa(tmp_path, tmp_path / "again")
    whole, again = weight_bytes(tmp_path / "whole"), weight_bytes(tmp_path / "again")
    assert sorted(whole) == sorted(again)
    differ = sorted(k for k in whole if whole[k] != again[k])
    assert differ == [], f"outputs whose bytes depend on what the rerun had left to do: {differ}"


# ---------------------------------------------------------------- slurm's --threads


def script_command(script: str, task: int) -> list[str]:
    """The ckptavg arguments the script's exec line runs for ``task``, as bash would split them."""
    (line,) = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    words = [w.replace("$SLURM_ARRAY_TASK_ID", str(task)) for w in shlex.split(line)]
    return words[words.index("ckptavg") + 1 :]


def test_slurm_puts_its_options_before_a_double_dash_where_they_would_be_checkpoint_paths(
    make_st_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`ckptavg avg --out o -- A B` is how a checkpoint path that starts with '-' is given. slurm appends
    `--threads 2` (and, as before, `--task-index/--num-tasks`) after the command's last word, i.e. after the
    `--`, where `avg` reads them as checkpoints: every array task fails with "--threads: no such file or
    folder". The command itself runs."""
    make_st_run([1000, 2000], torch.float16)
    monkeypatch.chdir(tmp_path)
    command = ["avg", "--out", "o", "--", "run/step1000", "run/step2000"]
    direct = CliRunner().invoke(cli, [*command[:2], "direct", *command[3:]])
    assert direct.exit_code == 0, direct.output
    made = CliRunner().invoke(cli, ["slurm", *command])
    assert made.exit_code == 0, made.output
    args = script_command(made.stdout, 0)
    assert args == [command[0], "--threads", "2", "--task-index", "0", "--num-tasks", "1", *command[1:]]
    task = CliRunner().invoke(cli, args)
    assert task.exit_code == 0, f"the array task {args} fails: {task.output}"
    assert weight_bytes(tmp_path / "o") == weight_bytes(tmp_path / "direct")


@pytest.mark.parametrize("spelled", [["--threads=3"], ["--threads", "3"]])
def test_slurm_leaves_a_command_that_names_threads_with_an_equals_sign_alone(
    make_st_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelled: list[str]
):
    make_st_run([1000, 2000], torch.float16)
    monkeypatch.chdir(tmp_path)
    command = ["lawa", "run", "--steps", "2000:2000", "--k", "2", "--out", "o", *spelled]
    made = CliRunner().invoke(cli, ["slurm", "--cpus", "6", *command])
    assert made.exit_code == 0, made.output
    args = script_command(made.stdout, 0)
    assert args == [command[0], "--task-index", "0", "--num-tasks", "1", *command[1:]]


# ---------------------------------------------------------------- --threads


def test_the_most_threads_allowed_run_a_tiny_plan_with_buffers_its_size(make_st_run, tmp_path: Path):
    """--threads 4096 (the most; 10**9 is a usage error, see test_threads.py) once sized chunks as 2 MiB x
    2048 of accumulator whatever the tensors, and the read ring and write slots from them: terabytes asked of
    the allocator. Chunks now hold at most engine.MAX_CHUNK_BYTES and buffers no more than the largest
    tensor; torch gets no more threads than there are cores."""
    make_st_run([1000, 2000], torch.float16)
    before = torch.get_num_threads()
    args = ["lawa", str(tmp_path / "run"), "--steps", "2000:2000", "--k", "2"]
    outs = []
    for threads in ("4096", "1"):
        out = tmp_path / f"o{threads}"
        result = CliRunner().invoke(cli, [*args, "--out", str(out), "--threads", threads])
        assert result.exit_code == 0, result.output
        outs.append((out / "step2000" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert torch.get_num_threads() == before


MIXED = {"a": (300_000,), "b": (3,), "c": (300_001,), "d": (5,), "e": (70_001,)}


@pytest.mark.parametrize(
    ("cmd", "dtype"),
    [
        (["lawa", "--steps", "4000:6000", "--k", "4"], torch.float16),  # running sums
        (["lawa", "--steps", "3000:6000", "--k", "2"], torch.float16),  # group sums in float64
        (["swa", "--steps", "3000:6000", "--start", "1000"], torch.bfloat16),
        (["ema", "--steps", "2000:6000", "--decay", "0.9"], torch.float32),
    ],
    ids=["lawa4-fp16", "lawa2-fp16", "swa-bf16", "ema-fp32"],
)
def test_a_run_stopped_midway_and_resumed_with_other_threads_gives_the_same_bytes(
    make_st_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: list[str], dtype: torch.dtype
):
    """A run with --threads 1 (2 chunks per big tensor) fails after two tensors in a way that keeps its
    progress; the same command with --threads 5 (one chunk) resumes it. The bytes are an uninterrupted run's."""
    from ckptavg.errors import HubUnavailableError
    from ckptavg.writers import FolderWriter

    make_st_run(list(range(1000, 6001, 1000)), dtype, shapes=MIXED)
    run = str(tmp_path / "run")
    base = [cmd[0], run, *cmd[1:]]

    ref = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "ref"), "--threads", "2"])
    assert ref.exit_code == 0, ref.output

    real = FolderWriter.tensor_done

    def failing(self: FolderWriter, count: int) -> None:
        real(self, count)
        if count >= 2:
            raise HubUnavailableError("the Hub stayed down")

    monkeypatch.setattr(FolderWriter, "tensor_done", failing)
    out = tmp_path / "out"
    first = CliRunner().invoke(cli, [*base, "--out", str(out), "--threads", "1"])
    assert first.exit_code != 0
    assert list(out.glob(".step*.ckptavg-tmp-*")), "no progress was kept"
    monkeypatch.setattr(FolderWriter, "tensor_done", real)
    again = CliRunner().invoke(cli, [*base, "--out", str(out), "--threads", "5"])
    assert again.exit_code == 0, again.output
    assert "resuming an interrupted run after" in again.stderr, again.stderr[-3000:]
    assert weight_bytes(out) == weight_bytes(tmp_path / "ref") and weight_bytes(out)


def test_task_shares_run_with_different_threads_make_the_whole_runs_bytes(make_st_run, tmp_path: Path):
    """fp16 LAWA k=4 (running sums) in three tasks, each with its own --threads (chunks of 262144, 524288 and
    786432 elements for the 700001-element tensor), against one run: the same bytes (no -0 inputs here)."""
    make_st_run(list(range(1000, 8001, 1000)), torch.float16, shapes={"big": (700_001,), "s": (3,)})
    args = ["lawa", str(tmp_path / "run"), "--steps", "4000:8000", "--k", "4"]
    whole = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "whole"), "--threads", "1"])
    assert whole.exit_code == 0, whole.output
    for task, threads in enumerate(("2", "4", "7")):
        extra = ["--task-index", str(task), "--num-tasks", "3", "--threads", threads]
        result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "split"), *extra])
        assert result.exit_code == 0, result.output
    assert (
        weight_bytes(tmp_path / "split") == weight_bytes(tmp_path / "whole")
        and len(weight_bytes(tmp_path / "whole")) == 5
    )
