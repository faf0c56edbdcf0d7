"""Byte sizes as users write them: ``5GB``, ``500MB``, ``2GiB`` or a byte count, and their click ParamType.

Units are decimal (``GB`` = 10**9) as transformers reads ``max_shard_size``; ``KiB``/``MiB``/``GiB``/``TiB``
are binary. The number is read as a decimal, not a float, so ``1.1GB`` is exactly 1100000000 bytes and a
size too large for a 64-bit byte count is refused instead of rounding through ``inf``.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext

import click

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
LARGEST = (1 << 63) - 1  # a byte count must fit the int64 that torch, os and the index json hold it in

_SIZE = re.compile(r"(?P<sign>[+-]?)(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>[KMGT]I?B|B)?")
_EXAMPLE = "write e.g. 5GB, 500MB or 2GiB"


def parse_size(text: str, *, minimum: int = 1) -> int:
    """``5GB`` -> 5000000000. Refuses garbage, negative sizes, sizes below ``minimum`` bytes and sizes past
    int64, each with a ValueError whose message quotes the text and says what to write."""
    t = str(text).strip().upper().replace(" ", "")
    q = _shown(str(text))
    m = _SIZE.fullmatch(t)
    if m is None:
        raise ValueError(f"{q!r} is not a size; {_EXAMPLE}")
    if m["sign"] == "-" and Decimal(m["number"]) != 0:
        raise ValueError(f"{q!r} is negative; {_EXAMPLE}")
    with localcontext() as exact:
        exact.prec = 80  # every size up to LARGEST, times any unit, without rounding
        amount = Decimal(m["number"]) * UNITS[m["unit"] or ""]
    if amount > LARGEST:
        raise ValueError(f"{q!r} is too large: at most {LARGEST} bytes (8 EiB)")
    value = int(amount)  # a fraction of a byte is dropped
    if value < minimum:
        raise ValueError(f"{q!r} is {value} bytes; give at least {minimum} byte{'s' if minimum != 1 else ''}")
    return value


def _shown(text: str, limit: int = 40) -> str:
    """The text as a message quotes it: a pasted megabyte of digits is not echoed back whole."""
    return text if len(text) <= limit else f"{text[:limit]}..."


class SizeType(click.ParamType):
    """A click option of bytes: ``--max-shard-size 2GB``. Shown as SIZE in ``--help``; exit 2 on bad input."""

    name = "size"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a default given as a number gets the same checks
        try:
            return parse_size(str(value), minimum=self.minimum)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()
