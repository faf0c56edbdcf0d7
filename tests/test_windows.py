import math
import re

import pytest

from ckptavg.errors import InvalidArgumentError, StepNotFoundError
from ckptavg.steps import StepRange, parse_step_range
from ckptavg.windows import checkpoint_spacing, ema_windows, explicit_window, lawa_windows, swa_windows

PYTHIA = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 143001, 1000)]


def test_parse_step_range():
    assert parse_step_range("21000:141000") == StepRange(21000, 141000)
    assert parse_step_range("1:9:2") == StepRange(1, 9, 2)
    assert parse_step_range("5") == StepRange(5, 5)
    for bad, msg in [("9:1", "inverted"), ("a:b", "not a step range"), ("1:2:0", "positive"), ("", "not")]:
        with pytest.raises(ValueError, match=msg):
            parse_step_range(bad)


def test_spacing_is_the_usual_gap():
    assert checkpoint_spacing(PYTHIA) == 1000
    assert checkpoint_spacing([5]) == 1


def test_lawa_headline_windows():
    ws = lawa_windows(PYTHIA, StepRange(21000, 141000), k=5, interval=3000, nu=1000)
    assert len(ws) == 41
    assert ws[0].end == 21000 and ws[0].steps == (17000, 18000, 19000, 20000, 21000)
    assert ws[-1].steps == (137000, 138000, 139000, 140000, 141000)
    assert all(w.weights == (0.2,) * 5 for w in ws)


def test_lawa_follows_text_not_algorithm_1_slice():
    # nu = 2 checkpoints: Algorithm 1's slice would keep ceil(5/2) = 3 members; the text keeps k = 5.
    ws = lawa_windows(range(0, 30001, 1000), StepRange(20000, 20000), k=5, interval=1000, nu=2000)
    assert ws[0].steps == (12000, 14000, 16000, 18000, 20000)


def test_lawa_errors():
    with pytest.raises(InvalidArgumentError, match="k must be at least 1"):
        lawa_windows(PYTHIA, StepRange(21000, 22000), k=0, interval=1000, nu=1000)
    with pytest.raises(InvalidArgumentError, match="spans 400000 steps"):
        lawa_windows(PYTHIA, StepRange(21000, 22000), k=5, interval=1000, nu=100000)
    run = [s for s in range(1000, 30001, 1000) if s != 19000]
    with pytest.raises(StepNotFoundError) as e:
        lawa_windows(run, StepRange(21000, 22000), k=5, interval=1000, nu=1000, source="runs/x")
    assert str(e.value) == "step 19000 not found in runs/x (nearest available: 18000)"


def test_ema_weights_are_the_closed_form():
    ws = ema_windows(range(0, 10001, 1000), StepRange(0, 9000), decay=0.9, interval=3000)
    assert [w.end for w in ws] == [0, 3000, 6000, 9000]
    last = ws[-1]
    n = len(last.steps) - 1
    assert last.weights[0] == pytest.approx(0.9**n)
    assert last.weights[-1] == pytest.approx(0.1)
    assert last.weights[-2] == pytest.approx(0.1 * 0.9)
    assert math.fsum(last.weights) == pytest.approx(1.0, abs=1e-15)
    assert ws[0].weights == (1.0,)
    with pytest.raises(InvalidArgumentError, match="decay"):
        ema_windows(range(10), StepRange(0, 5), decay=1.0, interval=1)


def test_swa_is_the_uniform_running_mean():
    ws = swa_windows(range(0, 20001, 1000), StepRange(10000, 14000), start=10000, every=1000, interval=2000)
    assert [w.steps for w in ws] == [(10000,), (10000, 11000, 12000), (10000, 11000, 12000, 13000, 14000)]
    assert ws[1].weights == (1 / 3,) * 3
    with pytest.raises(InvalidArgumentError, match="before --start"):
        swa_windows(range(0, 20001, 1000), StepRange(9000, 14000), start=10000, every=1000, interval=1000)


def test_explicit_weights():
    assert explicit_window(3, [1, 1, 2]).weights == (0.25, 0.25, 0.5)
    for bad, msg in [([1, -1, 1], "negative"), ([0, 0, 0], "all zero"), ([1, 2], "2 weights for 3")]:
        with pytest.raises(InvalidArgumentError, match=msg):
            explicit_window(3, bad)


# ---------------------------------------------------------------- bounds: checked against what exists first
# Each of these listed 10**12 steps (MemoryError, or minutes) before it was checked against the run.

RUN_DESC = "the run has steps 0..143000 (154 checkpoints)"


def test_steps_past_the_run_are_refused_before_listing_window_ends():
    with pytest.raises(InvalidArgumentError) as e:
        lawa_windows(PYTHIA, StepRange(21000, 1410000), k=5, interval=1000, nu=1000)
    assert str(e.value) == (
        f"--steps 21000:1410000: {RUN_DESC}, but the last window would end at step 1410000; "
        "end --steps at or before step 143000"
    )
    for build in (
        lambda: lawa_windows(PYTHIA, StepRange(0, 10**12), k=1, interval=1, nu=1),
        lambda: ema_windows(PYTHIA, StepRange(0, 10**12), decay=0.9, interval=1),
        lambda: ema_windows(PYTHIA, StepRange(0, 10**12), decay=0.9, interval=1, every=1),
        lambda: swa_windows(PYTHIA, StepRange(0, 10**12), start=0, every=1, interval=1),
    ):
        with pytest.raises(InvalidArgumentError, match="^" + re.escape(f"--steps 0:1000000000000: {RUN_DESC}, but")):
            build()


def test_more_window_ends_than_checkpoints_inside_the_run():
    with pytest.raises(InvalidArgumentError) as e:
        lawa_windows(PYTHIA, StepRange(1000, 143000), k=1, interval=1, nu=1000)
    assert str(e.value) == (
        f"--steps 1000:143000: {RUN_DESC}, but window ends every 1 steps would make 142001 outputs; "
        "give a larger --interval"
    )
    with pytest.raises(InvalidArgumentError, match="interval must be at least 1 step, got 0"):
        lawa_windows(PYTHIA, StepRange(1000, 143000), k=1, interval=0, nu=1000)


def test_as_many_ends_as_checkpoints_still_name_the_missing_steps():
    # Not more ends than checkpoints: the refusal names the steps and the nearest, as before.
    with pytest.raises(StepNotFoundError, match="steps 144000, 145000 not found in the run"):
        lawa_windows(PYTHIA, StepRange(142000, 145000), k=1, interval=1000, nu=1000)


def test_members_beyond_the_run_are_refused_from_arithmetic():
    sparse = [0, 10**12]  # spans 10**12 steps with two checkpoints: the span check alone lets k=10**12 pass
    with pytest.raises(InvalidArgumentError) as e:
        lawa_windows(sparse, StepRange(10**12, 10**12), k=10**12, interval=1, nu=1)
    assert str(e.value) == (
        f"k={10**12} checkpoints per window, but the run has steps 0..{10**12} (2 checkpoints); the window at "
        f"step {10**12} lacks steps 1, 2, 3, 4, 5 and more (nearest available: 0)"
    )
    with pytest.raises(InvalidArgumentError, match=r"--every 1 over --steps 0:1000000000000 makes an EMA sequence"):
        ema_windows(sparse, StepRange(0, 10**12), decay=0.9, interval=10**12, every=1)
    with pytest.raises(InvalidArgumentError, match=r"^--start 0 --every 1 up to step 1000000000000 averages"):
        swa_windows(sparse, StepRange(10**12, 10**12), start=0, every=1, interval=1)


def test_ema_ends_off_the_sequence_are_listed_briefly():
    with pytest.raises(InvalidArgumentError) as e:
        ema_windows(PYTHIA, StepRange(1000, 143000), decay=0.9, interval=1000, every=2000)
    assert str(e.value).startswith("window ends 2000, 4000, 6000, 8000, 10000 and 66 more are not on the EMA")


def test_bounded_builders_keep_their_results():
    assert len(lawa_windows(PYTHIA, StepRange(1000, 143000), k=1, interval=1000, nu=1000)) == 143
    ema = ema_windows(PYTHIA, StepRange(1000, 9000), decay=0.5, interval=4000, every=2000)
    assert [w.steps for w in ema] == [(1000,), (1000, 3000, 5000), (1000, 3000, 5000, 7000, 9000)]
    swa = swa_windows(PYTHIA, StepRange(140000, 143000), start=139000, every=1000, interval=3000)
    assert [w.steps for w in swa] == [(139000, 140000), (139000, 140000, 141000, 142000, 143000)]


def test_explicit_weights_normalise_without_overflow_or_underflow():
    assert explicit_window(2, [1e308, 1e308]).weights == (0.5, 0.5)  # sum first: inf, and 1e308/inf = 0
    assert explicit_window(3, [5e-324, 5e-324, 0]).weights == (0.5, 0.5, 0.0)  # subnormal: sum is exact
    assert explicit_window(2, [1e308, 1e-308]).weights == (1.0, 0.0)  # 1e-616 is below any float
    w = explicit_window(10, [0.1] * 10).weights
    assert w == (0.1,) * 10 and math.fsum(w) == 1.0
    assert explicit_window(1, None).weights == (1.0,)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([math.nan, 1], "--weights must be finite numbers, got nan in nan, 1"),
        ([1, math.inf], "--weights must be finite numbers, got inf in 1, inf"),
        ([-math.inf, 1], "--weights must be finite numbers, got -inf in -inf, 1"),
        ([1, -1e-300], "--weights must not be negative, got 1, -1e-300"),
        ([0.0, -0.0], "--weights are all zero (0, -0); give at least one positive weight"),
        ([1], "--weights: got 1 weight for 2 checkpoints"),
    ],
)
def test_explicit_weights_refused(weights: list[float], message: str):
    with pytest.raises(InvalidArgumentError) as e:
        explicit_window(len(weights) if len(weights) > 1 else 2, weights)
    assert str(e.value) == message


def test_step_range_numbers_past_int64_are_refused():
    with pytest.raises(ValueError, match=r"^step range '0:9{38}\.\.\.' has a number of more than 18 digits"):
        parse_step_range("0:" + "9" * 5000)  # quoted short; int() alone would fail on 4300+ digits
    assert parse_step_range("0:999999999999999999") == StepRange(0, 10**18 - 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:1:1e-300", "'0:1:1e-300' makes 1e+300 points; at most 10001: give a larger STEP"),
        ("-1e308:1e308:1", "'-1e308:1e308:1' makes inf points"),
        ("0:nan:0.1", "'0:nan:0.1': every number must be finite"),
        ("inf", "'inf': every number must be finite"),
        ("0:2:0.5", "'0:2:0.5': every point must lie in 0..1"),
        ("-0.5", "'-0.5': every point must lie in 0..1"),
    ],
)
def test_float_range_is_bounded(text: str, message: str):
    import click

    from ckptavg.steps import STEP_RANGE_FLOAT, FloatRangeType

    kind = FloatRangeType() if text.startswith("-1e308") else STEP_RANGE_FLOAT
    with pytest.raises(click.BadParameter) as e:
        kind.convert(text, None, None)
    assert e.value.message.startswith(message), e.value.message
    assert STEP_RANGE_FLOAT.convert("0:1:0.25", None, None) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(STEP_RANGE_FLOAT.convert("0:1:0.0001", None, None)) == 10001  # the most points allowed
