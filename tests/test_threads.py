"""--threads and the read stage's workers: chunks reach the arithmetic in schedule order however the readers
race, errors surface at their turn, and the bytes of an output never depend on how many threads made it."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import error_line, weight_bytes

from ckptavg import api, cores, engine, pipeline
from ckptavg.cli import cli
from ckptavg.errors import OptionError
from ckptavg.pipeline import Read, Reads, StageError
from ckptavg.steps import StepRange

# ---------------------------------------------------------------- the read stage


def schedule(n: int) -> list[Read]:
    return [Read(i % 3, f"t{i // 3}", i, i + 1) for i in range(n)]


def racing_read(seed: int, fail_at: int | None = None, error: BaseException | None = None):  # type: ignore[no-untyped-def]
    """A read that takes a random while, so several workers finish out of order, and fills the buffer with
    its item's index; at item ``fail_at`` it raises ``error`` instead."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def read(r: Read, buf: torch.Tensor) -> torch.Tensor:
        with lock:
            pause = rng.random() * 0.004
        time.sleep(pause)
        if r.start == fail_at:
            assert error is not None
            raise error
        return buf.view(torch.int64).fill_(r.start)

    return read


def ring(depth: int, nbytes: int = 64) -> list[torch.Tensor]:
    return [torch.empty(nbytes, dtype=torch.uint8) for _ in range(depth)]


@contextlib.contextmanager
def reading(items: list[Read], read, depth: int, workers: int):  # type: ignore[no-untyped-def]
    """A started read stage over ``items`` with ``depth`` buffers, closed on the way out."""
    reads = Reads(items, read, [torch.empty(8, dtype=torch.uint8) for _ in range(depth)], workers)
    try:
        yield reads
    finally:
        reads.close()


@pytest.mark.parametrize(("workers", "depth"), [(1, 2), (4, 2), (4, 10), (8, 3)])
def test_chunks_are_handed_over_in_schedule_order_however_the_workers_race(workers: int, depth: int):
    items = schedule(60)
    with reading(items, racing_read(workers * 100 + depth), depth, workers) as reads:
        for item in items:
            got = reads.take(item)
            assert int(got.data[0]) == item.start  # the bytes are the ones read for this item
            reads.recycle(got)
    assert all(not t.is_alive() for t in reads.threads)


def test_a_failed_read_is_raised_at_its_turn_after_the_chunks_before_it():
    items = schedule(20)

    def read(r: Read, buf: torch.Tensor) -> torch.Tensor:
        if r.start == 7:
            raise OSError(f"cannot read slice {r.start}")
        time.sleep(0.001 * (r.start % 3))
        return buf[:8].view(torch.int64).fill_(r.start)

    with reading(items, read, 6, 4) as reads:
        for item in items[:7]:
            reads.recycle(reads.take(item))
        with pytest.raises(OSError, match="cannot read slice 7"):
            reads.take(items[7])


def test_a_chunk_other_than_the_one_due_is_a_stage_error():
    items = schedule(3)
    with reading(items, racing_read(1), 2, 2) as reads:
        with pytest.raises(StageError, match="where Read"):
            reads.take(items[1])


def test_asking_past_the_schedule_is_a_stage_error():
    items = schedule(2)
    with reading(items, racing_read(2), 2, 3) as reads:
        for item in items:
            reads.recycle(reads.take(item))
        with pytest.raises(StageError, match="the readers ended before"):
            reads.take(Read(0, "t9", 0, 1))


def test_close_stops_workers_waiting_for_a_buffer():
    items = schedule(50)
    with reading(items, racing_read(3), 2, 4) as reads:
        reads.take(items[0])  # never recycled: every worker ends up waiting for a buffer
        time.sleep(0.05)
    assert all(not t.is_alive() for t in reads.threads)


@pytest.mark.parametrize(("workers", "depth"), [(0, 4), (2, 1)])
def test_a_stage_without_a_worker_or_two_buffers_is_refused(workers: int, depth: int):
    with pytest.raises(ValueError, match="a worker and two buffers"):
        Reads(schedule(1), racing_read(4), [torch.empty(8, dtype=torch.uint8) for _ in range(depth)], workers)


@pytest.mark.parametrize(("workers", "depth"), [(8, 2), (4, 3), (2, 2)])
def test_a_consumer_holding_one_chunk_like_the_cuda_stage_never_sees_it_overwritten(workers: int, depth: int):
    """The CUDA stage recycles a chunk only after taking the next: with a ring of two and many workers, the
    held chunk's bytes must stay the ones read for it, and nothing deadlocks."""
    sched = schedule(80)
    reads = Reads(sched, racing_read(workers + depth), ring(depth), workers)
    try:
        held = None
        for item in sched:
            got = reads.take(item)
            if held is not None:
                assert bool((held.data == held.read.start).all()), "a held chunk was overwritten"
                reads.recycle(held)
            assert bool((got.data == item.start).all())
            held = got
    finally:
        reads.close()
    assert not any(t.is_alive() for t in reads.threads)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), MemoryError("x")], ids=repr)
def test_a_base_exception_in_a_worker_is_raised_at_its_turn(error: BaseException):
    sched = schedule(12)
    reads = Reads(sched, racing_read(5, fail_at=6, error=error), ring(4), 4)
    try:
        for item in sched[:6]:
            reads.recycle(reads.take(item))
        with pytest.raises(type(error)):
            reads.take(sched[6])
    finally:
        reads.close()
    assert not any(t.is_alive() for t in reads.threads)


def test_a_failure_while_the_other_workers_wait_for_a_buffer_the_caller_holds():
    """Ring of two, the caller holds chunk 0 unrecycled; chunk 1 fails; workers are all waiting for a buffer."""
    sched = schedule(10)
    reads = Reads(sched, racing_read(6, fail_at=1, error=OSError("bad sector")), ring(2), 6)
    t0 = time.monotonic()
    try:
        first = reads.take(sched[0])
        with pytest.raises(OSError, match="bad sector"):
            reads.take(sched[1])
        assert bool((first.data == 0).all())
    finally:
        reads.close()
    assert time.monotonic() - t0 < 2
    assert not any(t.is_alive() for t in reads.threads)


@pytest.mark.parametrize("workers", [1, 5])
def test_an_empty_schedule_and_more_workers_than_schedule(workers: int):
    reads = Reads([], racing_read(7), ring(2), workers)
    with pytest.raises(StageError, match="ended before"):
        reads.take(Read(0, "t", 0, 1))
    reads.close()
    sched = schedule(2)
    reads = Reads(sched, racing_read(8), ring(2), 16)
    try:
        for item in sched:
            reads.recycle(reads.take(item))
    finally:
        reads.close()
    assert not any(t.is_alive() for t in reads.threads)


def test_close_while_a_worker_is_inside_read_returns_and_the_worker_then_ends(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pipeline, "JOIN_SECONDS", 0.2)
    inside, release = threading.Event(), threading.Event()

    def read(r: Read, buf: torch.Tensor) -> torch.Tensor:
        if r.start == 1:
            inside.set()
            release.wait(10)
        return buf.view(torch.int64).fill_(r.start)

    sched = schedule(6)
    reads = Reads(sched, read, ring(3), 3)
    reads.recycle(reads.take(sched[0]))
    assert inside.wait(5)
    t0 = time.monotonic()
    reads.close()
    assert time.monotonic() - t0 < 2
    release.set()
    for t in reads.threads:
        t.join(5)
    assert not any(t.is_alive() for t in reads.threads)


def test_ctrl_c_in_the_caller_while_it_waits_for_a_chunk_then_close():
    """SIGINT reaches the main thread blocked in take(); close() must then stop every worker."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    release = threading.Event()

    def read(r: Read, buf: torch.Tensor) -> torch.Tensor:
        if r.start == 2:
            release.wait(10)
        return buf.view(torch.int64).fill_(r.start)

    sched = schedule(20)
    reads = Reads(sched, read, ring(3), 4)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for item in sched:
                reads.recycle(reads.take(item))
    finally:
        timer.cancel()
        release.set()
        reads.close()
    assert not any(t.is_alive() for t in reads.threads)


# ---------------------------------------------------------------- how threads are shared out


@pytest.mark.parametrize(
    ("threads", "compute", "readers"), [(1, 1, 1), (2, 1, 2), (3, 1, 3), (4, 2, 4), (16, 8, 8), (64, 32, 8)]
)
def test_half_the_threads_compute_and_up_to_eight_read(threads: int, compute: int, readers: int):
    assert engine.compute_share(threads) == compute
    assert engine.read_workers(threads) == readers


def test_torch_threads_are_set_for_the_run_and_restored_after_it():
    before = torch.get_num_threads()
    with engine.compute_threads(6):
        assert torch.get_num_threads() == min(3, cores.available_cores())
    with engine.compute_threads(4096):  # never more torch threads than cores
        assert torch.get_num_threads() == cores.available_cores()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("threads", "chunk_bytes"), [(1, 2 << 20), (8, 8 << 20), (16, 16 << 20), (4096, 16 << 20)])
def test_a_chunk_holds_two_mib_of_accumulator_per_compute_thread_up_to_16(
    make_st_run, tmp_path: Path, threads: int, chunk_bytes: int
):
    make_st_run([1000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(1000, 1000), k=1, out=tmp_path / "o")
    info = plan.members[1000].entries["layer.w"].info
    job = engine.Job(
        windows=plan.windows,
        members=plan.members,
        names=["layer.w"],
        infos={"layer.w": info},
        reducer_for=lambda dtype: engine.GroupSumReducer(plan.windows, torch.float32, torch.device("cpu")),
        out_dtype=lambda name, info: info.dtype,
        sink=lambda *a: None,
        readers={},
        threads=threads,
    )
    assert job.chunk_of(info) == chunk_bytes // 4  # float32 accumulators


# ---------------------------------------------------------------- the bytes do not depend on --threads


BIG = {"big": (700_000,), "small": (3,), "scalar": ()}  # 700K elements: several 2 MiB chunks at 1 thread


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_thread_and_many_make_the_same_bytes(make_st_run, tmp_path: Path, dtype: torch.dtype):
    make_st_run([1000, 2000, 3000, 4000, 5000], dtype, shapes=BIG)
    digests = []
    for threads in ("1", "2", "7"):
        out = tmp_path / f"t{threads}"
        args = ["lawa", str(tmp_path / "run"), "--steps", "3000:5000", "--k", "3", "--interval", "1000"]
        result = CliRunner().invoke(cli, [*args, "--out", str(out), "--threads", threads])
        assert result.exit_code == 0, result.output
        digests.append(weight_bytes(out))
    assert len(digests[0]) == 3 and digests[0] == digests[1] == digests[2]


def test_ema_and_avg_do_not_depend_on_threads_either(make_st_run, tmp_path: Path):
    make_st_run([1000, 2000, 3000], torch.bfloat16, shapes=BIG)
    run = str(tmp_path / "run")
    for cmd in (["ema", run, "--steps", "1000:3000", "--decay", "0.9"], ["avg", f"{run}/step1000", f"{run}/step3000"]):
        digests = []
        for threads in ("1", "5"):
            out = tmp_path / f"{cmd[0]}{threads}"
            result = CliRunner().invoke(cli, [*cmd, "--out", str(out), "--threads", threads])
            assert result.exit_code == 0, result.output
            digests.append(weight_bytes(out))
        assert digests[0] and digests[0] == digests[1]


@pytest.mark.parametrize("value", ["0", "-2", "two", "4097", str(10**9)])
def test_threads_outside_1_to_4096_is_a_usage_error(make_st_run, tmp_path: Path, value: str):
    make_st_run([1000], torch.float16)
    args = ["lawa", str(tmp_path / "run"), "--steps", "1000:1000", "--k", "1", "--out", str(tmp_path / "o")]
    line = error_line(CliRunner().invoke(cli, [*args, "--threads", value]), code=2)
    assert "--threads" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("threads", [0, 10**9])
def test_the_library_refuses_threads_outside_1_to_4096(make_st_run, tmp_path: Path, threads: int):
    make_st_run([1000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(1000, 1000), k=1, out=tmp_path / "o")
    with pytest.raises(OptionError, match=rf"^--threads: {threads} is not in the range 1\.\.4096$"):
        api.average(plan, api.Options(threads=threads))
    assert not (tmp_path / "o").exists()


def test_a_run_leaves_the_callers_torch_threads_as_they_were(make_st_run, tmp_path: Path):
    make_st_run([1000, 2000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(2000, 2000), k=2, out=tmp_path / "o")
    before = torch.get_num_threads()
    api.average(plan, api.Options(threads=4))
    assert torch.get_num_threads() == before
