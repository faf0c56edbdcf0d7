"""Step ranges as users write them: ``21000:141000`` or ``21000:141000:3000``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import click

# How a run folder names the checkpoint of a step: Pythia's ``step{N}`` and the HF Trainer's ``checkpoint-{N}``.
STEP_DIR = re.compile(r"^(?:step|checkpoint-)(\d+)$")


@dataclass(frozen=True)
class StepRange:
    """Inclusive range of training steps; ``every`` is the spacing of window ends when given."""

    start: int
    end: int
    every: int | None = None

    def __str__(self) -> str:
        tail = f":{self.every}" if self.every else ""
        return f"{self.start}:{self.end}{tail}"


def parse_step_range(text: str) -> StepRange:
    """Parse ``START:END[:EVERY]``; a single ``N`` means the one step N."""
    parts = text.strip().split(":")
    if len(text) > 80:  # not a range anyone means; and not echoed back whole
        text = text[:40] + "..."
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a step range; write START:END or START:END:EVERY, e.g. 21000:141000")
    if any(len(p.strip().lstrip("-").lstrip("0")) > 18 for p in parts):  # int64 holds every 18-digit number
        raise ValueError(f"step range {text!r} has a number of more than 18 digits, which no run reaches")
    start, end = int(parts[0]), int(parts[1])
    every = int(parts[2]) if len(parts) == 3 else None
    if start < 0:
        raise ValueError(f"step range {text!r} starts below 0")
    if end < start:
        raise ValueError(f"step range {text!r} is inverted: END ({end}) is before START ({start})")
    if every is not None and every <= 0:
        raise ValueError(f"step range {text!r}: EVERY must be positive")
    return StepRange(start, end, every)


class StepRangeType(click.ParamType):
    name = "START:END[:EVERY]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> StepRange:
        if isinstance(value, StepRange):
            return value
        try:
            return parse_step_range(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


STEP_RANGE = StepRangeType()


class FloatRangeType(click.ParamType):
    """``0:1:0.2`` -> [0, 0.2, 0.4, 0.6, 0.8, 1.0] (END included), or one number.

    Every number must be finite and within ``low..high``, and the range may hold at most ``most`` points:
    ``0:1:1e-300`` is refused from arithmetic instead of listing 10**300 of them.
    """

    name = "START:END:STEP"

    def __init__(self, low: float = -math.inf, high: float = math.inf, most: int = 10_001) -> None:
        self.low, self.high, self.most = low, high, most

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        parts = str(value).split(":")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not START:END:STEP, e.g. 0:1:0.2", param, ctx)
        if not all(math.isfinite(x) for x in nums):
            self.fail(f"{value!r}: every number must be finite", param, ctx)
        if len(nums) == 1:
            self._check_bounds(value, nums[0], nums[0], param, ctx)
            return nums
        if len(nums) != 3 or nums[2] <= 0 or nums[1] < nums[0]:
            self.fail(f"{value!r}: write START:END:STEP with STEP > 0 and END >= START", param, ctx)
        start, end, step = nums
        self._check_bounds(value, start, end, param, ctx)
        points = (end - start) / step + 1  # a float, maybe inf: compared before it becomes a count
        if not points <= self.most + 0.5:
            many = f"{points:.0f}" if points < 1e15 else f"{points:.3g}"
            self.fail(f"{value!r} makes {many} points; at most {self.most}: give a larger STEP", param, ctx)
        n = int(round((end - start) / step))
        return [round(start + i * step, 12) for i in range(n + 1) if start + i * step <= end + 1e-9]

    def _check_bounds(
        self, value: object, start: float, end: float, param: click.Parameter | None, ctx: click.Context | None
    ) -> None:
        if start < self.low or end > self.high:
            self.fail(f"{value!r}: every point must lie in {self.low:g}..{self.high:g}", param, ctx)


# alpha*A + (1-alpha)*B: both weights must be >= 0 (avg refuses negative weights), so alpha is in 0..1
STEP_RANGE_FLOAT = FloatRangeType(0.0, 1.0)
