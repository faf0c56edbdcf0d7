import math

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
