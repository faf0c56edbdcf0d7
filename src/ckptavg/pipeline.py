"""The stages of a run and the threads that own them (see docs/architecture.md for the picture).

    download (Hub runs) -> read -> arithmetic (the caller's thread) -> write

- ``Downloads``: a few daemon worker threads fetch each part's weight files, strictly in the order
  asked for, each first taking its bytes from a ``ByteBudget`` (the disk budget).
- ``Reads``: a few threads read the scheduled slices into a ring of buffers and hand each over, in
  schedule order, as a tagged ``Chunk`` (member, tensor, first element), which the consumer checks.
- ``Writes``: one thread hands finished chunks to the output writers, and runs progress marks after the
  chunks queued before them.

Hand-overs use ``queue.SimpleQueue`` (its ``put`` never blocks and its ``get`` is one C call, so a
Ctrl-C in the caller's thread cannot leave a lock taken) plus a ring of free buffers as the bound. There
is one way to stop: ``close()`` on each stage sets its stop flag, wakes its thread with a sentinel and
joins it for a bounded time. Nothing sleeps to poll. Worker threads are daemons, so a Ctrl-C never
waits for a download to end: its partial file stays for the next run to continue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

JOIN_SECONDS = 5.0  # bounded joins: a thread stuck in a system call is left to die with the process


def join_all(threads: list[threading.Thread]) -> None:
    """Join ``threads`` for ``JOIN_SECONDS`` in all (not each)."""
    deadline = time.monotonic() + JOIN_SECONDS
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))


class _End:
    """The sentinel that wakes a stage's thread and tells it to stop."""


END = _End()


@dataclass(frozen=True)
class Read:
    """One slice to read: elements [start, stop) of tensor ``name`` of member ``member``."""

    member: int
    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Chunk:
    """What the read stage hands over: the slice it read, and its bytes (valid until ``Reads.recycle``)."""

    read: Read
    data: torch.Tensor
    slot: int


class StageError(RuntimeError):
    """A stage handed over something other than what its consumer expected: a bug, never user input."""


class Reads:
    """Reads ``schedule`` ahead into the buffers of ``ring`` on ``workers`` threads (``pread`` releases the
    GIL) while the caller computes, and hands the chunks over in schedule order.

    A worker takes a free buffer and the next item of the schedule together, under one lock, so buffers are
    taken in schedule order: the item the caller waits for always has a buffer or is next to get one, and a
    ring of two buffers is enough for any number of workers (more let them run ahead). Chunks that arrive
    early wait in the caller's thread until their turn.
    """

    def __init__(
        self,
        schedule: list[Read],
        read: Callable[[Read, torch.Tensor], torch.Tensor],
        ring: list[torch.Tensor],
        workers: int = 1,
    ) -> None:
        if workers < 1 or len(ring) < 2:
            raise ValueError(f"Reads needs a worker and two buffers, got {workers} and {len(ring)}")
        self.schedule = schedule
        self.read = read
        self.ring = ring
        self.free: SimpleQueue[int | _End] = SimpleQueue()
        for i in range(len(ring)):
            self.free.put(i)
        self.ready: SimpleQueue[tuple[int, Chunk | BaseException] | _End] = SimpleQueue()
        self.claim = threading.Lock()
        self.claimed = 0  # schedule items taken by a worker
        self.handed = 0  # schedule items handed to the caller
        self.early: dict[int, Chunk | BaseException] = {}  # arrived before their turn (the caller's thread only)
        self.ended = 0  # workers that have stopped
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._produce, name=f"ckptavg-reader-{i}", daemon=True) for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def _next(self) -> tuple[int, int] | None:
        """A free buffer and the next schedule item, taken together; None when there is nothing more to do."""
        with self.claim:
            if self.stopping or self.claimed >= len(self.schedule):
                return None
            slot = self.free.get()
            if self.stopping or isinstance(slot, _End):
                return None
            self.claimed += 1
            return self.claimed - 1, slot

    def _produce(self) -> None:
        try:
            while (got := self._next()) is not None:
                index, slot = got
                item = self.schedule[index]
                try:
                    self.ready.put((index, Chunk(item, self.read(item, self.ring[slot]), slot)))
                except BaseException as e:  # raised again in the caller's thread, at its turn
                    self.stopping = True
                    self.ready.put((index, e))
                    return
        finally:
            self.ready.put(END)

    def take(self, expect: Read) -> Chunk:
        """The next chunk, which must be ``expect``: the consumer checks what it got."""
        index = self.handed
        while index not in self.early:
            if self.ended == len(self.threads):
                raise StageError(f"the readers ended before {expect}")
            item = self.ready.get()
            if isinstance(item, _End):
                self.ended += 1
            else:
                self.early[item[0]] = item[1]
        got = self.early.pop(index)
        self.handed += 1
        if isinstance(got, BaseException):
            raise got
        if got.read != expect:
            raise StageError(f"the reader handed over {got.read} where {expect} was due")
        return got

    def recycle(self, chunk: Chunk) -> None:
        self.free.put(chunk.slot)

    def close(self) -> None:
        self.stopping = True
        for _ in self.threads:
            self.free.put(END)
        join_all(self.threads)


@dataclass(frozen=True)
class Write:
    """A finished chunk for output ``window``: elements from ``start`` of tensor ``name``."""

    window: int
    name: str
    start: int
    data: torch.Tensor
    slot: int


class Writes:
    """Hands finished chunks to ``sink`` on a thread, so that writing (which blocks once the kernel's
    dirty-page limit is reached) overlaps the arithmetic. Marks queued with ``mark`` run after every
    chunk queued before them: a progress record never claims a tensor before its bytes were handed on."""

    def __init__(self, sink: Callable[[int, str, int, torch.Tensor], None], slot_bytes: int, depth: int = 8):
        self.sink = sink
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(depth)]
        self.free: SimpleQueue[int] = SimpleQueue()
        for i in range(depth):
            self.free.put(i)
        self.jobs: SimpleQueue[Write | Callable[[], None] | _End] = SimpleQueue()
        self.error: BaseException | None = None
        self.discard = False
        self.finished = False
        self.thread = threading.Thread(target=self._consume, name="ckptavg-writer", daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        while True:
            item = self.jobs.get()
            if isinstance(item, _End):
                return
            try:
                if self.error is None and not self.discard:
                    if isinstance(item, Write):
                        self.sink(item.window, item.name, item.start, item.data)
                    else:
                        item()
            except BaseException as e:  # raised again in the caller's thread; keep freeing slots
                self.error = e
            if isinstance(item, Write):
                self.free.put(item.slot)

    def buffer(self, dtype: torch.dtype, n: int) -> tuple[int, torch.Tensor]:
        """A free slot viewed as ``n`` elements of ``dtype`` (waits for the writer to free one)."""
        self._raise()
        slot = self.free.get()
        return slot, self.slots[slot][: n * dtype.itemsize].view(dtype)

    def put(self, slot: int, window: int, name: str, start: int, data: torch.Tensor) -> None:
        self.jobs.put(Write(window, name, start, data, slot))

    def mark(self, fn: Callable[[], None]) -> None:
        self.jobs.put(fn)

    def finish(self) -> None:
        """Wait until every queued chunk and mark has been handled; raise what the writer raised."""
        self.jobs.put(END)
        self.thread.join()
        self.finished = True
        self._raise()

    def close(self) -> None:
        """On the way out of an error: skip what is queued and stop."""
        if not self.finished:
            self.discard = True
            self.jobs.put(END)
            self.thread.join(timeout=JOIN_SECONDS)
            self.finished = True

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class ByteBudget:
    """A semaphore counted in bytes, granted strictly in ticket order: a later request never overtakes
    an earlier one, so a part's downloads are never starved by the next part's."""

    def __init__(self, limit: int, held: int = 0) -> None:
        self.limit = limit
        self.used = held
        self.peak = held
        self.next_ticket = 0  # the ticket whose turn it is
        self.issued = 0
        self.closed = False
        self.cond = threading.Condition()

    def ticket(self) -> int:
        with self.cond:
            self.issued += 1
            return self.issued - 1

    def take(self, ticket: int, nbytes: int) -> bool:
        """Wait for ``ticket``'s turn and room for ``nbytes``; False if the budget was closed instead."""
        with self.cond:
            self.cond.wait_for(lambda: self.closed or (self.next_ticket == ticket and self.used + nbytes <= self.limit))
            if self.closed:
                return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self.next_ticket += 1
            self.cond.notify_all()
            return True

    def give(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Workers(Generic[T]):
    """``n`` daemon threads running submitted calls in order; results come back on ``done`` as
    (tag, result) or (tag, exception). Daemons, unlike ``ThreadPoolExecutor``'s threads, which the
    interpreter waits for at exit: a Ctrl-C must not wait for a 10 GB download to end."""

    def __init__(self, n: int, name: str) -> None:
        self.tasks: SimpleQueue[tuple[T, Callable[[], object]] | _End] = SimpleQueue()
        self.done: SimpleQueue[tuple[T, object, BaseException | None]] = SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if isinstance(task, _End):
                return
            tag, fn = task
            try:
                self.done.put((tag, fn(), None))
            except BaseException as e:
                self.done.put((tag, None, e))

    def submit(self, tag: T, fn: Callable[[], object]) -> None:
        self.tasks.put((tag, fn))

    def results(self) -> Iterator[tuple[T, object, BaseException | None]]:
        while True:
            yield self.done.get()

    def close(self, wait: bool) -> None:
        """Stop after the calls in progress; with ``wait``, wait for them (``JOIN_SECONDS`` in all)."""
        for _ in self.threads:
            self.tasks.put(END)
        if wait:
            join_all(self.threads)
