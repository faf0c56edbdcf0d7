"""How a Hub repository names the revision of each step: ``--revision-pattern``.

Public trajectories name their step revisions differently: Pythia ``step143000``, the HF Trainer
``checkpoint-1000``, OLMo ``step1000-tokens4B`` (the token count changes from one revision to the next),
LLM360 ``ckpt_000``, ``ckpt_001`` ... A pattern is literal text with exactly one ``{step}`` and any number
of ``{*}``:

    step{step}                 Pythia (the default)
    checkpoint-{step}          HF Trainer
    step{step}-tokens{*}B      OLMo
    ckpt_{step:03d}            LLM360 Amber/Crystal

``{step}`` is the step number in canonical digits (``step7``, never ``step007``); ``{step:0Nd}`` is it
zero-padded to at least N digits, as Python's ``format(step, "0Nd")`` writes it (``ckpt_{step:03d}``
matches ``ckpt_007`` and ``ckpt_1234``, not ``ckpt_07``): a name matches only if formatting its step back
gives exactly its digits, so no two spellings of one step both match; a step has at most 18 significant
digits (a name with more is no step). ``{*}`` is any run of characters
but ``/``, as short as the rest of the name allows. ``{{`` and ``}}`` are literal braces.

The step is read from the name, never from the order of the revisions: LLM360's ``ckpt_005`` is step 5,
whatever training step it was saved at. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ckptavg.errors import InvalidArgumentError, InvalidRunError

_FIELD = re.compile(r"\{([^{}]*)\}")
_SPEC = re.compile(r"0([1-9][0-9]?)d|d")  # {step:d} is {step}; {step:03d} pads with zeros to 3 digits
_WILDCARD = "(?:[^/]*?)"
MAX_NAME = 255  # a revision name longer than a file name (NAME_MAX) is never a step
MAX_STEP_DIGITS = 18  # a step fits an int64; a longer digit run in a listed name is no step (int() refuses 4300+)


@dataclass(frozen=True)
class RevisionPattern:
    """A parsed ``--revision-pattern``: ``match`` gives the step a revision name stands for, or None."""

    text: str  # as the user wrote it: what messages and provenance show
    regex: re.Pattern[str]
    width: int  # zero-padded to at least this many digits ({step:0Nd}); 1 for plain {step}

    @classmethod
    def parse(cls, text: str) -> RevisionPattern:
        """Parse ``text``; anything but literal text, one ``{step}`` or ``{step:0Nd}`` and ``{*}`` is refused."""
        parts: list[str] = []
        width = 0
        at = 0
        while at < len(text):
            c = text[at]
            if text.startswith(("{{", "}}"), at):
                parts.append(re.escape(c))
                at += 2
                continue
            if c == "}":
                raise InvalidArgumentError(f"{text!r}: a lone '}}' at position {at}; write '}}}}' for a literal brace")
            if c != "{":
                parts.append(re.escape(c))
                at += 1
                continue
            m = _FIELD.match(text, at)
            if m is None:
                raise InvalidArgumentError(
                    f"{text!r}: the '{{' at position {at} is not closed; write '{{{{' for a literal brace"
                )
            field = m.group(1)
            if field == "*":
                parts.append(_WILDCARD)
            elif field == "step" or field.startswith("step:"):
                if width:
                    raise InvalidArgumentError(f"{text!r}: holds {{step}} more than once; a name has one step")
                width = _width(text, field)
                parts.append(_digits(width))
            else:
                raise InvalidArgumentError(
                    f"{text!r}: {m.group(0)!r} is not a placeholder; use {{step}}, {{step:0Nd}} (e.g. {{step:03d}}) "
                    "or {*}, and '{{' '}}' for literal braces"
                )
            at = m.end()
        if not width:
            raise InvalidArgumentError(
                f"{text!r}: needs a {{step}} placeholder, e.g. step{{step}} or ckpt_{{step:03d}}"
            )
        return cls(text, re.compile("".join(parts)), width)

    def match(self, name: str) -> int | None:
        """The step that revision ``name`` stands for, or None when the pattern does not match it."""
        if len(name) > MAX_NAME:  # no folder could be named so; and {*} patterns cost more on long names
            return None
        m = self.regex.fullmatch(name)
        if m is None or len(m.group("step").lstrip("0")) > MAX_STEP_DIGITS:  # a server's junk, never a step
            return None
        return int(m.group("step"))

    def steps(self, names: Iterable[str], where: str) -> dict[int, str]:
        """Step -> revision name, for the names that match. Two names of one step are refused (``where``
        names the run): the run would otherwise be averaged from whichever the server listed last."""
        found: dict[int, str] = {}
        for name in sorted(names):
            step = self.match(name)
            if step is None:
                continue
            if step in found:
                raise InvalidRunError(
                    where,
                    f"revisions {found[step]!r} and {name!r} both match {self.text!r} as step {step}; "
                    "give a --revision-pattern that matches one of them",
                )
            found[step] = name
        return found


def _width(text: str, field: str) -> int:
    """The least number of digits ``{step}`` or ``{step:SPEC}`` writes (1: no padding)."""
    if field == "step":
        return 1
    spec = field.removeprefix("step:")
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise InvalidArgumentError(
            f"{text!r}: {{{field}}} has the format spec {spec!r}; a step is written with {{step}} or zero-padded "
            "with {step:0Nd}, e.g. {step:03d} (no other spec)"
        )
    return int(m.group(1) or 1)


def _digits(width: int) -> str:
    """A regex group ``step`` for exactly the digit strings ``format(n, f"0{width}d")`` writes for some n >= 0:
    ``width`` digits (leading zeros allowed), or more than that without a leading zero."""
    if width == 1:
        return r"(?P<step>0|[1-9][0-9]*)"
    return rf"(?P<step>[0-9]{{{width}}}|[1-9][0-9]{{{width},}})"


DEFAULT_PATTERN = RevisionPattern.parse("step{step}")  # Pythia's branches
