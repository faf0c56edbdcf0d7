"""Step ranges as users write them: ``21000:141000`` or ``21000:141000:3000``."""

from __future__ import annotations

from dataclasses import dataclass

import click


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
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a step range; write START:END or START:END:EVERY, e.g. 21000:141000")
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
    """``0:1:0.2`` -> [0, 0.2, 0.4, 0.6, 0.8, 1.0] (END included), or one number."""

    name = "START:END:STEP"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        parts = str(value).split(":")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not START:END:STEP, e.g. 0:1:0.2", param, ctx)
        if len(nums) == 1:
            return nums
        if len(nums) != 3 or nums[2] <= 0 or nums[1] < nums[0]:
            self.fail(f"{value!r}: write START:END:STEP with STEP > 0 and END >= START", param, ctx)
        start, end, step = nums
        n = int(round((end - start) / step))
        return [round(start + i * step, 12) for i in range(n + 1) if start + i * step <= end + 1e-9]


STEP_RANGE_FLOAT = FloatRangeType()
