"""SLURM job scripts: a pure function from an averaging command and job options to the text of an sbatch script.

A job script runs with the user's rights on a shared cluster, so nothing given to it is trusted as code:

- option values that become ``#SBATCH`` lines are checked against SLURM's own formats (``check_time``,
  ``check_memory``, ``check_name``) and refused otherwise, because sbatch parses those lines itself (not as
  a shell would: quotes differ between versions, an unquoted ``#`` ends the value, nothing can hold a newline);
- every word of the script body (the working folder, the interpreter, each argument) goes through
  ``shell_quote``, so bash sees it as one word whatever bytes it holds;
- comments are one line each: anything not printable is shown escaped.

``job_script(...)`` returns the text; the ``ckptavg slurm`` command prints it or hands it to sbatch.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from typing import Literal

import click

from ckptavg.errors import OptionError

MAX_CPUS = 4096
TokenSource = Literal["file", "environment", "required"]

# SLURM's time formats (man sbatch, --time): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; and "UNLIMITED" or "INFINITE" (any case), as sbatch takes them.
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite", re.IGNORECASE)
# SLURM's memory sizes: a whole number of megabytes, or of K, M, G or T (sbatch also takes 4g and 4GB).
_MEMORY = re.compile(r"\d+([KMGT]B?)?", re.IGNORECASE)
# What sbatch's #SBATCH parser treats as more than a character: quotes, an escape, a comment.
_SBATCH_SPECIAL = "#'\"\\"


def check_time(value: str, option: str = "--time") -> str:
    """A SLURM time limit, as given; OptionError naming ``option`` if sbatch would not read it as one."""
    if not _TIME.fullmatch(value):
        raise OptionError(
            option,
            f"{value!r} is not a SLURM time: give minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED",
        )
    return value


def check_memory(value: str, option: str = "--mem") -> str:
    """A SLURM memory size (``4096``, ``4G``, ``512M``), as given; OptionError naming ``option`` otherwise."""
    if not _MEMORY.fullmatch(value):
        raise OptionError(
            option, f"{value!r} is not a SLURM memory size: give a whole number with an optional K, M, G or T, e.g. 4G"
        )
    return value


def check_name(value: str, option: str = "--job-name") -> str:
    """A partition or job name that an ``#SBATCH`` line holds as is: printable ASCII, no space, no # ' " \\."""
    bad = [c for c in value if not ("!" <= c <= "~") or c in _SBATCH_SPECIAL]
    if not value or bad:
        what = "is empty" if not value else f"holds {bad[0]!r}"
        raise OptionError(
            option,
            f"{value!r} {what}: a SLURM name here must be printable ASCII without spaces, control characters "
            f"or any of # ' \" \\",
        )
    return value


def check_cpus(value: int, option: str = "--cpus") -> int:
    if not 1 <= value <= MAX_CPUS:
        raise OptionError(option, f"{value} is not in the range 1..{MAX_CPUS}")
    return value


def shell_quote(word: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``word`` as one bash word on one line, whatever bytes it holds (a str from the OS may carry surrogates).

    Printable text is quoted by ``shlex.quote``. Anything else (a newline, a control character, bytes that
    are not UTF-8) is written as bash's ``$'...'`` with every such byte as ``\\xHH``, so the script stays
    one command per line and valid UTF-8, and bash gives the program the exact bytes. NUL cannot be in an
    argument or a path: ValueError.
    """
    raw = os.fsencode(word)
    if b"\0" in raw:
        raise ValueError(f"{raw!r} holds a NUL byte, which no argument or path can")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return shlex.quote(text)
    out = []
    for b in raw:
        if b in (0x27, 0x5C):  # ' and \
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "$'" + "".join(out) + "'"


def _token_lines(token: TokenSource | None) -> list[str]:
    """How the job gets its Hub token: never in the script."""
    if token is None:
        return []
    if token == "file":
        return ["# Hub token: the job reads it from the --token-file below when it runs (it is not in this script)"]
    lines = [
        "# Hub token: not in this script. The job reads HF_TOKEN from the environment sbatch passes on:",
        "# export HF_TOKEN=... (or HF_TOKEN=$(cat ~/.cache/huggingface/token)) before sbatch, or give the",
        "# command --token-file PATH instead.",
    ]
    if token == "required":
        lines.append(
            ': "${HF_TOKEN:?this job needs a Hub token: export HF_TOKEN=... before sbatch, or use --token-file}"'
        )
    return lines


def job_script(
    command: Sequence[str | bytes | os.PathLike[str] | os.PathLike[bytes]],
    *,
    tasks: int,
    workdir: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    job_name: str,
    cpus: int = 2,
    mem: str = "2G",
    time: str | None = None,
    partition: str | None = None,
    summary: str = "",
    token: TokenSource | None = None,
    options_at: int | None = None,
) -> str:
    """The sbatch script that runs ``command`` (its argv, interpreter first) as an array of ``tasks`` tasks.

    Each task runs ``command`` with ``--task-index "$SLURM_ARRAY_TASK_ID" --num-tasks TASKS`` inserted at index
    ``options_at`` (default: the end; ``ckptavg slurm`` inserts them right after the subcommand's name, before any
    ``--`` that ends the options). It runs in ``workdir``, which the body enters with ``cd --`` (a shell-quoted
    word: any folder name works). The folder is also given as ``#SBATCH --chdir`` (where SLURM writes the task's
    log) when sbatch reads it back as it is (see ``_sbatch_path``); otherwise the log goes to the folder sbatch is
    run from, and a comment says so. ``summary`` is a comment; ``token`` says how the job gets a Hub token (never
    written here). Options are checked as ``check_*`` do (OptionError).
    """
    if tasks < 1:
        raise OptionError("--num-tasks", f"{tasks} is below 1")
    check_cpus(cpus)
    check_memory(mem)
    check_name(job_name, "--job-name")
    if time is not None:
        check_time(time)
    if partition is not None:
        check_name(partition, "--partition")
    if not command:
        raise ValueError("no command to run")
    from ckptavg.progress import one_line

    chdir = _sbatch_path(os.fsdecode(workdir))
    header = [
        "#!/bin/bash",
        *([f"# {one_line(summary)}"] if summary else []),
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{tasks - 1}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}",
        *([f"#SBATCH --chdir={chdir}"] if chdir else []),
        *([f"#SBATCH --partition={partition}"] if partition is not None else []),
        *([f"#SBATCH --time={time}"] if time is not None else []),
        *([] if chdir else [f"# No --chdir: {_NO_CHDIR}"]),
    ]
    at = len(command) if options_at is None else options_at
    words = [shell_quote(w) for w in command]
    words[at:at] = ['--task-index "$SLURM_ARRAY_TASK_ID"', f"--num-tasks {tasks}"]
    body = [
        "set -euo pipefail",  # the first command: sbatch reads no #SBATCH line after it
        f"cd -- {shell_quote(workdir)}",
        *_token_lines(token),
        f"exec {' '.join(words)}",
    ]
    return "\n".join(header + body) + "\n"


_NO_CHDIR = "sbatch cannot read this folder's name from an #SBATCH line, so logs go to the folder sbatch runs in."


def _sbatch_path(folder: str) -> str | None:
    """``folder`` as an ``#SBATCH`` value, or None where sbatch might not read it back as it is.

    sbatch splits #SBATCH values at spaces unless they are in double quotes, ends them at an unquoted #,
    and (depending on its version) treats ' and \\ specially; some SLURM fields expand % patterns. So a
    folder goes there only if it is printable ASCII without " ' \\ # %, double-quoted if it has a space.
    """
    if not folder.startswith("/") or not folder.isascii() or not folder.isprintable():
        return None
    if any(c in "\"'\\#%" for c in folder):
        return None
    return f'"{folder}"' if " " in folder else folder


class _Checked(click.ParamType):
    """A click option type from one of the ``check_*`` functions: a bad value is a usage error naming the option."""

    def __init__(self, name: str, check: Callable[[str, str], str]) -> None:
        self.name = name
        self._check = check

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        option = param.opts[0] if param is not None and param.opts else "value"
        try:
            return self._check(str(value), option)
        except OptionError as e:
            self.fail(e.detail, param, ctx)


SLURM_TIME = _Checked("TIME", check_time)
SLURM_MEMORY = _Checked("SIZE", check_memory)
SLURM_NAME = _Checked("NAME", check_name)
