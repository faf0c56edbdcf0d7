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

import math
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


def _describe(have: Sequence[int], source: str) -> str:
    """``runs/x has steps 1000..143000 (143 checkpoints)``: what a refusal says exists."""
    if not have:
        return f"{source} has no checkpoints"
    noun = "checkpoint" if len(have) == 1 else "checkpoints"
    return f"{source} has steps {have[0]}..{have[-1]} ({len(have)} {noun})"


def _count(first: int, last: int, stride: int) -> int:
    """How many of first, first+stride, ... are <= last (0 if last < first), without listing them."""
    return 0 if last < first else (last - first) // stride + 1


def _lacking(first: int, stride: int, count: int, have: set[int], limit: int = 5) -> str:
    """``steps 3000, 7000 and more (nearest available: 2000)``: some members of the progression first,
    first+stride, ... (count of them) that are not checkpoints. At most len(have)+limit steps are looked
    at, however long the progression: all but len(have) of its members are missing."""
    missing: list[int] = []
    for i in range(min(count, len(have) + limit)):
        if (s := first + i * stride) not in have:
            missing.append(s)
            if len(missing) == limit:
                break
    if not missing:
        return "no steps"
    shown = ", ".join(str(m) for m in missing) + (" and more" if len(missing) == limit else "")
    nearest = min(have, key=lambda a: (abs(a - missing[0]), a)) if have else None
    return f"steps {shown} (nearest available: {'none' if nearest is None else nearest})"


def _ends(have: Sequence[int], span: StepRange, interval: int, source: str) -> list[int]:
    """Window ends span.start, span.start+interval, ... <= span.end: every one must be a checkpoint.

    So more ends than checkpoints can never work: that is refused from arithmetic before any end is
    listed, and listing them costs at most len(have), however long the span or small the interval
    (``--steps 0:10**12 --interval 1`` would otherwise build a trillion windows).
    """
    if interval < 1:
        raise InvalidArgumentError(f"interval must be at least 1 step, got {interval}")
    count = _count(span.start, span.end, interval)
    if count > len(have):
        last_end = span.start + (count - 1) * interval
        if have and last_end > have[-1]:
            why = f"the last window would end at step {last_end}; end --steps at or before step {have[-1]}"
        else:
            why = f"window ends every {interval} steps would make {count} outputs; give a larger --interval"
        raise InvalidArgumentError(f"--steps {span}: {_describe(have, source)}, but {why}")
    return [span.start + i * interval for i in range(count)]


def _require(steps: Iterable[int], available: set[int], source: str) -> None:
    missing = sorted(set(steps) - available)
    if missing:
        raise StepNotFoundError(missing, available, source)


def lawa_windows(
    available: Iterable[int], span: StepRange, *, k: int, interval: int, nu: int, source: str = "the run"
) -> list[Window]:
    """Latest weight averaging: at every ``interval`` steps, the mean of the k latest checkpoints nu apart."""
    have = set(available)
    ordered = sorted(have)
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    if nu < 1:
        raise InvalidArgumentError(f"k-stepsize (nu) must be at least 1 step, got {nu}")
    if have and (k - 1) * nu > max(have) - min(have):
        raise InvalidArgumentError(
            f"a window of k={k} checkpoints nu={nu} steps apart spans {(k - 1) * nu} steps, "
            f"but {source} only spans {max(have) - min(have)} (steps {min(have)}..{max(have)})"
        )
    ends = _ends(ordered, span, interval, source)
    if ends and k > len(have):  # every member must be a checkpoint: bounds each window's size by the run's
        first = ends[0] - (k - 1) * nu
        raise InvalidArgumentError(
            f"k={k} checkpoints per window, but {_describe(ordered, source)}; the window at step {ends[0]} "
            f"lacks {_lacking(first, nu, k, have)}"
        )
    windows = []
    for t in ends:
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
    ordered = sorted(have)
    ends = _ends(ordered, span, interval, source)
    if every is None:
        sequence = [s for s in ordered if span.start <= s <= span.end]
        _require(ends, have, source)
    else:
        if every < 1:
            raise InvalidArgumentError(f"every must be at least 1 step, got {every}")
        off = [t for t in ends if (t - span.start) % every]
        if off:
            shown = ", ".join(str(t) for t in off[:5]) + (f" and {len(off) - 5} more" if len(off) > 5 else "")
            raise InvalidArgumentError(
                f"window ends {shown} are not on the EMA sequence {span.start}, {span.start + every}, ... "
                f"(every {every} steps); make --interval a multiple of --every"
            )
        count = _count(span.start, span.end, every)
        if count > len(have):  # every member must be a checkpoint
            raise InvalidArgumentError(
                f"--every {every} over --steps {span} makes an EMA sequence of {count} steps, "
                f"but {_describe(ordered, source)}; it lacks {_lacking(span.start, every, count, have)}"
            )
        sequence = [span.start + i * every for i in range(count)]
        _require(sequence + ends, have, source)
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
    ordered = sorted(have)
    ends = _ends(ordered, span, interval, source)
    for t in ends:
        if (t - start) % every:
            raise InvalidArgumentError(
                f"window end {t} is not on the SWA grid (start {start}, every {every}); "
                "make --interval a multiple of --every"
            )
    count = _count(start, ends[-1], every) if ends else 0
    if count > len(have):  # the last window's members must all be checkpoints
        raise InvalidArgumentError(
            f"--start {start} --every {every} up to step {ends[-1]} averages {count} checkpoints, "
            f"but {_describe(ordered, source)}; it lacks {_lacking(start, every, count, have)}"
        )
    windows = []
    for t in ends:
        members = tuple(range(start, t + 1, every))
        windows.append(Window(t, members, (1.0 / len(members),) * len(members)))
    _require((s for w in windows for s in w.steps), have, source)
    return windows


def explicit_window(n_members: int, weights: Sequence[float] | None = None) -> Window:
    """``avg``: members 0..n-1 (positions, not steps) with weights normalised to sum to 1."""
    if n_members < 1:
        raise InvalidArgumentError("avg needs at least one checkpoint")
    w = [1.0] * n_members if weights is None else [float(x) for x in weights]
    if len(w) != n_members:
        raise InvalidArgumentError(f"--weights: got {len(w)} weight{'s' * (len(w) != 1)} for {n_members} checkpoints")
    return Window(n_members - 1, tuple(range(n_members)), normalise_weights(w))


def normalise_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights scaled to sum to 1; NaN, Inf, negative or all-zero weights are refused.

    Without overflow or underflow: divided by the largest weight first, then by the exact (``math.fsum``)
    sum of those ratios, so ``1e308,1e308`` is 0.5,0.5, not inf/inf = NaN or 1e308/inf = a model of zeros.
    """
    w = [float(x) for x in weights]
    bad = next((x for x in w if not math.isfinite(x)), None)
    if bad is not None:
        raise InvalidArgumentError(f"--weights must be finite numbers, got {bad} in {_listed(w)}")
    if any(x < 0 for x in w):
        raise InvalidArgumentError(f"--weights must not be negative, got {_listed(w)}")
    top = max(w, default=0.0)
    if top == 0:
        raise InvalidArgumentError(f"--weights are all zero ({_listed(w)}); give at least one positive weight")
    scaled = [x / top for x in w]  # in [0, 1] with the largest exactly 1: the sum is finite and >= 1
    total = math.fsum(scaled)
    return tuple(x / total for x in scaled)


def _listed(values: Sequence[float], limit: int = 8) -> str:
    shown = ", ".join(f"{x:g}" for x in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
