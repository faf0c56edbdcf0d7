"""The staging of ``--device cuda``: pinned host buffers, a copy stream each way, accumulators on the GPU.

    readers -> pinned ring --H2D (copy stream)--> device ring --reducers (compute stream)--> device out ring
            --D2H (return stream)--> pinned out ring -> writer thread (waits for its copy) -> sink

- Reads: ``pipeline.Reads``' reader threads fill a ring of pinned buffers of tens of MB (the ring is the bound),
  so host-to-device copies are asynchronous.
- A chunk is copied to the device buffer of its slot on the copy stream; the compute stream waits for that
  copy's event, and the next copy into that device buffer waits for the compute stream to be done with it.
  The pinned slot goes back to the readers once its copy has ended.
- The reducers run unchanged on the compute stream (the caller's current stream), so the accumulation order,
  and the bits, are the CPU path's. A finished mean is converted to the output dtype on the GPU, copied back on
  the return stream into the pinned twin of a ``pipeline.Writes`` slot, and the writer thread waits for that
  copy before it writes. The non-finite check is computed on the GPU and read there too.

Everything about streams and events goes through ``Streams``, so the same staging runs in tests on CPU tensors
with ``HostStreams`` (no streams; events that say when they were waited for), where it must give the CPU
path's bytes. What only a GPU can show (overlap, bandwidth, bits of CUDA kernels) is in benchmarks/gpu.sh.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from ckptavg import engine
from ckptavg.errors import InvalidArgumentError, OptionError
from ckptavg.pipeline import Chunk, Read, Reads, Writes
from ckptavg.progress import human_bytes
from ckptavg.sources import TensorInfo
from ckptavg.windows import Window

HOST_CHUNK_BYTES = 64 << 20  # one pinned read buffer: large enough that a copy runs at the link's speed
RESERVE_BYTES = 1 << 30  # left free on the GPU for torch itself (kernels' workspaces, the allocator's rounding)
MIN_CHUNK = 1 << 16  # elements: below this, launches and copies cost more than the bytes they move
WRITE_DEPTH = 4  # finished chunks in flight between the GPU and the writer


# ---------------------------------------------------------------- sizing (pure)


def live_accumulators(windows: Sequence[Window]) -> int:
    """Chunk-sized accumulator tensors the reducers hold at once, at most: per window open at one member a
    sum and a snapshot (or a weighted sum), a mean per window ending there, and the conversion scratch
    (float32 and float64) plus one spare."""
    open_at: dict[int, int] = {}
    ends_at: dict[int, int] = {}
    for w in windows:
        for m in w.steps:
            open_at[m] = open_at.get(m, 0) + 1
        ends_at[w.end] = ends_at.get(w.end, 0) + 1
    return 2 * max(open_at.values(), default=1) + max(ends_at.values(), default=1) + 3


def read_threads(cpus: int) -> int:
    """Reader threads out of ``cpus`` (``--threads``): every core but the caller's (which only queues GPU work)
    and the writer's, as many as the CPU stage would take from the rest (at most ``engine.MAX_READERS``)."""
    return engine.read_workers(cpus - 2)


def read_depth(threads: int) -> int:
    """Pinned read buffers: one per reader, one being copied, one being consumed, one ready ahead."""
    return threads + 3


@dataclass(frozen=True)
class Sizing:
    chunk: int  # elements per chunk
    threads: int  # reader threads
    read_depth: int  # pinned read buffers (and device buffers behind them)
    write_depth: int  # pinned write buffers (and device buffers behind them)
    device_bytes: int  # GPU memory the stage may come to hold


def size_stage(
    *,
    free: int,
    cap: int | None,
    largest: int,
    in_size: int,
    acc_size: int,
    out_size: int,
    live: int,
    cpus: int,
) -> Sizing:
    """Chunk size and ring depths from the GPU's free memory (``torch.cuda.mem_get_info``), the ``--gpu-memory``
    cap, the largest averaged tensor (elements), the widest input, accumulator and output dtypes (bytes per
    element) and the accumulators the plan keeps live (``live_accumulators``). Raises when the memory allowed
    holds no chunk of ``MIN_CHUNK`` elements (or of the largest tensor, if smaller)."""
    threads = read_threads(cpus)
    rd = read_depth(threads)
    per_element = live * acc_size + rd * in_size + WRITE_DEPTH * out_size
    budget = free - RESERVE_BYTES if cap is None else min(cap, free - RESERVE_BYTES)
    smallest = max(1, min(MIN_CHUNK, largest))
    if budget < smallest * per_element:
        need = human_bytes(smallest * per_element)
        if cap is not None and cap < free - RESERVE_BYTES:
            raise OptionError("--gpu-memory", f"{human_bytes(cap)} holds no chunk of this plan; give at least {need}")
        raise InvalidArgumentError(
            f"--device cuda: the GPU has {human_bytes(free)} free; this plan needs at least {need} more than "
            f"the {human_bytes(RESERVE_BYTES)} left to torch. Free GPU memory, or use --device cpu"
        )
    chunk = min(budget // per_element, HOST_CHUNK_BYTES // in_size, max(largest, 1))
    return Sizing(chunk, threads, rd, WRITE_DEPTH, chunk * per_element)


# ---------------------------------------------------------------- streams


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Streams(Protocol):
    """The stream machinery the stage needs: run work on the copy or the return stream, record an event on a
    stream ("copy", "compute", "back"), make a stream wait for one, and host buffers to copy through."""

    def on(self, stream: str) -> AbstractContextManager[object]: ...

    def record(self, stream: str) -> Event: ...

    def wait(self, stream: str, event: Event) -> None: ...

    def host(self, nbytes: int) -> torch.Tensor: ...

    def synchronize(self) -> None: ...


class CudaStreams:
    """Real streams on ``device``: compute is the caller's current stream (where the reducers' kernels go)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams = {
            "compute": torch.cuda.current_stream(device),
            "copy": torch.cuda.Stream(device),
            "back": torch.cuda.Stream(device),
        }

    def on(self, stream: str) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.streams[stream])

    def record(self, stream: str) -> Event:
        event = torch.cuda.Event()
        event.record(self.streams[stream])
        return event

    def wait(self, stream: str, event: Event) -> None:
        self.streams[stream].wait_event(event)  # type: ignore[arg-type]

    def host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class HostEvent:
    """An event of ``HostStreams``: done once waited for (``synchronize``), or at once when ``eager``."""

    def __init__(self, log: list[tuple[str, ...]], name: str, eager: bool) -> None:
        self.log = log
        self.name = name
        self.done = eager

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        if not self.done:
            self.log.append(("sync", self.name))
        self.done = True


class HostStreams:
    """No streams, for tests on CPU tensors: work runs at once, and ``log`` records the order the stage asked
    for (records, waits, syncs). With ``eager=False`` an event stays pending until it is waited for, so the
    stage's bookkeeping (what it recycles when) is exercised as if copies took time."""

    def __init__(self, eager: bool = True) -> None:
        self.eager = eager
        self.log: list[tuple[str, ...]] = []
        self.count = 0
        self.lock = threading.Lock()  # the writer thread synchronizes events too

    def on(self, stream: str) -> AbstractContextManager[object]:
        return nullcontext()

    def record(self, stream: str) -> Event:
        with self.lock:
            self.count += 1
            name = f"{stream}{self.count}"
            self.log.append(("record", name))
        return HostEvent(self.log, name, self.eager)

    def wait(self, stream: str, event: Event) -> None:
        assert isinstance(event, HostEvent)
        self.log.append(("wait", stream, event.name))

    def host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def synchronize(self) -> None:
        pass


# ---------------------------------------------------------------- the stage


class CudaStage:
    """``engine.Stage`` for ``--device cuda`` (see the module docstring for the picture)."""

    def __init__(self, device: torch.device, sizing: Sizing, streams: Streams, in_bytes: int, out_bytes: int):
        self.device = device
        self.sizing = sizing
        self.streams = streams
        self.in_bytes = in_bytes  # bytes of one read buffer (chunk x widest input)
        self.out_bytes = out_bytes  # bytes of one write buffer (chunk x widest output)
        self.dev_in = [torch.empty(in_bytes, dtype=torch.uint8, device=device) for _ in range(sizing.read_depth)]
        self.in_free: list[Event | None] = [None] * sizing.read_depth  # compute is done with dev_in[slot]
        self.copying: deque[tuple[Event, Chunk]] = deque()  # chunks whose host-to-device copy may not have ended
        self.dev_out: list[torch.Tensor] = []
        self.host_out: list[torch.Tensor] = []
        self.flags = torch.ones(WRITE_DEPTH, dtype=torch.bool, device=device)
        self.host_flags = streams.host(WRITE_DEPTH).view(torch.bool)
        self.pending: dict[int, tuple[Event, int, Callable[[], None]]] = {}  # host buffer address -> its copy
        self.lock = threading.Lock()

    @classmethod
    def for_job(
        cls, job: engine.Job, averaged: list[str], streams: Streams | None = None, free: int | None = None
    ) -> CudaStage:
        """Sized from the GPU's free memory; tests give CPU ``streams`` and the ``free`` bytes to size for."""
        if streams is None:
            streams = CudaStreams(job.device)
        if free is None:
            free, _ = torch.cuda.mem_get_info(job.device)
        infos = [job.infos[n] for n in averaged]
        in_size = max((i.dtype.itemsize for i in infos), default=1)
        out_size = max((job.out_dtype(n, job.infos[n]).itemsize for n in averaged), default=1)
        sizing = size_stage(
            free=free,
            cap=job.gpu_memory,
            largest=max((i.numel for i in infos), default=1),
            in_size=in_size,
            acc_size=max((job.reducer_for(i.dtype).dtype.itemsize for i in infos), default=1),
            out_size=out_size,
            live=live_accumulators(job.windows),
            cpus=job.threads,
        )
        chunk = job.chunk or sizing.chunk
        return cls(job.device, sizing, streams, chunk * in_size, chunk * out_size)

    def chunk_of(self, job: engine.Job, info: TensorInfo) -> int:
        return job.chunk or self.sizing.chunk

    def open(self, job: engine.Job, schedule: list[Read], read_bytes: int, slot_bytes: int) -> tuple[Reads, Writes]:
        ring = [self.streams.host(self.in_bytes) for _ in range(self.sizing.read_depth)]
        reads = Reads(schedule, job.read, ring, self.sizing.threads)
        # Writes' own slots carry the copied tensors (engine._copy_newest); averaged ones use the pinned twins.
        widest = max((i.dtype.itemsize for i in job.infos.values()), default=1)
        copy_bytes = (job.chunk or engine.CHUNK_BYTES // 4) * widest
        writes = Writes(self._sink(job), max(copy_bytes, 8), depth=self.sizing.write_depth)
        self.dev_out = [torch.empty(self.out_bytes, dtype=torch.uint8, device=self.device) for _ in writes.slots]
        self.host_out = [self.streams.host(self.out_bytes) for _ in writes.slots]
        return reads, writes

    def load(self, got: Chunk) -> torch.Tensor:
        """Copy the chunk to its slot's device buffer on the copy stream; the compute stream waits for it."""
        nbytes = got.data.numel() * got.data.element_size()
        dev = self.dev_in[got.slot][:nbytes].view(got.data.dtype).view(got.data.shape)
        with self.streams.on("copy"):
            free = self.in_free[got.slot]
            if free is not None:
                self.streams.wait("copy", free)
            dev.copy_(got.data, non_blocking=True)
            copied = self.streams.record("copy")
        self.streams.wait("compute", copied)
        self.copying.append((copied, got))
        return dev

    def loaded(self, got: Chunk, reads: Reads) -> None:
        """The reducer has queued its work on the chunk: its device buffer is free once that work is done, and
        the pinned buffer once its copy is. At most one chunk stays unrecycled, so the readers never starve."""
        self.in_free[got.slot] = self.streams.record("compute")
        while self.copying and (len(self.copying) > 1 or self.copying[0][0].query()):
            copied, old = self.copying.popleft()
            copied.synchronize()
            reads.recycle(old)

    def emit(
        self, job: engine.Job, writes: Writes, j: int, name: str, span: tuple[int, int], mean: torch.Tensor
    ) -> None:
        """Convert on the GPU into a device out buffer, check finiteness there, copy back on the return stream
        into the pinned twin of a write slot; the writer thread waits for that copy."""
        dtype = job.out_dtype(name, job.infos[name])
        n = mean.numel()
        slot, _ = writes.buffer(dtype, 0)  # the write ring is the bound; its slot's pinned twin holds the bytes
        out = self.dev_out[slot][: n * dtype.itemsize].view(dtype)
        out.copy_(mean)
        if not job.allow_nonfinite:  # engine._finite's test, without its host-side shortcut
            ok = engine._isfinite(out).all()
            if engine.holds_range(dtype, job.infos[name].dtype):
                ok |= torch.isfinite(mean.sum())
            self.flags[slot : slot + 1].copy_(ok.reshape(1))
        done = self.streams.record("compute")
        host = self.host_out[slot][: n * dtype.itemsize]
        with self.streams.on("back"):
            self.streams.wait("back", done)
            host.copy_(self.dev_out[slot][: n * dtype.itemsize], non_blocking=True)
            self.host_flags[slot : slot + 1].copy_(self.flags[slot : slot + 1], non_blocking=True)
            back = self.streams.record("back")
        check = (lambda: None) if job.allow_nonfinite else self._check(job, slot, j, name, span)
        with self.lock:
            self.pending[host.data_ptr()] = (back, slot, check)
        writes.put(slot, j, name, span[0], host.view(dtype))

    def _check(self, job: engine.Job, slot: int, j: int, name: str, span: tuple[int, int]) -> Callable[[], None]:
        def check() -> None:
            if not bool(self.host_flags[slot]):
                engine._blame_nonfinite(job, j, name, *span)

        return check

    def _sink(self, job: engine.Job) -> engine.Sink:
        def sink(j: int, name: str, start: int, data: torch.Tensor) -> None:
            with self.lock:
                waiting = self.pending.pop(data.data_ptr(), None)
            if waiting is not None:  # an averaged chunk: its bytes are in once its copy back has ended
                back, _, check = waiting
                back.synchronize()
                check()  # raised here, the writer hands it to the caller's thread and writes nothing more
            job.sink(j, name, start, data)

        return sink

    def close(self) -> None:
        """No copy may still run into or out of the pinned buffers when they are freed."""
        self.streams.synchronize()
