"""Which weight files of which revisions are on disk when: the order of work for runs on a Hub.

A 12B Pythia checkpoint is three ``.bin`` shards (about 10, 10 and 4 GB) and a LAWA window needs k of
them; downloading whole windows would take k x 24 GB of disk. So the work is cut into units: the
tensors of one weight file of the newest member (a "shard position"), for a consecutive range of
windows whose files for those tensors fit in the disk budget together. A unit downloads only those
files, averages those tensors into its outputs and deletes what the next unit does not need, so the
disk holds k shards, not k checkpoints, and a file shared by neighbouring windows is downloaded once.
The outputs stay open across units (their writers take tensors in any order).

``Downloads`` fetches the next unit's files while the current one is averaged, up to four files at a
time (a CDN serves each connection at a limited rate), inside the same budget: a larger budget buys
overlap, the smallest one still works. Local runs are a single unit. (Logs and the README call units
"parts".)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptavg.errors import InvalidArgumentError
from ckptavg.pipeline import ByteBudget, Workers
from ckptavg.progress import human_bytes
from ckptavg.sources import Checkpoint, EntryReader, FileTable, Reader, TensorEntry
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


class Downloads:
    """The download stage: each unit's files, ``workers`` at a time, at most one unit ahead of the
    averaging and never past the budget. ``ready(u)`` waits for unit ``u``'s files and returns where
    their tensors are; ``release(u)`` lets go of those the next unit does not use.

    The budget (a ``ByteBudget``, granted in the order files were asked for) counts what this run
    brought into the cache and still holds. The remote decides what is deleted: files that were cached
    before the run are the user's, used and never deleted.
    """

    def __init__(
        self, units: list[Unit], members: dict[int, Checkpoint], budget: ByteBudget, files: FileTable, workers: int = 4
    ) -> None:
        self.units = units
        self.members = members
        self.budget = budget
        self.files = files
        files_to_fetch = len(frozenset().union(*(u.files for u in units)))  # none for a local run: no threads
        self.pool: Workers[FileKey] = Workers(min(workers, files_to_fetch), "ckptavg-download")
        self.results = self.pool.results()
        self.asked: set[FileKey] = set()
        self.local: dict[FileKey, tuple[Path, bool]] = {}  # path, and whether it counts against the budget
        self.lock = threading.Lock()  # closing, and a late download letting go of its file, exclude each other
        self.closed = False
        self.keep = False  # set by close(): what a late download does with its file
        self.cancel = threading.Event()  # set by close(): downloads in progress stop between chunks

    def _ask(self, u: int) -> None:
        for key in sorted(self.units[u].files - self.asked):
            self.asked.add(key)
            ticket = self.budget.ticket()
            self.pool.submit(key, lambda key=key, ticket=ticket: self._fetch(key, ticket))  # type: ignore[misc]

    def _fetch(self, key: FileKey, ticket: int) -> tuple[Path, bool] | None:
        """One download, on a worker thread; None when the run ended first."""
        need = _size(self.members, key)
        if not self.budget.take(ticket, need):
            return None
        remote = self.members[key[0]].remote
        assert remote is not None
        try:
            path, fetched = remote.download(key[1], self.cancel)
        except BaseException:
            self.budget.give(need)
            raise
        if not fetched:  # in the cache already: not ours to count
            self.budget.give(need)
        with self.lock:
            if not self.closed:
                return path, fetched
        remote.done_with(key[1], keep=self.keep)  # the run ended while this download went on: let go of it here
        if fetched:
            self.budget.give(need)
        return None

    def ready(self, u: int) -> dict[int, Reader]:
        """Wait until unit ``u``'s files are here (asking for the next unit's too); readers of their tensors."""
        self._ask(u)
        if u + 1 < len(self.units):
            self._ask(u + 1)
        while not self.units[u].files <= self.local.keys():
            key, result, error = next(self.results)
            if error is not None:
                raise error
            if result is not None:
                self.local[key] = result  # type: ignore[assignment]
        entries: dict[int, dict[str, TensorEntry]] = {}
        for key in sorted(self.units[u].files):
            remote = self.members[key[0]].remote
            assert remote is not None
            entries.setdefault(key[0], {}).update(remote.local_entries(key[1], self.local[key][0]))
        return {m: EntryReader(self.files, e, self.members[m].label) for m, e in entries.items()}

    def release(self, u: int) -> None:
        """Unit ``u`` is averaged: let go of its files that the next unit does not use."""
        later = self.units[u + 1].files if u + 1 < len(self.units) else frozenset()
        for key in sorted(self.units[u].files - later):
            if key in self.local:
                self._drop(key, keep=False)

    def _drop(self, key: FileKey, *, keep: bool) -> None:
        path, fetched = self.local.pop(key)
        self.asked.discard(key)  # a later unit may need it again (another shard group of an unsharded member)
        remote = self.members[key[0]].remote
        assert remote is not None
        self.files.close(path)
        remote.done_with(key[1], keep=keep)
        if fetched:
            self.budget.give(_size(self.members, key))

    def close(self, *, keep: bool = False) -> None:
        """Stop, and let go of every file this run still holds: deleted (so that complete downloads never
        pile up outside the budget) unless ``keep``, which a run failing on a transient fault asks for so
        that the next run does not download them again. Downloads in progress are cancelled and waited for
        (a few seconds at most); one cut short stays as a partial file, which the next run continues."""
        with self.lock:
            self.closed, self.keep = True, keep
            while not self.pool.done.empty():  # finished before we closed: ours to let go of
                key, result, _ = self.pool.done.get()
                if result is not None:
                    self.local[key] = result  # type: ignore[assignment]
        self.cancel.set()
        self.budget.close()
        self.pool.close(wait=True)  # each download stops at its next chunk (or backoff); bounded joins
        for key in list(self.local):
            self._drop(key, keep=keep)
