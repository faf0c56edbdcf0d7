"""The same command gives the same bits, however the run was cut: into SLURM tasks, by an interruption
and its resume, or by a Hub run's parts. The arithmetic is chosen from the whole plan, never from the
windows one run happens to make."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import weight_bytes

from ckptavg import api
from ckptavg.errors import HubUnavailableError
from ckptavg.steps import StepRange
from ckptavg.writers import FolderWriter

STEPS = list(range(1000, 12001, 1000))
# LAWA windows every 2000 steps, k=3 and nu=1000: neighbours share one checkpoint, so the plan overlaps,
# but a task of one window (or a resumed run left with one) does not.
LAWA = {"k": 3, "interval": 2000}
SWA = {"start": 2000, "every": 1000, "interval": 2000}


def plan(method: str, run: Path, out: Path) -> api.Plan:
    if method == "lawa":
        return api.plan_lawa(str(run), StepRange(3000, 11000), out=out, **LAWA)
    return api.plan_swa(str(run), StepRange(4000, 12000), out=out, **SWA)


OPTS = api.Options(chunk=2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["lawa", "swa"])
def test_split_into_tasks_gives_the_same_bits_as_one_run(make_st_run, tmp_path: Path, method: str, dtype: torch.dtype):
    make_st_run(STEPS, dtype)
    run = tmp_path / "run"
    whole = tmp_path / "whole"
    api.average(plan(method, run, whole), OPTS)
    expected = weight_bytes(whole)
    assert len(expected) == 5
    for tasks in (2, 3):
        out = tmp_path / f"split{tasks}"
        for t in range(tasks):
            api.average(api.task_share(plan(method, run, out), t, tasks), OPTS)
        assert weight_bytes(out) == expected, f"{tasks} tasks"


class Interrupted(HubUnavailableError):
    """Stands for a Hub that stayed unavailable through the retries: the run keeps what it finished."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_run_interrupted_at_any_point_resumes_to_the_same_bits(
    make_st_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
):
    make_st_run(STEPS, dtype)
    run = tmp_path / "run"
    whole = tmp_path / "whole"
    api.average(plan("lawa", run, whole), OPTS)
    expected = weight_bytes(whole)
    counter = {"n": 0}  # chunks written by a run that is not interrupted
    real_write = FolderWriter.write

    def counting(self: FolderWriter, name: str, start: int, data: torch.Tensor) -> None:
        counter["n"] += 1
        real_write(self, name, start, data)

    monkeypatch.setattr(FolderWriter, "write", counting)
    api.average(plan("lawa", run, tmp_path / "count"), OPTS)
    writes = counter["n"]
    for fraction in (0.2, 0.5, 0.9):
        out = tmp_path / f"cut{fraction}"
        limit = int(writes * fraction)
        counter["n"] = 0

        def failing(self: FolderWriter, name: str, start: int, data: torch.Tensor, limit: int = limit) -> None:
            counter["n"] += 1
            if counter["n"] > limit:
                raise Interrupted("the Hub went away")
            real_write(self, name, start, data)

        monkeypatch.setattr(FolderWriter, "write", failing)
        with pytest.raises(Interrupted):
            api.average(plan("lawa", run, out), OPTS)
        assert list(out.glob(".step*")), "the interrupted run kept its temporary folders"
        monkeypatch.setattr(FolderWriter, "write", real_write)
        # Resume the last task's share first, then everything: each run makes a different subset.
        api.average(api.task_share(plan("lawa", run, out), 2, 3), OPTS)
        api.average(plan("lawa", run, out), OPTS)
        assert weight_bytes(out) == expected, f"cut at {fraction}"
        assert not list(out.glob(".*"))


def test_fp16_windows_that_overlap_are_the_mean_of_their_exact_sum(make_st_run, tmp_path: Path):
    """Overlapping fp16 windows come from float64 running sums, which are exact: each output equals the
    float64 mean of its members' exact sum, rounded once to fp16."""
    states = make_st_run(STEPS, torch.float16)
    out = tmp_path / "out"
    p = plan("lawa", tmp_path / "run", out)
    assert p.overlapping
    api.average(p, OPTS)
    from safetensors.torch import load_file

    for w in p.windows:
        got = load_file(out / f"step{w.end}" / "model.safetensors")
        for name, t in got.items():
            exact = sum(states[s][name].double() for s in w.steps) / len(w.steps)
            assert torch.equal(t, exact.half()), (w.end, name)
