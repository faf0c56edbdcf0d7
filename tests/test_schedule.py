"""The order of work for Hub runs: units shard by shard within a budget, and the download stage.

The remote here is a folder of real files standing in for a Hub revision (the Hub path itself is tested
against the Hub-like server in test_hub.py); what is under test is the scheduling around it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptavg.errors import InvalidArgumentError
from ckptavg.pipeline import ByteBudget
from ckptavg.schedule import Downloads, Unit, plan_units, tensor_groups
from ckptavg.sources import Checkpoint, FileTable, TensorEntry, TensorInfo
from ckptavg.windows import Window

SHARDS = {"a.bin": ["x", "y"], "b.bin": ["z"]}  # two shard positions, as in an index


class FolderRemote:
    """A revision whose 'downloads' copy files into a cache folder, logging when they start."""

    def __init__(self, step: int, cache: Path, log: list[tuple[str, int, str]]):
        self.step, self.cache, self.log = step, cache, log
        self.sizes = {f: 100 for f in SHARDS}
        self.file_of = {n: f for f, names in SHARDS.items() for n in names}
        self.extras: dict[str, int] = {}

    def download(self, filename: str, cancel: object = None) -> tuple[Path, bool]:
        self.log.append(("download", self.step, filename))
        path = self.cache / f"{self.step}-{filename}"
        path.write_bytes(b"\0" * self.sizes[filename])
        return path, True

    def done_with(self, filename: str, *, keep: bool = False) -> None:
        if not keep:
            (self.cache / f"{self.step}-{filename}").unlink()

    def local_entries(self, filename: str, local: Path) -> dict[str, TensorEntry]:
        self.log.append(("located", self.step, filename))
        return {}


def members(steps: list[int], cache: Path, log: list[tuple[str, int, str]]) -> dict[int, Checkpoint]:
    info = TensorInfo((2,), torch.float16)
    out = {}
    for s in steps:
        remote = FolderRemote(s, cache, log)
        entries = {n: TensorEntry(info, Path(f)) for f, names in SHARDS.items() for n in names}
        out[s] = Checkpoint(s, f"rev{s}", "bin", entries, remote=remote)
    return out


def lawa(ends: list[int], k: int = 2) -> list[Window]:
    return [Window(e, tuple(range(e - (k - 1) * 1000, e + 1, 1000)), tuple([1 / k] * k)) for e in ends]


def test_units_go_shard_by_shard_and_group_windows_that_fit(tmp_path: Path):
    ms = members([1000, 2000, 3000, 4000], tmp_path, [])
    windows = lawa([2000, 3000, 4000])
    groups = tensor_groups(ms[4000])
    assert groups == [["x", "y"], ["z"]]
    units, budget = plan_units(windows, ms, groups, 300)  # three 100-byte files at once
    assert budget == 300
    assert [(u.lo, u.hi, u.names, u.offset) for u in units] == [
        (0, 2, ("x", "y"), 0),  # windows 2000 and 3000 share step 2000: three files
        (2, 3, ("x", "y"), 0),
        (0, 2, ("z",), 2),
        (2, 3, ("z",), 2),
    ]
    assert units[0].files == {(1000, "a.bin"), (2000, "a.bin"), (3000, "a.bin")}
    default, budget = plan_units(windows, ms, groups, None, reserved=7)
    assert budget == 2 * 200 + 7 and len(default) == 2  # one window's files whole: each shard position once
    with pytest.raises(InvalidArgumentError, match=r"--disk-budget 199 B is too small: the window for step 2000 "):
        plan_units(windows, ms, groups, 199)


def until(pred: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def downloaded(log: list[tuple[str, int, str]]) -> list[tuple[int, str]]:
    return [(s, f) for what, s, f in log if what == "download"]


def test_downloads_run_a_unit_ahead_when_the_budget_allows(tmp_path: Path):
    log: list[tuple[str, int, str]] = []
    ms = members([1000, 2000, 3000], tmp_path, log)
    units, _ = plan_units(lawa([2000, 3000]), ms, tensor_groups(ms[3000]), 200)
    assert len(units) == 4
    budget = ByteBudget(400)
    d = Downloads(units, ms, budget, FileTable())
    try:
        d.ready(0)
        assert until(lambda: (3000, "a.bin") in downloaded(log))  # unit 1's file arrives while unit 0 is averaged
        assert budget.peak == 300  # step 2000's a.bin serves both units: three files, not four
        d.release(0)
        assert not (tmp_path / "1000-a.bin").exists() and (tmp_path / "2000-a.bin").exists()  # kept for unit 1
        d.ready(1)
        d.release(1)
        assert downloaded(log).count((2000, "a.bin")) == 1
    finally:
        d.close()
    assert not list(tmp_path.iterdir())


def test_downloads_wait_for_space_when_the_budget_holds_one_unit(tmp_path: Path):
    log: list[tuple[str, int, str]] = []
    ms = members([1000, 2000, 3000], tmp_path, log)
    units, limit = plan_units(lawa([2000, 3000]), ms, tensor_groups(ms[3000]), 200)
    budget = ByteBudget(limit)
    d = Downloads(units, ms, budget, FileTable())
    try:
        d.ready(0)
        time.sleep(0.3)
        assert (3000, "a.bin") not in downloaded(log) and budget.used == 200  # it fits once 1000/a.bin goes
        d.release(0)
        d.ready(1)
        assert budget.peak == 200
    finally:
        d.close()


def test_the_budget_is_granted_in_the_order_asked_so_a_part_is_never_starved_by_the_next():
    budget = ByteBudget(100, held=60)
    first, second = budget.ticket(), budget.ticket()
    got: list[str] = []
    later = threading.Thread(target=lambda: budget.take(second, 10) and got.append("second"))
    later.start()
    time.sleep(0.1)
    assert got == []  # 10 bytes would fit, but the earlier request (50 bytes) goes first
    earlier = threading.Thread(target=lambda: budget.take(first, 50) and got.append("first"))
    earlier.start()
    time.sleep(0.1)
    assert got == []  # 60 + 50 > 100
    budget.give(60)
    earlier.join(5)
    later.join(5)
    assert got == ["first", "second"] and budget.used == 60


def test_a_failed_download_reaches_the_caller_and_nothing_stays(tmp_path: Path):
    log: list[tuple[str, int, str]] = []
    ms = members([1000, 2000], tmp_path, log)

    def broken(filename: str, cancel: object = None) -> tuple[Path, bool]:
        raise OSError(f"connection reset while downloading {filename}")

    ms[2000].remote.download = broken  # type: ignore[union-attr,method-assign]
    units, limit = plan_units(lawa([2000]), ms, tensor_groups(ms[2000]), None)
    budget = ByteBudget(limit)
    d = Downloads(units, ms, budget, FileTable())
    with pytest.raises(OSError, match="connection reset while downloading a.bin"):
        d.ready(0)
    d.close()
    assert until(lambda: not list(tmp_path.iterdir()) and budget.used == 0)


def test_a_failed_run_that_keeps_its_progress_keeps_its_downloads(tmp_path: Path):
    ms = members([1000, 2000], tmp_path, [])
    units, limit = plan_units(lawa([2000]), ms, tensor_groups(ms[2000]), None)
    d = Downloads(units, ms, ByteBudget(limit), FileTable())
    d.ready(0)
    d.close(keep=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1000-a.bin", "1000-b.bin", "2000-a.bin", "2000-b.bin"]


def test_a_unit_downloads_its_files_on_several_streams_at_once(tmp_path: Path):
    """A CDN limits each connection: files of a unit are fetched side by side, at most ``workers`` at once."""
    log: list[tuple[str, int, str]] = []
    ms = members([1000, 2000, 3000], tmp_path, log)
    together = threading.Barrier(2, timeout=5)  # passes only if two downloads are in flight at once
    lock, active, most = threading.Lock(), [0], [0]

    def side_by_side(remote: FolderRemote) -> Callable[[str, object], tuple[Path, bool]]:
        plain = remote.download

        def download(filename: str, cancel: object = None) -> tuple[Path, bool]:
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            together.wait()
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            return plain(filename)

        return download

    for c in ms.values():
        c.remote.download = side_by_side(c.remote)  # type: ignore[union-attr,method-assign,arg-type]
    units, _ = plan_units(lawa([3000], k=3), ms, [["x", "y", "z"]], None)
    d = Downloads(units, ms, ByteBudget(10**6), FileTable(), workers=2)
    try:
        d.ready(0)  # six files, two at a time: the barrier breaks (and ready raises) if they came one by one
    finally:
        d.close()
    assert most[0] == 2


def test_closing_stops_a_download_in_progress_at_once(tmp_path: Path):
    """A run that ends (an error elsewhere, Ctrl-C) cancels its downloads instead of leaving them running."""
    ms = members([1000, 2000], tmp_path, [])
    started, stopped = threading.Event(), threading.Event()

    def endless(filename: str, cancel: threading.Event | None = None) -> tuple[Path, bool]:
        started.set()
        assert cancel is not None
        if cancel.wait(30):  # a long download, checking between chunks whether its run still wants it
            stopped.set()
        raise RuntimeError("cancelled")

    ms[2000].remote.download = endless  # type: ignore[union-attr,method-assign]
    units, limit = plan_units(lawa([2000]), ms, tensor_groups(ms[2000]), None)
    d = Downloads(units, ms, ByteBudget(limit), FileTable())
    d._ask(0)
    assert started.wait(5)
    t0 = time.monotonic()
    d.close()
    assert stopped.is_set() and time.monotonic() - t0 < 2


def test_a_file_let_go_of_is_downloaded_again_when_a_later_unit_needs_it(tmp_path: Path):
    """An unsharded member's one file holds tensors of every shard group of a sharded newest member: a
    later group's unit needs again what an earlier unit let go of."""
    log: list[tuple[str, int, str]] = []
    ms = members([1000, 2000], tmp_path, log)
    a, b = (1000, "a.bin"), (2000, "a.bin")
    units = [
        Unit(0, 1, ("x",), 0, frozenset({a})),
        Unit(0, 1, ("y",), 1, frozenset({b})),
        Unit(0, 1, ("z",), 2, frozenset({a})),
    ]
    d = Downloads(units, ms, ByteBudget(100), FileTable())
    try:
        for u in range(3):
            waiter = threading.Thread(target=d.ready, args=(u,), daemon=True)
            waiter.start()
            waiter.join(5)
            assert not waiter.is_alive(), f"unit {u} never got its files"
            d.release(u)
    finally:
        d.close()
    assert downloaded(log) == [a, b, a]
