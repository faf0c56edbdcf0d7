"""Which weight files of which revisions are on disk when: the order of work for runs on a Hub.

A 12B Pythia checkpoint is three ``.bin`` shards (about 10, 10 and 4 GB) and a LAWA window needs k of
them; downloading whole windows would take k x 24 GB of disk. So the work is cut into units: the
tensors of one weight file of the newest member (a "shard position"), for a consecutive range of
windows whose files for those tensors fit in the disk budget together. A unit downloads only those
files, averages those tensors into its outputs and deletes what the next unit does not need, so the
disk holds k shards, not k checkpoints, and a file shared by neighbouring windows is downloaded once.
The outputs stay open across units (their writers take tensors in any order).

A thread downloads the next unit's files while the current one is averaged, up to four files at a
time (a CDN serves each connection at a limited rate), inside the same budget: a larger budget buys
overlap, the smallest one still works. Local runs are a single unit. (Logs and
the README call units "parts".)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptavg.errors import InvalidArgumentError
from ckptavg.progress import human_bytes
from ckptavg.sources import Checkpoint, close_files
from ckptavg.windows import Window

FileKey = tuple[int, str]  # (member id, weight file of that member)


@dataclass(frozen=True)
class Unit:
    lo: int  # windows [lo, hi) of the job
    hi: int
    names: tuple[str, ...]  # tensors: a contiguous part of the outputs' tensor order
    offset: int  # position of names[0] in that order
    files: frozenset[FileKey]


def tensor_groups(ref: Checkpoint) -> list[list[str]]:
    """The outputs' tensor order, cut where the newest member's weight files change (local: one group)."""
    if ref.remote is None:
        return [list(ref.entries)]
    groups: dict[str, list[str]] = {}
    for name in ref.entries:
        groups.setdefault(ref.remote.file_of[name], []).append(name)
    return list(groups.values())


def plan_units(
    windows: Sequence[Window],
    members: dict[int, Checkpoint],
    groups: list[list[str]],
    budget: int | None,
    reserved: int = 0,
) -> tuple[list[Unit], int]:
    """Units in the order they run: group by group, and within a group as many consecutive windows as
    fit in ``budget`` minus ``reserved`` (config files held to the end). Default budget: what the
    largest window's files take whole, the most a user has to have free for one window anyway.
    Returns the units and the budget in bytes."""
    names = [n for g in groups for n in g]
    if not any(members[m].remote for w in windows for m in w.steps):
        return [Unit(0, len(windows), tuple(names), 0, frozenset())], 0

    def files(lo: int, hi: int, group: list[str]) -> set[FileKey]:
        return {(m, f) for w in windows[lo:hi] for m in w.steps for f in members[m].files_of(group)}

    def size(keys: set[FileKey]) -> int:
        return files_bytes(members, keys)

    whole = max(size(files(j, j + 1, names)) for j in range(len(windows)))
    limit = (budget or whole + reserved) - reserved
    units: list[Unit] = []
    offset = 0
    for group in groups:
        lo, held = 0, set[FileKey]()
        for j in range(len(windows)):
            need = files(j, j + 1, group)
            if size(need) > limit:
                shard = members[windows[j].steps[-1]].files_of(group)
                raise InvalidArgumentError(
                    f"--disk-budget {human_bytes(budget or 0)} is too small: the window for step {windows[j].end} "
                    f"needs {human_bytes(size(need) + reserved)} on disk at once ({len(need)} files, "
                    f"{', '.join(sorted(shard))} of each member"
                    + (f", plus {human_bytes(reserved)} of config and tokenizer files)" if reserved else ")")
                )
            if held and size(held | need) > limit:
                units.append(Unit(lo, j, tuple(group), offset, frozenset(held)))
                lo, held = j, set()
            held |= need
        units.append(Unit(lo, len(windows), tuple(group), offset, frozenset(held)))
        offset += len(group)
    return units, limit + reserved


def files_bytes(members: dict[int, Checkpoint], keys: Iterable[FileKey]) -> int:
    return sum(_size(members, k) for k in keys)


def _size(members: dict[int, Checkpoint], key: FileKey) -> int:
    remote = members[key[0]].remote
    assert remote is not None
    return remote.sizes[key[1]]


class Downloader:
    """Fetches each unit's files, ``workers`` at a time, at most one unit ahead of the averaging and never
    past the budget: ``ready`` waits for a unit's files, ``release`` lets go of those the next unit does
    not need.

    The budget counts what this run brought into the cache and still holds (reserved up front for a
    download in flight). The remote decides what is deleted: files that were cached before the run are
    the user's, used and never deleted.
    """

    def __init__(
        self, units: list[Unit], members: dict[int, Checkpoint], budget: int, held: int = 0, workers: int = 4
    ) -> None:
        self.units = units
        self.members = members
        self.budget = budget
        self.workers = workers  # downloads at once
        self.streams = 0
        self.threads: list[threading.Thread] = []
        self.cond = threading.Condition()
        self.local: dict[FileKey, tuple[Path, bool]] = {}  # path, and whether it counts against the budget
        self.attached: set[FileKey] = set()
        self.held = held
        self.peak = held
        self.fetched = 0  # units whose files are all here
        self.released = 0  # units done with
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="ckptavg-downloader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for u, unit in enumerate(self.units):
                with self.cond:
                    self.cond.wait_for(lambda u=u: self.closed or self.released >= u - 1)  # type: ignore[misc]
                streams: list[threading.Thread] = []
                errors: list[BaseException] = []
                for key in sorted(unit.files):
                    need = _size(self.members, key)
                    with self.cond:
                        if errors:  # one download failed: start no more, report it
                            break
                        if key in self.local:  # kept from the unit before
                            continue
                        self.cond.wait_for(  # a free stream, and room in the budget
                            lambda need=need: (
                                self.closed  # type: ignore[misc]
                                or (self.streams < self.workers and self.held + need <= self.budget)
                            )
                        )
                        if self.closed:
                            return
                        self.held += need
                        self.peak = max(self.peak, self.held)
                        self.streams += 1
                        # Started under the lock, so that close() either sees it or stops us first.
                        t = threading.Thread(target=self._fetch, args=(key, need, errors), daemon=True)
                        t.start()
                        streams.append(t)
                        self.threads = [*(x for x in self.threads if x.is_alive()), t]
                for t in streams:
                    t.join()
                if errors:
                    raise errors[0]
                with self.cond:
                    self.fetched = u + 1
                    self.cond.notify_all()
        except BaseException as e:  # raised again by ready() in the main thread
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _fetch(self, key: FileKey, need: int, errors: list[BaseException]) -> None:
        """One download, on a thread of its own: a CDN serves each connection at a limited rate."""
        remote = self.members[key[0]].remote
        assert remote is not None
        try:
            path, fetched = remote.download(key[1])
        except BaseException as e:
            with self.cond:
                self.held -= need
                self.streams -= 1
                errors.append(e)
                self.cond.notify_all()
            return
        with self.cond:
            late = self.closed  # the run ended while this download went on: let go of it here
            if not late:
                self.local[key] = (path, fetched)
            if not fetched or late:  # in the cache already (not ours to count), or let go of
                self.held -= need
            self.streams -= 1
            self.cond.notify_all()
        if late:
            close_files(path)
            remote.done_with(key[1])

    def ready(self, u: int) -> None:
        """Wait until unit ``u``'s files are here, and point its members' entries at them."""
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or self.fetched > u)
            if self.error is not None:
                raise self.error
        for key in sorted(self.units[u].files - self.attached):
            ckpt = self.members[key[0]]
            assert ckpt.remote is not None
            ckpt.remote.attach(ckpt, key[1], self.local[key][0])
            self.attached.add(key)

    def release(self, u: int) -> None:
        """Unit ``u`` is averaged: let go of its files that the next unit does not use."""
        later = self.units[u + 1].files if u + 1 < len(self.units) else frozenset()
        for key in sorted(self.units[u].files - later):
            self._drop(key)
        with self.cond:
            self.released = u + 1
            self.cond.notify_all()

    def _drop(self, key: FileKey) -> None:
        with self.cond:
            path, fetched = self.local.pop(key)
        ckpt = self.members[key[0]]
        assert ckpt.remote is not None
        if key in self.attached:
            ckpt.remote.detach(ckpt, key[1])
            self.attached.discard(key)
        close_files(path)
        ckpt.remote.done_with(key[1])
        if fetched:
            with self.cond:
                self.held -= _size(self.members, key)
                self.cond.notify_all()

    def close(self) -> None:
        """Stop, and let go of every file this run still holds (also after an error, so that complete
        downloads never pile up outside the budget). A download cut short stays as a
        ``.incomplete`` file, which the next run continues."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            threads = [self.thread, *self.threads]
        # A download in flight cannot be cut short: wait a moment, then leave it to let go of its file
        # itself when it ends (or to die with the process, leaving a partial file to continue).
        deadline = time.monotonic() + 1
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for key in list(self.local):
            self._drop(key)
