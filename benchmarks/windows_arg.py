"""The window options the contender scripts share: explicit --window lists or LAWA window ends."""

from __future__ import annotations

import argparse


def add_window_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--window", action="append", default=[], help="comma list of member steps")
    ap.add_argument("--lawa-ends", help="E1:E2 window end steps (inclusive), stride --interval")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--interval", type=int, default=1000)


def windows_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[list[int]]:
    windows = [[int(s) for s in w.split(",")] for w in args.window]
    if args.lawa_ends:
        e1, e2 = (int(x) for x in args.lawa_ends.split(":"))
        for e in range(e1, e2 + 1, args.interval):
            windows.append([e - (args.k - 1 - i) * args.interval for i in range(args.k)])
    if not windows:
        ap.error("give --window or --lawa-ends")
    return windows
