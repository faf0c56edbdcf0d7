"""Per plan, the cheaper of two exact ways to sum overlapping fp16 windows: running sums (one addition per
checkpoint and a subtraction per window) or each window group summed from its first member. Both give every
window's exact float64 sum from +0, so the choice changes only the cost, never a bit; and it is
made from the whole plan, so a plan's bits never depend on how its run was cut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptavg import api, engine
from ckptavg.steps import StepRange
from ckptavg.windows import Window

CPU = torch.device("cpu")


def lawa(k: int, ends: range, nu: int = 1) -> list[Window]:
    return [Window(e, tuple(range(e - (k - 1) * nu, e + 1, nu)), (1 / k,) * k) for e in ends]


def swa(first: int, ends: range) -> list[Window]:
    return [Window(e, tuple(range(first, e + 1)), (1 / (e - first + 1),) * (e - first + 1)) for e in ends]


def reducer_for(windows: list[Window], dtype: torch.dtype = torch.float16, **kw: object) -> engine.Reducer:
    members = len({m for w in windows for m in w.steps})
    args: dict = dict(
        overlapping=engine.windows_overlap(windows),
        members=members,
        plan_windows=len(windows),
        additions=engine.group_additions(windows),
        stride=1,
        decay=0.0,
        accumulate=torch.float32,
        allow_nonfinite=False,
        device=CPU,
    )
    args.update(kw)
    return engine.choose_reducer("uniform", windows, dtype, **args)


@pytest.mark.parametrize(
    ("windows", "additions", "chosen"),
    [
        (lawa(5, range(5, 21)), 80, engine.RunningSumReducer),  # 20 + 16 < 80
        (lawa(4, range(4, 21)), 68, engine.RunningSumReducer),  # 20 + 17 < 68
        (lawa(3, range(3, 21)), 54, engine.RunningSumReducer),  # 20 + 18 < 54
        (lawa(2, range(2, 21)), 38, engine.GroupSumReducer),  # 20 + 19 > 38
        (swa(1, range(2, 21)), 20, engine.GroupSumReducer),  # one sum over every member
        (lawa(5, range(5, 21, 3)), 30, engine.RunningSumReducer),  # every third step: 20 + 6 < 30
        (lawa(5, range(5, 18, 4)), 20, engine.GroupSumReducer),  # sharing one member each: 17 + 4 > 20
        (lawa(5, range(5, 21, 2)), 40, engine.RunningSumReducer),  # 20 + 8 < 40
    ],
)
def test_the_reducer_with_fewer_additions_is_chosen(windows: list[Window], additions: int, chosen: type):
    assert engine.group_additions(windows) == additions
    reducer = reducer_for(windows)
    assert type(reducer) is chosen
    assert reducer.dtype == torch.float64  # overlapping windows: exact sums either way


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_dtypes_always_sum_each_group_since_their_running_sums_are_not_exact(dtype: torch.dtype):
    assert type(reducer_for(lawa(5, range(5, 21)), dtype)) is engine.GroupSumReducer


def feed_all(
    reducer: engine.Reducer, windows: list[Window], inputs: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    n = next(iter(inputs.values())).numel()
    reducer.begin(n)
    means: dict[int, torch.Tensor] = {}
    for m in sorted({m for w in windows for m in w.steps}):
        for j, mean in reducer.feed(m, inputs[m]):
            means[j] = mean.to(torch.float16)
    return means


@pytest.mark.parametrize(
    "windows", [lawa(2, range(2, 31)), lawa(5, range(5, 31)), lawa(5, range(9, 31, 3), nu=2), swa(3, range(3, 31))]
)
def test_both_exact_reducers_give_the_same_bits(windows: list[Window]):
    g = torch.Generator().manual_seed(len(windows))
    members = sorted({m for w in windows for m in w.steps})
    # Magnitudes from 1e-7 (fp16 subnormals) to 6e4 in one chunk: sums that fp32 could not hold exactly.
    scale = torch.logspace(-7, 4.7, 4096, dtype=torch.float64)
    x = {m: (torch.randn(4096, generator=g, dtype=torch.float64) * scale).clamp(-6e4, 6e4) for m in members}
    inputs = {m: t.to(torch.float16) for m, t in x.items()}
    for t in inputs.values():
        t[:8] = -0.0  # a weight at -0 in every member: its mean is +0 whichever reducer sums it
    assert all(bool(t.isfinite().all()) for t in inputs.values())
    stride = windows[-1].steps[1] - windows[-1].steps[0]
    running = feed_all(engine.RunningSumReducer(windows, stride, CPU), windows, inputs)
    grouped = feed_all(engine.GroupSumReducer(windows, torch.float64, CPU), windows, inputs)
    assert len(running) == len(grouped) == len(windows)
    for j, mean in grouped.items():  # the same bits, the sign of a zero included (both sums start from +0)
        assert torch.equal(mean.view(torch.int16), running[j].view(torch.int16)), j
        assert not bool(torch.signbit(mean[:8]).any())


def test_a_task_share_keeps_the_whole_plans_choice(make_st_run, tmp_path: Path):
    """A task's share carries the whole plan's counts, so every share chooses as the whole plan does."""
    make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 9000), k=3, out=tmp_path / "o")
    share = api.task_share(plan, 1, 3)
    assert len(share.windows) < len(plan.windows)
    assert (share.plan_members, share.plan_windows, share.additions) == (plan.plan_members, 7, 21)
