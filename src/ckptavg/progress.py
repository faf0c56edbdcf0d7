"""Progress on stderr, never stdout (stdout carries only results, so pipelines can read it).

On a terminal: a Rich progress bar over bytes read. Elsewhere (job logs, CI, pipes): one plain line per
finished output, so a cluster log says what was done without carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def one_line(text: str) -> str:
    """``text`` with every character that is not printable escaped as Python writes it (``\\n``, ``\\x1b``,
    ``\\u2028``, ``\\u202e``): messages and script comments quote file and tensor names from the input, and
    a name holding a line break, a terminal escape or a bidi control must neither split the one line it is
    printed on nor drive the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Reporter:
    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, force_terminal: bool | None = None):
        self.console = Console(file=stream or sys.stderr, force_terminal=force_terminal)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.t0 = time.perf_counter()

    def start(self, total_bytes: int, outputs: int) -> None:
        self.t0 = time.perf_counter()
        if self.live:
            self.progress = Progress(
                TextColumn(f"averaging {outputs} output{'s' * (outputs != 1)}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("read", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=nbytes)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def output_done(self, path: str, detail: str, nbytes: int) -> None:
        if not self.quiet:
            secs = time.perf_counter() - self.t0
            self.console.print(
                f"ckptavg: wrote {path} ({detail}, {secs:.1f} s, {human_bytes(nbytes)} read)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"ckptavg: {message}", highlight=False, markup=False, soft_wrap=True)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
