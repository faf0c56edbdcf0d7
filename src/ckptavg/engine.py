"""The only tensor math in ckptavg: one streaming pass that produces every output of a plan.

The loop runs over tensors, and over each tensor in chunks of ``chunk`` elements; for one chunk it reads
the members in step order and feeds a reducer, which hands back the finished chunk of each output whose
window ends at that step. So every input byte is read once per run however much the windows overlap,
memory holds a few chunks rather than a model, and a chunk small enough for the CPU cache makes the
arithmetic several times faster than the same additions done on whole tensors.

Every output's bits are a function of its window and the plan alone, never of which other windows
share the run (a task of a SLURM array, a resumed run and a Hub run's parts all make a subset), so the
same command gives the same bits however it was cut. ``choose_reducer`` decides per plan:
- uniform means (LAWA, SWA) of fp16 tensors when the plan's windows overlap and that costs fewer additions
  than group sums (below; LAWA with k >= 4): a float64 running sum per residue class (step mod nu); a
  window's sum is the running sum at its end minus a snapshot taken just before its first member. Any sum
  of up to 8192 fp16 values is exact in float64 (every fp16 value is a multiple of 2**-24 below 2**16),
  so the difference is the window's exact sum wherever the running sum started: one addition per
  checkpoint, whatever k is.
- other uniform means: each group of windows that share their first member (one LAWA window; all of
  SWA's) is summed from that member in step order, in float64 when windows overlap and in
  ``--accumulate`` (float64 by default) otherwise. bf16 and fp32 sums are not exact in float64, so a
  difference of running sums would depend on where the run started; a sum from the window's own first
  member does not.
- EMA: ema = decay*ema + (1-decay)*x from the sequence's first member, emitted at window ends.
- explicit weights (``avg`` with unequal ``--weights``): acc += w*x.
Every sum starts from +0 (``0.0 + x``, as the float64 reference's ``sum`` does), so a mean of -0 members is
+0 whichever reducer made it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ckptavg.cores import available_cores
from ckptavg.errors import NonFiniteError
from ckptavg.pipeline import Chunk, Read, Reads, Writes
from ckptavg.sources import Checkpoint, Reader, TensorInfo
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

# Bytes of one accumulator chunk per compute thread. The handful of live accumulators (running sums,
# snapshots, a mean) must stay in the CPU cache: with 8 MB float64 chunks on one thread they spilled out
# of a 32 MB L3, and the 16-window pythia-160m trajectory took 23 s instead of 15 s.
CHUNK_BYTES = 2 << 20
# At most this much accumulator per chunk, whatever the threads: buffers grow with the chunk (the read ring,
# the write slots), and past 8 compute threads each takes a smaller share (torch's element-wise loops split
# down to 32K elements per thread).
MAX_CHUNK_BYTES = 16 << 20
# Reader threads at most: each read from the page cache is a memory copy (a cap; not measured beyond two cores).
MAX_READERS = 8

EXACT_FP16_TERMS = 8192  # fp16 sums of at most this many values are exact in float64 (2**13 * 2**40 = 2**53)


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

    def divide(self, total: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
        """``total / n`` into ``out``, correctly rounded on every device. CUDA divides by a CPU scalar as a
        multiplication by its reciprocal (one bit off at times), so there the divisor is a device tensor;
        the CPU divides by the scalar exactly, as it always did here."""
        if self.device.type == "cpu":
            return torch.div(total, n, out=out)
        return torch.div(total, torch.full((), n, dtype=total.dtype, device=self.device), out=out)


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

    def _fresh_sum(self, xs: torch.Tensor) -> torch.Tensor:
        """A sum's first term, as ``0.0 + x`` (where the float64 reference, Python's ``sum``, starts): a sum
        of -0 members is +0, as a difference of two equal running sums gives it, so the sign of a zero mean
        depends neither on the reducer nor on which windows a run makes."""
        return torch.add(xs, 0.0, out=self.buffers.take(self.dtype))

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        raise NotImplementedError


class RunningSumReducer(Reducer):
    """Uniform means of fp16 members ``stride`` steps apart (LAWA with nu = stride; SWA with every =
    stride) from exact float64 running sums: one addition per member, whatever the overlap."""

    def __init__(self, windows: Sequence[Window], stride: int, device: torch.device):
        super().__init__(windows, torch.float64, device)
        self.stride = stride
        self.starts: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            self.starts.setdefault(w.steps[0], []).append(j)
        self.sums: dict[int, torch.Tensor | None] = {}

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
        xs = self.buffers.convert(x, self.dtype)
        if total is None:
            self.sums[r] = self._fresh_sum(xs)
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
                self.buffers.divide(total, len(self.windows[j].steps), out=mean)
            else:
                self.buffers.divide(torch.sub(total, snap, out=mean), len(self.windows[j].steps), out=mean)
                self._release(snap)
            out.append(self._emit(j, mean))
            self.open[r] -= 1
        return out


class GroupSumReducer(Reducer):
    """Uniform means, each summed from its window's first member in step order. Windows that share their
    first member (SWA's all do) are prefixes of one sequence and share one sum: SWA costs one addition
    per member; overlapping LAWA windows cost one per window a member is in."""

    def __init__(self, windows: Sequence[Window], accumulate: torch.dtype, device: torch.device):
        super().__init__(windows, accumulate, device)
        self.groups, self.group_of = sum_groups(windows)
        self.in_groups: dict[int, list[int]] = {}
        for g, seq in enumerate(self.groups):
            for m in seq:
                self.in_groups.setdefault(m, []).append(g)
        self.sums: dict[int, torch.Tensor] = {}

    def begin(self, n: int) -> None:
        for t in self.sums.values():
            self.buffers.give(t)
        super().begin(n)
        self.sums = {}

    def feed(self, member: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        self._recycle()
        # fp32 += fp16/bf16 in one pass is fast; float64 is not, and torch refuses to promote float8 at all
        mixed_ok = self.dtype != torch.float64 and promotes(x.dtype)
        xs = x.to(self.buffers.device, non_blocking=True) if mixed_ok else self.buffers.convert(x, self.dtype)
        for g in self.in_groups.get(member, ()):
            if member == self.groups[g][0]:
                self.buffers.give(self.sums.pop(g, None))
                self.sums[g] = self._fresh_sum(xs)
            else:
                self.sums[g].add_(xs)
        out = []
        for j in self.ends.get(member, ()):
            g = self.group_of[j]
            mean = self.buffers.divide(self.sums[g], len(self.windows[j].steps), out=self.buffers.take(self.dtype))
            out.append(self._emit(j, mean))
            if member == self.groups[g][-1]:
                self.buffers.give(self.sums.pop(g))
        return out


def sum_groups(windows: Sequence[Window]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The member sequences that ``GroupSumReducer`` sums, and each window's: windows of which one is a prefix of
    the other (SWA's all) share the longer one's sum."""
    groups: list[tuple[int, ...]] = []
    group_of: list[int] = []
    for w in windows:
        g = next((i for i, seq in enumerate(groups) if _prefix(w.steps, seq) or _prefix(seq, w.steps)), None)
        if g is None:
            groups.append(w.steps)
            g = len(groups) - 1
        elif len(w.steps) > len(groups[g]):
            groups[g] = w.steps
        group_of.append(g)
    return groups, group_of


def group_additions(windows: Sequence[Window]) -> int:
    """Chunk additions (or first copies) that summing each group from its first member costs: the cost of
    ``GroupSumReducer``, against ``RunningSumReducer``'s one per member plus a subtraction per window."""
    return sum(len(g) for g in sum_groups(windows)[0])


def _prefix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def windows_overlap(windows: Sequence[Window]) -> bool:
    """Whether any checkpoint is a member of two windows."""
    seen: set[int] = set()
    for w in windows:
        if seen & set(w.steps):
            return True
        seen |= set(w.steps)
    return False


def choose_reducer(
    method: str,
    windows: Sequence[Window],
    dtype: torch.dtype,
    *,
    overlapping: bool,
    members: int,
    plan_windows: int,
    additions: int,
    stride: int,
    decay: float,
    accumulate: torch.dtype,
    allow_nonfinite: bool,
    device: torch.device,
) -> Reducer:
    """The reducer for tensors of ``dtype``: decided from the whole plan (``overlapping``; ``members`` and
    ``plan_windows``: how many checkpoints and windows it has; ``additions``: ``group_additions`` of its
    windows), never from the windows a run happens to make (``windows``).

    For fp16 both uniform reducers give every window's exact float64 sum (a sum starts from +0, so even a
    zero mean has the same sign), so the same bits; the one with fewer additions is taken:
    running sums for LAWA with k >= 4 (one per member, a subtraction per window), group sums for SWA (one
    sum, one addition per member) and for k <= 2. float64 inputs are summed in float64 whatever
    ``accumulate`` says; a uniform ``avg`` (no ``--weights``, or equal ones) is summed like a LAWA window,
    so the two give the same bits for the same members."""
    if dtype == torch.float64:  # a narrower sum would round the inputs themselves
        accumulate = torch.float64
    if method == "ema":
        return EmaReducer(windows, decay, accumulate, device)
    if method == "avg":  # a uniform avg is a sum and one division, as a LAWA window of the same members
        weighted = any(len(set(w.weights)) > 1 for w in windows)
        return (WeightedReducer if weighted else GroupSumReducer)(windows, accumulate, device)
    running = members + plan_windows < additions
    if running and overlapping and dtype == torch.float16 and not allow_nonfinite and members <= EXACT_FP16_TERMS:
        # With NaN/Inf let through, an Inf in a shared running sum would leak into windows that never held
        # it (inf - inf = nan): those plans sum each group on its own.
        return RunningSumReducer(windows, stride, device)
    return GroupSumReducer(windows, torch.float64 if overlapping else accumulate, device)


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
    members: dict[int, Checkpoint]  # window member id (a step, or a position for avg) -> its header
    names: list[str]  # tensor order of the outputs
    infos: dict[str, TensorInfo]
    reducer_for: Callable[[torch.dtype], Reducer]  # one reducer per input dtype, decided by the plan
    out_dtype: Callable[[str, TensorInfo], torch.dtype]
    sink: Sink
    readers: dict[int, Reader]  # member id -> where its bytes are read from
    allow_nonfinite: bool = False
    chunk: int | None = None  # elements per chunk; default: CHUNK_BYTES of accumulator per compute thread
    skip: int = 0  # tensors (in ``names`` order) already written by an earlier, killed run
    on_tensor_done: Callable[[int, int], None] | None = None  # (tensors done so far, bytes read)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the reducers' device
    gpu_memory: int | None = None  # --gpu-memory: most bytes of GPU memory the CUDA stage may take
    threads: int = field(default_factory=lambda: available_cores())  # --threads: cores the run may use
    by_position: bool = False  # avg: member ids are positions on the command line, not steps

    def read(self, r: Read, buf: torch.Tensor) -> torch.Tensor:
        return self.readers[r.member].read(r.name, r.start, r.stop, buf)

    def chunk_of(self, info: TensorInfo) -> int:
        """Elements per chunk: ``CHUNK_BYTES`` of accumulator for each compute thread, at most
        ``MAX_CHUNK_BYTES`` (or the caller's ``chunk``). Element-wise arithmetic gives the same bits however
        a tensor is cut."""
        chunk_bytes = min(CHUNK_BYTES * compute_share(self.threads), MAX_CHUNK_BYTES)
        return self.chunk or chunk_bytes // self.reducer_for(info.dtype).dtype.itemsize


class Stage(Protocol):
    """How chunks reach the reducers' device and finished means leave it: ``CpuStage`` here, and
    ``cuda_stage.CudaStage`` (pinned buffers, copy streams) for ``--device cuda``. The reducers are the same
    code either way, so the accumulation order, and the bits, are the same."""

    def chunk_of(self, job: Job, info: TensorInfo) -> int: ...

    def open(self, job: Job, schedule: list[Read], read_bytes: int, slot_bytes: int) -> tuple[Reads, Writes]: ...

    def load(self, got: Chunk) -> torch.Tensor: ...

    def loaded(self, got: Chunk, reads: Reads) -> None: ...

    def emit(self, job: Job, writes: Writes, j: int, name: str, span: tuple[int, int], mean: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class CpuStage:
    """The arithmetic where the bytes are: chunks are fed from the read ring and means copied into write slots."""

    def chunk_of(self, job: Job, info: TensorInfo) -> int:
        return job.chunk_of(info)

    def open(self, job: Job, schedule: list[Read], read_bytes: int, slot_bytes: int) -> tuple[Reads, Writes]:
        workers = read_workers(job.threads)
        ring = [torch.empty(read_bytes, dtype=torch.uint8) for _ in range(max(6, 2 * workers + 2))]
        return Reads(schedule, job.read, ring, workers), Writes(job.sink, slot_bytes)

    def load(self, got: Chunk) -> torch.Tensor:
        return got.data

    def loaded(self, got: Chunk, reads: Reads) -> None:
        reads.recycle(got)  # feed has copied or added it: the buffer is free again

    def emit(self, job: Job, writes: Writes, j: int, name: str, span: tuple[int, int], mean: torch.Tensor) -> None:
        dtype = job.out_dtype(name, job.infos[name])
        slot, out = writes.buffer(dtype, mean.numel())
        out.copy_(mean)
        if not job.allow_nonfinite and not _finite(mean, out, job.infos[name].dtype):
            _blame_nonfinite(job, j, name, *span)
        writes.put(slot, j, name, span[0], out)

    def close(self) -> None:
        pass


def stage_for(job: Job, averaged: list[str]) -> Stage:
    """The staging for the job's device: ``--device cuda`` gets the pipelined CUDA stage."""
    if job.device.type != "cuda":
        return CpuStage()
    from ckptavg.cuda_stage import CudaStage  # only CUDA runs pay for its import

    return CudaStage.for_job(job, averaged)


def compute_share(threads: int) -> int:
    """torch's intra-op threads out of ``threads``: half, at least one. The other half reads and writes: a
    read from the page cache is a memory copy done by the reading thread. On two cores, one compute thread
    took the 1b window in 3.1-3.9 s, two in 5.3-5.6 s, with one or two readers (issue12-cpu.md)."""
    return max(1, threads // 2)


def read_workers(threads: int) -> int:
    """Reader threads of the CPU stage: one per core, at most ``MAX_READERS``."""
    return max(1, min(MAX_READERS, threads))


@contextlib.contextmanager
def compute_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads for a run allowed ``threads`` cores (``compute_share``, no more than the cores
    there are), restored on the way out: a library caller's own setting is not ours to keep."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(compute_share(threads), available_cores()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(job: Job) -> int:
    """Stream every tensor through the reducers into the sink; returns the number of bytes read."""
    order = sorted({m for w in job.windows for m in w.steps})
    todo = [(i, n) for i, n in enumerate(job.names) if i >= job.skip]
    averaged = [n for _, n in todo if is_averaged(n, job.infos[n])]
    stage = stage_for(job, averaged)
    schedule = [
        Read(m, name, start, min(start + chunk, info.numel))
        for name in averaged
        for info, chunk in [(job.infos[name], stage.chunk_of(job, job.infos[name]))]
        for start in range(0, max(info.numel, 1), chunk)
        for m in order
    ]
    infos = [job.infos[n] for n in averaged]
    sizes = [(min(stage.chunk_of(job, i), max(i.numel, 1)), i.dtype.itemsize) for i in infos] or [(1, 1)]
    read_bytes = max(c * size for c, size in sizes)
    slot_bytes = max(c * 8 for c, _ in sizes)
    copy_chunk = job.chunk or CHUNK_BYTES // 4
    slot_bytes = max(slot_bytes, copy_chunk * max((i.dtype.itemsize for i in job.infos.values()), default=1))
    total = 0
    with contextlib.ExitStack() as stack:
        stack.callback(stage.close)
        reads, writes = stage.open(job, schedule, read_bytes, slot_bytes)
        stack.callback(reads.close)
        stack.callback(writes.close)
        for index, name in todo:
            info = job.infos[name]
            if not is_averaged(name, info):
                done = _copy_newest(job, name, info, writes, copy_chunk)
            else:
                done = _average(job, name, info, order, reads, writes, stage)
            total += done
            if job.on_tensor_done:
                writes.mark(functools.partial(job.on_tensor_done, index + 1, done))
        writes.finish()
    return total


def _average(
    job: Job, name: str, info: TensorInfo, order: list[int], reads: Reads, writes: Writes, stage: Stage
) -> int:
    reducer = job.reducer_for(info.dtype)
    chunk = stage.chunk_of(job, info)
    done = 0
    for start in range(0, max(info.numel, 1), chunk):
        stop = min(start + chunk, info.numel)
        reducer.begin(stop - start)
        for m in order:
            got = reads.take(Read(m, name, start, stop))
            done += got.data.numel() * got.data.element_size()
            finished = reducer.feed(m, stage.load(got))
            stage.loaded(got, reads)
            for j, mean in finished:
                stage.emit(job, writes, j, name, (start, stop), mean)
    return done


def _copy_newest(job: Job, name: str, info: TensorInfo, writes: Writes, chunk: int) -> int:
    buf = torch.empty(chunk * info.dtype.itemsize, dtype=torch.uint8)
    read = 0
    for j, w in enumerate(job.windows):
        for start in range(0, max(info.numel, 1), chunk):
            stop = min(start + chunk, info.numel)
            x = job.read(Read(w.steps[-1], name, start, stop), buf)
            read += x.numel() * x.element_size()
            slot, out = writes.buffer(info.dtype, x.numel())
            writes.put(slot, j, name, start, out.copy_(x))
    return read


def promotes(dtype: torch.dtype) -> bool:
    """Whether torch mixes ``dtype`` with float32 in arithmetic: it refuses for every float8 format."""
    return dtype.itemsize > 1 or not dtype.is_floating_point


def _isfinite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite``, which torch does not implement for some float8 formats (e4m3fn, the fnuz ones)."""
    return torch.isfinite(x if promotes(x.dtype) else x.float())


def holds_range(out: torch.dtype, inputs: torch.dtype) -> bool:
    """Whether every finite ``inputs`` value, and so every mean of them (which lies between the smallest and
    the largest), rounds to a finite ``out`` value: not so for ``--dtype float16`` (or bfloat16) from fp32."""
    return torch.finfo(out).max >= torch.finfo(inputs).max


def _finite(acc: torch.Tensor, out: torch.Tensor, inputs: torch.dtype) -> bool:
    """A sum is finite iff every term is (a reduction costs a fraction of an element-wise isfinite), and
    finite means fit an output that ``holds_range`` of the inputs; a finite sum that overflows float32, or
    an output of narrower range than the inputs, sends us to the exact check."""
    return (holds_range(out.dtype, inputs) and bool(torch.isfinite(acc.sum()))) or bool(_isfinite(out).all())


def _blame_nonfinite(job: Job, j: int, name: str, start: int, stop: int) -> None:
    buf = torch.empty((stop - start) * job.infos[name].dtype.itemsize, dtype=torch.uint8)
    for m in job.windows[j].steps:
        ckpt = job.members[m]
        if not bool(_isfinite(job.read(Read(m, name, start, stop), buf)).all()):
            where = f"in {ckpt.label}" if job.by_position else f"at step {ckpt.step} ({ckpt.label})"
            raise NonFiniteError(
                f"tensor '{name}' holds NaN or Inf {where}; pass --allow-nonfinite to average it anyway"
            )
    last = job.members[job.windows[j].steps[-1]]
    window = "" if job.by_position else f" for step {job.windows[j].end} ({last.label})"
    out = job.out_dtype(name, job.infos[name])
    # Finite members: either the output cannot hold their mean, or the sum overflowed its accumulator.
    wider = "a wider --dtype" if not holds_range(out, job.infos[name].dtype) else "--accumulate float64"
    raise NonFiniteError(
        f"the average of tensor '{name}'{window} overflows {str(out).removeprefix('torch.')} to Inf; "
        f"pass {wider} or --allow-nonfinite"
    )
