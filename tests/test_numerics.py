"""Averages against float64 closed forms, through the real engine and real safetensors files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptavg import api
from ckptavg.steps import StepRange

CHUNK = 1000  # small, so every tensor of the fixtures crosses chunk borders
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(states: dict[int, dict[str, torch.Tensor]], steps: tuple[int, ...], weights: tuple[float, ...]):
    """(mean, scale) in float64: a uniform mean as sum/n (no rounded 1/n), and sum |w*x| for error bounds."""
    names = states[steps[0]]
    xs = {n: [states[s][n].double() for s in steps] for n in names}
    if len(set(weights)) == 1:
        mean = {n: sum(x) / len(x) for n, x in xs.items()}
    else:
        mean = {n: sum(w * x for w, x in zip(weights, xs[n], strict=True)) for n in names}
    scale = {n: sum(abs(w) * x.abs() for w, x in zip(weights, xs[n], strict=True)) for n in names}
    return mean, scale


def assert_rounded(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` is ``ref`` rounded to ``dtype`` (one ulp), plus float32 accumulation error on the terms."""
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    tol = eps * ref.abs() + 8 * 2.0**-24 * scale + torch.finfo(dtype).smallest_normal * eps
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float((err - tol).max())} beyond tolerance"


def check_outputs(plan: api.Plan, states, dtype: torch.dtype) -> None:
    for w, out in zip(plan.windows, plan.outputs, strict=True):
        assert math.fsum(w.weights) == pytest.approx(1.0, abs=1e-12)
        got = load_file(out / "model.safetensors")
        ref, scale = reference(states, w.steps, w.weights)
        assert got.keys() == ref.keys()
        for n in ref:
            assert_rounded(got[n], ref[n], scale[n], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lawa_overlapping_windows(make_st_run, tmp_path: Path, dtype):
    states = make_st_run(list(range(1000, 12001, 1000)), dtype)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(5000, 12000), k=5, interval=1000, out=tmp_path / "o")
    assert len(plan.windows) == 8
    api.average(plan, api.Options(chunk=CHUNK))
    check_outputs(plan, states, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lawa_nu_apart_and_disjoint(make_st_run, tmp_path: Path, dtype):
    states = make_st_run(list(range(1000, 21001, 1000)), dtype)
    plan = api.plan_lawa(
        str(tmp_path / "run"), StepRange(9000, 21000), k=3, interval=6000, k_stepsize=2000, out=tmp_path / "o"
    )
    assert [w.steps for w in plan.windows] == [(5000, 7000, 9000), (11000, 13000, 15000), (17000, 19000, 21000)]
    api.average(plan, api.Options(chunk=CHUNK))
    check_outputs(plan, states, dtype)


def test_lawa_interleaved_classes(make_st_run, tmp_path: Path):
    # nu = 2 checkpoints, interval = 1: consecutive windows alternate between odd and even steps.
    states = make_st_run(list(range(1000, 12001, 1000)), torch.float16)
    plan = api.plan_lawa(
        str(tmp_path / "run"), StepRange(7000, 12000), k=4, interval=1000, k_stepsize=2000, out=tmp_path / "o"
    )
    api.average(plan, api.Options(chunk=CHUNK))
    check_outputs(plan, states, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_matches_explicit_weights(make_st_run, tmp_path: Path, dtype):
    states = make_st_run(list(range(1000, 11001, 1000)), dtype)
    plan = api.plan_ema(str(tmp_path / "run"), StepRange(1000, 10000), decay=0.9, interval=3000, out=tmp_path / "o")
    api.average(plan, api.Options(chunk=CHUNK, accumulate="float64"))
    check_outputs(plan, states, dtype)
    # decay^n on the first member, (1-decay) decay^(n-i) after it.
    assert plan.windows[-1].weights[-1] == pytest.approx(0.1)
    assert plan.windows[-1].weights[0] == pytest.approx(0.9**9)


def test_ema_float32_accumulator_stays_within_an_ulp(make_st_run, tmp_path: Path):
    states = make_st_run(list(range(1000, 11001, 1000)), torch.float16)
    plan = api.plan_ema(str(tmp_path / "run"), StepRange(1000, 10000), decay=0.9, interval=3000, out=tmp_path / "o")
    api.average(plan, api.Options(chunk=CHUNK))
    check_outputs(plan, states, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_is_the_running_mean(make_st_run, tmp_path: Path, dtype):
    states = make_st_run(list(range(1000, 11001, 1000)), dtype)
    plan = api.plan_swa(
        str(tmp_path / "run"), StepRange(4000, 10000), start=4000, every=1000, interval=2000, out=tmp_path / "o"
    )
    assert plan.windows[-1].steps == tuple(range(4000, 10001, 1000))
    api.average(plan, api.Options(chunk=CHUNK))
    check_outputs(plan, states, dtype)


def test_avg_weights(make_st_run, tmp_path: Path):
    states = make_st_run([1000, 2000, 3000], torch.bfloat16)
    run = tmp_path / "run"
    plan = api.plan_avg(
        [str(run / "step1000"), str(run / "step2000"), str(run / "step3000")],
        weights=[0.2, 0.3, 0.5],
        out=tmp_path / "soup",
    )
    api.average(plan, api.Options(chunk=CHUNK))
    got = load_file(tmp_path / "soup" / "model.safetensors")
    ref, scale = reference({0: states[1000], 1: states[2000], 2: states[3000]}, (0, 1, 2), (0.2, 0.3, 0.5))
    for n in ref:
        assert_rounded(got[n], ref[n], scale[n], torch.bfloat16)


def test_output_dtype_and_float64_accumulator(make_st_run, tmp_path: Path):
    states = make_st_run([1000, 2000, 3000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / "o")
    api.average(plan, api.Options(chunk=CHUNK, dtype="float32", accumulate="float64"))
    got = load_file(tmp_path / "o" / "step3000" / "model.safetensors")
    ref, scale = reference(states, (1000, 2000, 3000), (1 / 3,) * 3)
    for n in ref:
        assert_rounded(got[n], ref[n], scale[n], torch.float32)


def test_overlap_uses_exact_float64_running_sums(make_st_run, tmp_path: Path):
    """fp16 inputs: the float64 difference of running sums is exact, so outputs are correctly rounded."""
    states = make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(5000, 9000), k=5, interval=1000, out=tmp_path / "o")
    api.average(plan, api.Options(chunk=CHUNK))
    for w, out in zip(plan.windows, plan.outputs, strict=True):
        got = load_file(out / "model.safetensors")
        ref, _ = reference(states, w.steps, w.weights)
        for n in ref:
            assert torch.equal(got[n], ref[n].to(torch.float16)), n


# ---------------------------------------------------------------- uniform means are the float64 reference's bits

UNIFORM_PLANS = {
    "lawa, disjoint windows": lambda run, out: api.plan_lawa(run, StepRange(3000, 9000), k=3, interval=3000, out=out),
    "lawa k=2, overlapping (group sums)": lambda run, out: api.plan_lawa(
        run, StepRange(2000, 9000), k=2, interval=1000, out=out
    ),
    "lawa k=5, overlapping (running sums for fp16)": lambda run, out: api.plan_lawa(
        run, StepRange(5000, 9000), k=5, interval=1000, out=out
    ),
    "swa": lambda run, out: api.plan_swa(run, StepRange(3000, 9000), start=1000, every=1000, interval=3000, out=out),
    "avg": lambda run, out: api.plan_avg([f"{run}/step{s}" for s in (4000, 7000, 9000)], out=out),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal where the values are and the signs of zeros too."""
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(UNIFORM_PLANS))
def test_a_uniform_mean_has_the_bits_of_the_float64_reference(make_st_run, tmp_path: Path, method, dtype):
    """(x1.double() + ... + xn.double()) / n, cast by torch: what a user's own float64 script writes. A
    weight at -0 in every member averages to +0 there (Python's sum starts from 0), and so here."""
    states = make_st_run(list(range(1000, 9001, 1000)), dtype)
    for s, state in states.items():
        state["layer.w"][:16] = -0.0
        save_file(state, tmp_path / "run" / f"step{s}" / "model.safetensors")
    plan = UNIFORM_PLANS[method](str(tmp_path / "run"), tmp_path / "o")
    api.average(plan, api.Options(chunk=CHUNK))
    if plan.by_position:  # avg: members are positions on the command line
        states = {i: states[s] for i, s in enumerate((4000, 7000, 9000))}
    for w, out in zip(plan.windows, plan.outputs, strict=True):
        got = load_file(out / "model.safetensors")
        ref, _ = reference(states, w.steps, w.weights)
        for n in ref:
            assert torch.equal(bits(got[n]), bits(ref[n].to(dtype))), (out.name, n)


def test_the_mean_of_identical_checkpoints_is_that_checkpoint(tmp_path: Path):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for s in (1, 2, 3):
        (tmp_path / "run" / f"step{s}").mkdir(parents=True)
        save_file({"w": x, "d": x.double()}, tmp_path / "run" / f"step{s}" / "model.safetensors")
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3, 3), k=3, out=tmp_path / "o")
    api.average(plan, api.Options())
    got = load_file(plan.outputs[0] / "model.safetensors")
    assert torch.equal(got["w"], x) and torch.equal(got["d"], x.double())
    # float64 inputs are summed in float64 even where --accumulate float32 is asked for
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3, 3), k=3, out=tmp_path / "o32")
    api.average(plan, api.Options(accumulate="float32"))
    assert torch.equal(load_file(plan.outputs[0] / "model.safetensors")["d"], x.double())


def test_a_window_has_the_same_bits_whichever_other_windows_the_plan_holds(tmp_path: Path):
    """fp16 2**-14, 60000, -60000: a float32 sum loses the small term; the float64 sum is exact."""
    for s, v in ((1, 2**-14), (2, 60000.0), (3, -60000.0), (4, 1.0)):
        (tmp_path / "run" / f"step{s}").mkdir(parents=True)
        save_file({"w": torch.tensor([v], dtype=torch.float16)}, tmp_path / "run" / f"step{s}" / "model.safetensors")
    run = str(tmp_path / "run")
    alone = api.plan_lawa(run, StepRange(3, 3), k=3, out=tmp_path / "alone")
    overlapping = api.plan_lawa(run, StepRange(3, 4), k=3, out=tmp_path / "overlapping")
    for plan in (alone, overlapping):
        api.average(plan, api.Options())
    want = torch.tensor([2**-14 / 3], dtype=torch.float16)
    for plan in (alone, overlapping):
        assert torch.equal(load_file(plan.outputs[0] / "model.safetensors")["w"], want)
