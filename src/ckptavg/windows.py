"""Which checkpoints, with which weights, feed each output. Pure: steps in, windows out.

Every averaging rule is written here as explicit weights. The engine computes the same numbers with
running sums (it never re-adds a checkpoint k times), and the tests use these weights as the oracle.

LAWA follows the paper's text, not its Algorithm 1: the window ending at step t holds the k checkpoints
t-(k-1)*nu, ..., t-nu, t. Algorithm 1 slices ``ckpts[end-k+1:end+1:k_stepsize]``, which keeps only
ceil(k/nu) checkpoints when nu > 1.

SWA is the true uniform mean of the members seen so far. Algorithm 2 of the paper, as printed, weights
the new checkpoint by n/(n+1) and the running mean by 1/(n+1), which is the mean's weights swapped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ckptavg.errors import InvalidArgumentError, StepNotFoundError
from ckptavg.steps import StepRange


@dataclass(frozen=True)
class Window:
    """One output: the weighted average of ``steps`` (ascending), standing for step ``end``."""

    end: int
    steps: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.weights) or not self.steps:
            raise ValueError("a window needs one weight per member and at least one member")


def checkpoint_spacing(available: Iterable[int]) -> int:
    """The run's usual distance between checkpoints: the most common gap (smallest on a tie).

    Pythia saves log-spaced steps early (1, 2, 4, ... 512) and then every 1000: the mode picks 1000.
    """
    steps = sorted(set(available))
    gaps = Counter(b - a for a, b in zip(steps, steps[1:], strict=False))
    if not gaps:
        return 1
    best = max(gaps.values())
    return min(g for g, c in gaps.items() if c == best)


def _ends(span: StepRange, interval: int) -> list[int]:
    if interval < 1:
        raise InvalidArgumentError(f"interval must be at least 1 step, got {interval}")
    return list(range(span.start, span.end + 1, interval))


def _require(steps: Iterable[int], available: set[int], source: str) -> None:
    missing = sorted(set(steps) - available)
    if missing:
        raise StepNotFoundError(missing, available, source)


def lawa_windows(
    available: Iterable[int], span: StepRange, *, k: int, interval: int, nu: int, source: str = "the run"
) -> list[Window]:
    """Latest weight averaging: at every ``interval`` steps, the mean of the k latest checkpoints nu apart."""
    have = set(available)
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    if nu < 1:
        raise InvalidArgumentError(f"k-stepsize (nu) must be at least 1 step, got {nu}")
    if have and (k - 1) * nu > max(have) - min(have):
        raise InvalidArgumentError(
            f"a window of k={k} checkpoints nu={nu} steps apart spans {(k - 1) * nu} steps, "
            f"but {source} only spans {max(have) - min(have)} (steps {min(have)}..{max(have)})"
        )
    windows = []
    for t in _ends(span, interval):
        members = tuple(t - (k - 1 - i) * nu for i in range(k))
        windows.append(Window(t, members, (1.0 / k,) * k))
    _require((s for w in windows for s in w.steps), have, source)
    return windows


def ema_windows(
    available: Iterable[int],
    span: StepRange,
    *,
    decay: float,
    interval: int,
    every: int | None = None,
    source: str = "the run",
) -> list[Window]:
    """EMA over the checkpoint sequence from ``span.start``: ema = decay*ema + (1-decay)*x.

    The sequence starts at the first checkpoint (ema = x0), so the member of age j carries
    (1-decay)*decay^j and the first member carries decay^n: the weights sum to exactly 1.
    ``every`` thins the sequence to steps start, start+every, ...; by default every checkpoint counts.
    """
    if not 0.0 < decay < 1.0:
        raise InvalidArgumentError(f"decay must be strictly between 0 and 1, got {decay}")
    have = set(available)
    ends = _ends(span, interval)
    if every is None:
        sequence = sorted(s for s in have if span.start <= s <= span.end)
        _require(ends, have, source)
    else:
        if every < 1:
            raise InvalidArgumentError(f"every must be at least 1 step, got {every}")
        sequence = list(range(span.start, span.end + 1, every))
        _require(sequence + ends, have, source)
        if set(ends) - set(sequence):
            raise InvalidArgumentError(f"window ends {ends} must fall on the EMA sequence (every {every} steps)")
    windows = []
    for t in ends:
        members = [s for s in sequence if s <= t]
        n = len(members) - 1
        weights = [decay**n] + [(1.0 - decay) * decay ** (n - i) for i in range(1, n + 1)]
        windows.append(Window(t, tuple(members), tuple(weights)))
    return windows


def swa_windows(
    available: Iterable[int],
    span: StepRange,
    *,
    start: int,
    every: int,
    interval: int,
    source: str = "the run",
) -> list[Window]:
    """SWA: the uniform mean of checkpoints start, start+every, ... up to each window end."""
    if every < 1:
        raise InvalidArgumentError(f"every must be at least 1 step, got {every}")
    if span.start < start:
        raise InvalidArgumentError(f"the first window ends at step {span.start}, before --start {start}")
    have = set(available)
    windows = []
    for t in _ends(span, interval):
        members = tuple(range(start, t + 1, every))
        if members[-1] != t:
            raise InvalidArgumentError(
                f"window end {t} is not on the SWA grid (start {start}, every {every}); "
                "make --interval a multiple of --every"
            )
        windows.append(Window(t, members, (1.0 / len(members),) * len(members)))
    _require((s for w in windows for s in w.steps), have, source)
    return windows


def explicit_window(n_members: int, weights: Sequence[float] | None = None) -> Window:
    """``avg``: members 0..n-1 (positions, not steps) with weights normalised to sum to 1."""
    if n_members < 1:
        raise InvalidArgumentError("avg needs at least one checkpoint")
    w = [1.0] * n_members if weights is None else [float(x) for x in weights]
    if len(w) != n_members:
        raise InvalidArgumentError(f"got {len(w)} weights for {n_members} checkpoints")
    if any(x != x or x in (float("inf"), float("-inf")) for x in w):
        raise InvalidArgumentError(f"weights must be finite numbers, got {list(weights or [])}")
    if any(x < 0 for x in w):
        raise InvalidArgumentError(f"weights must not be negative, got {w}")
    total = sum(w)
    if total == 0:
        raise InvalidArgumentError("weights are all zero")
    return Window(n_members - 1, tuple(range(n_members)), tuple(x / total for x in w))
