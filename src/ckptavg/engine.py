"""The only tensor math in ckptavg: one streaming pass that produces every output of a plan.

The loop runs over tensors, and over each tensor in chunks of ``chunk`` elements; for one chunk it reads
the members in step order and feeds a reducer, which hands back the finished chunk of each output whose
window ends at that step. So every input byte is read once per run however much the windows overlap,
memory holds a few chunks rather than a model, and a chunk small enough for the CPU cache makes the
arithmetic several times faster than the same additions done on whole tensors.

Reducers keep running state instead of re-adding a checkpoint once per window it belongs to:
- uniform means (LAWA, SWA): a running sum per residue class (step mod nu); a window's sum is the running
  sum at its end minus a snapshot taken just before its first member. Sums that get subtracted are kept
  in float64, where the sum of fp16/bf16 values is exact, so the difference is exact too; windows that
  never overlap just reset the sum and accumulate in the requested dtype (float32 by default).
- EMA: ema = decay*ema + (1-decay)*x, emitted at window ends.
- explicit weights (``avg``): acc += w*x.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from ckptavg.errors import NonFiniteError
from ckptavg.sources import Checkpoint, TensorInfo
from ckptavg.windows import Window

# Names of constant buffers that transformers (and nanoGPT) keep in state dicts: copied from the newest
# member, never averaged (Pythia's fp16 masked_bias is -inf, and -inf arithmetic yields NaN).
BUFFER_SUFFIXES = (
    ".attention.bias",
    ".attention.masked_bias",
    ".rotary_emb.inv_freq",
    ".attn.bias",
    ".attn.masked_bias",
)

# Bytes of one accumulator chunk. The handful of live accumulators (running sums, snapshots, a mean)
# must stay in the CPU cache: with 8 MB float64 chunks they spilled out of a 32 MB L3, and the
# 16-window pythia-160m trajectory took 23 s instead of 15 s.
CHUNK_BYTES = 2 << 20


def is_averaged(name: str, info: TensorInfo) -> bool:
    """Float parameters are averaged; integer/bool tensors and known constant buffers are copied."""
    return info.dtype.is_floating_point and not name.endswith(BUFFER_SUFFIXES)


Sink = Callable[[int, str, int, torch.Tensor], None]  # (window index, tensor name, first element, data)


class Buffers:
    """Chunk-sized tensors reused across chunks: fresh multi-MB allocations cost page faults each time.

    Also converts inputs to the accumulator dtype through float32, because torch's direct fp16 ->
    float64 conversion runs at a fraction of the speed of fp16 -> fp32 -> fp64.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.free: dict[torch.dtype, list[torch.Tensor]] = {}
        self.scratch: dict[torch.dtype, torch.Tensor] = {}
        self.n = 0

    def take(self, dtype: torch.dtype) -> torch.Tensor:
        pool = self.free.setdefault(dtype, [])
        base = pool.pop() if pool else None
        if base is None or base.numel() < self.n:
            base = torch.empty(max(self.n, 1), dtype=dtype, device=self.device)
        return base[: self.n]

    def give(self, t: torch.Tensor | None) -> None:
        if t is not None:
            self.free.setdefault(t.dtype, []).append(t)

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        t = self.scratch.get(dtype)
        if t is None or t.numel() < self.n:
            t = self.scratch[dtype] = torch.empty(max(self.n, 1), dtype=dtype, device=self.device)
        return t[: self.n]

    def convert(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` on the device in ``dtype``, as a view of a scratch buffer (valid until the next call)."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == dtype:
            return x
        if dtype == torch.float64 and x.dtype == torch.float16:
            x = self._scratch(torch.float32).copy_(x)
        return self._scratch(dtype).copy_(x)


class Reducer:
    """Running state for one chunk of one tensor across the members of every window.

    ``feed`` returns the finished means of the windows ending at that member; they stay valid until
    the next call to ``feed`` (their buffers are then reused).
    """

    def __init__(self, windows: Sequence[Window], accumulate: torch.dtype, device: torch.device) -> None:
        self.windows = windows
        self.dtype = accumulate
        self.buffers = Buffers(device)
        self.ends: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            self.ends.setdefault(w.end, []).append(j)
        self.emitted: list[torch.Tensor] = []

    def begin(self, n: int) -> None:
        self.buffers.n = n
        self._recycle()

    def _recycle(self) -> None:
        for t in self.emitted:
            self.buffers.give(t)
        self.emitted = []

    def _emit(self, j: int, t: torch.Tensor) -> tuple[int, torch.Tensor]:
        self.emitted.append(t)
        return j, t

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        raise NotImplementedError


class UniformReducer(Reducer):
    """Uniform means over members ``stride`` steps apart (LAWA with nu = stride; SWA with every = stride)."""

    def __init__(self, windows: Sequence[Window], stride: int, accumulate: torch.dtype, device: torch.device):
        super().__init__(windows, accumulate, device)
        self.stride = stride
        self.starts: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            self.starts.setdefault(w.steps[0], []).append(j)
        # A window that opens while another of its class is open needs a snapshot to subtract: float64.
        self.overlapping = self._simulate()
        if self.overlapping:
            self.dtype = torch.float64
        self.sums: dict[int, torch.Tensor | None] = {}

    def _simulate(self) -> bool:
        open_count: dict[int, int] = {}
        for step in sorted(set(self.starts) | set(self.ends)):
            r = step % self.stride
            for _ in self.starts.get(step, ()):
                if open_count.get(r, 0):
                    return True
                open_count[r] = open_count.get(r, 0) + 1
            open_count[r] = open_count.get(r, 0) - len(self.ends.get(step, ()))
        return False

    def begin(self, n: int) -> None:
        super().begin(n)
        for t in self.sums.values():  # every window has ended: no snapshot is left
            self.buffers.give(t)
        self.sums = {}
        self.open: dict[int, int] = {}
        self.snapshots: dict[int, torch.Tensor | None] = {}

    def _shared(self, t: torch.Tensor) -> bool:
        return any(s is t for s in self.snapshots.values())

    def _release(self, t: torch.Tensor | None) -> None:
        if t is not None and not self._shared(t) and not any(s is t for s in self.sums.values()):
            self.buffers.give(t)

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        self._recycle()
        r = member % self.stride
        for j in self.starts.get(member, ()):
            if not self.open.get(r):
                old, self.sums[r] = self.sums.get(r), None  # no window of this class is open: start afresh
                self._release(old)
                self.snapshots[j] = None
            else:
                self.snapshots[j] = self.sums[r]  # the running sum is never modified in place while shared
            self.open[r] = self.open.get(r, 0) + 1
        total = self.sums.get(r)
        mixed_ok = self.dtype != torch.float64  # fp32 += fp16/bf16 in one pass is fast; float64 is not
        xs = x.to(self.buffers.device, non_blocking=True) if mixed_ok else self.buffers.convert(x, self.dtype)
        if total is None:
            self.sums[r] = self.buffers.take(self.dtype).copy_(xs)
        elif self._shared(total):
            self.sums[r] = torch.add(total, xs, out=self.buffers.take(self.dtype))
        else:
            total.add_(xs)
        out = []
        for j in self.ends.get(member, ()):
            total = self.sums[r]
            assert total is not None
            snap = self.snapshots.pop(j)
            mean = self.buffers.take(self.dtype)
            if snap is None:
                torch.div(total, len(self.windows[j].steps), out=mean)
            else:
                torch.sub(total, snap, out=mean).div_(len(self.windows[j].steps))
                self._release(snap)
            out.append(self._emit(j, mean))
            self.open[r] -= 1
        return out


class EmaReducer(Reducer):
    def __init__(self, windows: Sequence[Window], decay: float, accumulate: torch.dtype, device: torch.device):
        super().__init__(windows, accumulate, device)
        self.decay = decay
        self.first = windows[0].steps[0]
        self.state: torch.Tensor | None = None

    def begin(self, n: int) -> None:
        self.buffers.give(self.state)
        super().begin(n)
        self.state = None

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        self._recycle()
        xs = self.buffers.convert(x, self.dtype)
        if self.state is None or member == self.first:
            if self.state is None:
                self.state = self.buffers.take(self.dtype)
            self.state.copy_(xs)
        else:
            self.state.mul_(self.decay).add_(xs, alpha=1.0 - self.decay)
        return [self._emit(j, self.buffers.take(self.dtype).copy_(self.state)) for j in self.ends.get(member, ())]


class WeightedReducer(Reducer):
    """acc_j += w_j(i) * x_i for every window j holding member i: cost grows with overlap; for ``avg``."""

    def __init__(self, windows: Sequence[Window], accumulate: torch.dtype, device: torch.device):
        super().__init__(windows, accumulate, device)
        self.weights: dict[int, list[tuple[int, float]]] = {}
        for j, w in enumerate(windows):
            for step, weight in zip(w.steps, w.weights, strict=True):
                self.weights.setdefault(step, []).append((j, weight))
        self.acc: dict[int, torch.Tensor] = {}

    def begin(self, n: int) -> None:
        for t in self.acc.values():
            self.buffers.give(t)
        super().begin(n)
        self.acc = {}

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        self._recycle()
        xs = self.buffers.convert(x, self.dtype)
        out = []
        for j, weight in self.weights.get(member, ()):
            if j not in self.acc:
                self.acc[j] = torch.mul(xs, weight, out=self.buffers.take(self.dtype))
            else:
                self.acc[j].add_(xs, alpha=weight)
            if member == self.windows[j].steps[-1]:
                out.append(self._emit(j, self.acc.pop(j)))
        return out


@dataclass
class Job:
    """Everything the pass needs: who is read, what is produced, and where the chunks go."""

    windows: Sequence[Window]
    members: dict[int, Checkpoint]  # window member id (a step, or a position for avg) -> checkpoint
    names: list[str]  # tensor order of the outputs
    infos: dict[str, TensorInfo]
    reducer: Reducer
    out_dtype: Callable[[str, TensorInfo], torch.dtype]
    sink: Sink
    allow_nonfinite: bool = False
    chunk: int | None = None  # elements per chunk; default: CHUNK_BYTES of accumulator
    skip: int = 0  # tensors (in ``names`` order) already written by an earlier, killed run
    on_tensor_done: Callable[[int, int], None] | None = None  # (tensors done so far, bytes read)


def run(job: Job) -> int:
    """Stream every tensor through the reducer into the sink; returns the number of bytes read.

    The arithmetic runs on all cores but one, which is left to the reader thread: on two cores, torch's
    OpenMP threads competing with the reader (or any other process) for the second core made the same
    additions three times slower than one thread alone.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        return _run(job)
    finally:
        torch.set_num_threads(threads)


def _run(job: Job) -> int:
    chunk = job.chunk or CHUNK_BYTES // job.reducer.dtype.itemsize
    order = sorted({m for w in job.windows for m in w.steps})
    schedule: list[tuple[Checkpoint, str, int, int]] = []
    for name in job.names[job.skip :]:
        info = job.infos[name]
        if not is_averaged(name, info):
            continue
        for start in range(0, max(info.numel, 1), chunk):
            stop = min(start + chunk, info.numel)
            schedule.extend((job.members[m], name, start, stop) for m in order)
    itemsize = max((i.dtype.itemsize for i in job.infos.values()), default=1)
    reads = _Prefetch(schedule, chunk * itemsize)
    writes = _WriteBehind(job.sink, chunk * max(itemsize, 8))
    total = 0
    try:
        for index, name in enumerate(job.names):
            if index < job.skip:
                continue
            info = job.infos[name]
            done = 0
            if not is_averaged(name, info):
                done = _copy_newest(job, name, info, writes, chunk)
            else:
                dtype = job.out_dtype(name, info)
                for start in range(0, max(info.numel, 1), chunk):
                    stop = min(start + chunk, info.numel)
                    job.reducer.begin(stop - start)
                    for m in order:
                        x = next(reads)
                        done += x.numel() * x.element_size()
                        for j, mean in job.reducer.feed(m, x):
                            slot, out = writes.buffer(dtype, mean.numel())
                            out.copy_(mean)
                            if not job.allow_nonfinite and not _finite(mean, out):
                                _blame_nonfinite(job, j, name, start, stop)
                            writes.submit(slot, j, name, start, out)
            total += done
            if job.on_tensor_done:
                writes.call(functools.partial(job.on_tensor_done, index + 1, done))
        writes.close()
    finally:
        reads.close()
        writes.close(discard=True)
    return total


def _copy_newest(job: Job, name: str, info: TensorInfo, writes: _WriteBehind, chunk: int) -> int:
    buf = torch.empty(chunk * info.dtype.itemsize, dtype=torch.uint8)
    read = 0
    for j, w in enumerate(job.windows):
        newest = job.members[w.steps[-1]]
        for start in range(0, max(info.numel, 1), chunk):
            stop = min(start + chunk, info.numel)
            x = newest.read(name, start, stop, buf)
            read += x.numel() * x.element_size()
            slot, out = writes.buffer(info.dtype, x.numel())
            writes.submit(slot, j, name, start, out.copy_(x))
    return read


def _finite(acc: torch.Tensor, out: torch.Tensor) -> bool:
    """A sum is finite iff every term is (a reduction costs a fraction of an element-wise isfinite);
    a finite sum that overflows float32 sends us to the exact check."""
    return bool(torch.isfinite(acc.sum())) or bool(torch.isfinite(out).all())


def _blame_nonfinite(job: Job, j: int, name: str, start: int, stop: int) -> None:
    buf = torch.empty((stop - start) * job.infos[name].dtype.itemsize, dtype=torch.uint8)
    for m in job.windows[j].steps:
        ckpt = job.members[m]
        if not bool(torch.isfinite(ckpt.read(name, start, stop, buf)).all()):
            raise NonFiniteError(
                f"tensor '{name}' holds NaN or Inf at step {ckpt.step} ({ckpt.label}); "
                "pass --allow-nonfinite to average it anyway"
            )
    raise NonFiniteError(
        f"the average of tensor '{name}' for step {job.windows[j].end} overflows to Inf; "
        "pass --dtype float32 or --allow-nonfinite"
    )


_DONE = object()


class _WriteBehind:
    """Hands finished chunks to the sink on a thread, so that writing (which blocks once the kernel's
    dirty-page limit is reached) overlaps the arithmetic. Chunks live in a ring of slots; a slot is free
    again once written. Callables queued with ``call`` run after every chunk submitted before them
    (progress records must not claim a tensor before its bytes are written)."""

    def __init__(self, sink: Sink, slot_bytes: int, depth: int = 8):
        self.sink = sink
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self.free.put(i)
        self.jobs: queue.Queue[object] = queue.Queue()
        self.error: BaseException | None = None
        self.closed = False
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="ckptavg-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.abandoned:
            try:
                item = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                if self.error is None:
                    if callable(item):
                        item()
                    else:
                        _, j, name, start, data = cast(tuple[int, int, str, int, torch.Tensor], item)
                        self.sink(j, name, start, data)
            except BaseException as e:  # raised again in the main thread; keep draining so it never blocks
                self.error = e
            if not callable(item):
                self.free.put(item[0])  # type: ignore[index]

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def buffer(self, dtype: torch.dtype, n: int) -> tuple[int, torch.Tensor]:
        while True:
            self._check()
            try:
                slot = self.free.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        return slot, self.slots[slot][: n * dtype.itemsize].view(dtype)

    def submit(self, slot: int, j: int, name: str, start: int, data: torch.Tensor) -> None:
        self.jobs.put((slot, j, name, start, data))

    def call(self, fn: Callable[[], None]) -> None:
        self.jobs.put(fn)

    def close(self, discard: bool = False) -> None:
        """Wait for every queued write; with ``discard`` (on the way out of an error), just stop."""
        if self.closed:
            return
        if discard:
            # No queue operation here: a Ctrl-C that lands inside put() or get() in this thread can leave
            # the queue's lock taken for good, and taking it again would hang the way out. Flags only.
            self.error = self.error or _Discarded()
            self.abandoned = True
            self.thread.join(timeout=1)
            self.closed = True
            return
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        self.closed = True
        self._check()


class _Discarded(Exception):
    """Set as the writer's error when a run is abandoned, so queued writes are skipped."""


class _Prefetch:
    """Read the schedule ahead on a thread (``pread`` releases the GIL) while the caller computes.

    Buffers are recycled in a ring two longer than the queue, so the reader never overwrites the chunk
    the consumer holds.
    """

    def __init__(self, schedule: list[tuple[Checkpoint, str, int, int]], buf_bytes: int, depth: int = 6):
        self.ring = [torch.empty(buf_bytes, dtype=torch.uint8) for _ in range(depth + 2)]
        self.queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.schedule = schedule
        self.thread = threading.Thread(target=self._produce, name="ckptavg-reader", daemon=True)
        self.thread.start()

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for i, (ckpt, name, start, end) in enumerate(self.schedule):
                if not self._put(ckpt.read(name, start, end, self.ring[i % len(self.ring)])):
                    return
        except BaseException as e:  # handed to the consumer, which raises it in the main thread
            self._put(e)
            return
        self._put(_DONE)

    def __next__(self) -> torch.Tensor:
        item = self.queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=1)  # a reader blocked on a queue lock a Ctrl-C left taken: do not wait
