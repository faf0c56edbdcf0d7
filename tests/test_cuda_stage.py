"""The CUDA stage's logic, on CPU tensors: sizing, thread counts, --gpu-memory, and the staging itself run with
``HostStreams`` (no streams; events that may stay pending until waited for) giving the CPU path's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import error_line

from ckptavg import api, cuda_stage, engine
from ckptavg.cli import cli
from ckptavg.cuda_stage import HostStreams, Sizing, live_accumulators, read_depth, read_threads, size_stage
from ckptavg.errors import InvalidArgumentError, NonFiniteError, OptionError
from ckptavg.steps import StepRange
from ckptavg.windows import Window

GiB = 1 << 30
MiB = 1 << 20


# ---------------------------------------------------------------- sizing


def sizing(**kw: int | None) -> Sizing:
    args: dict = dict(free=80 * GiB, cap=None, largest=10**9, in_size=2, acc_size=8, out_size=2, live=13, cpus=16)
    args.update(kw)
    return size_stage(**args)


def test_plentiful_gpu_memory_gives_host_buffers_of_tens_of_mb():
    s = sizing()
    assert s.chunk == cuda_stage.HOST_CHUNK_BYTES // 2  # 64 MiB of fp16 per pinned read buffer
    assert (s.threads, s.read_depth, s.write_depth) == (8, 11, 4)
    assert s.device_bytes == s.chunk * (13 * 8 + 11 * 2 + 4 * 2)


def test_chunk_never_exceeds_the_largest_tensor():
    assert sizing(largest=5000).chunk == 5000


def test_gpu_memory_caps_the_chunk():
    per_element = 13 * 8 + 11 * 2 + 4 * 2
    s = sizing(cap=1 * GiB)
    assert s.chunk == GiB // per_element
    assert s.device_bytes <= GiB


def test_free_memory_less_the_reserve_bounds_the_chunk_when_below_the_cap():
    per_element = 13 * 8 + 11 * 2 + 4 * 2
    s = sizing(free=2 * GiB, cap=40 * GiB)
    assert s.chunk == (2 * GiB - cuda_stage.RESERVE_BYTES) // per_element


def test_a_cap_too_small_for_one_chunk_names_the_option_and_the_least_it_needs():
    message = r"^--gpu-memory: 1.05 MB holds no chunk of this plan; give at least 8.78 MB$"
    with pytest.raises(OptionError, match=message):
        sizing(cap=MiB)


def test_a_gpu_too_full_for_one_chunk_says_so():
    with pytest.raises(InvalidArgumentError, match=r"the GPU has .* free; .*use --device cpu"):
        sizing(free=cuda_stage.RESERVE_BYTES + 1000)


def test_a_plan_of_small_tensors_fits_a_small_cap():
    assert sizing(largest=100, cap=100 * (13 * 8 + 11 * 2 + 4 * 2)).chunk == 100


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (10, 8), (16, 8), (128, 8)])
def test_reader_threads_leave_the_caller_and_the_writer_a_core(cpus: int, threads: int):
    assert read_threads(cpus) == threads
    assert read_depth(threads) == threads + 3


def test_live_accumulators_grow_with_overlap_not_with_run_length():
    lawa = [Window(end, tuple(range(end - 4, end + 1)), (0.2,) * 5) for end in range(5, 21)]  # k=5, interval 1
    assert live_accumulators(lawa) == 2 * 5 + 1 + 3
    disjoint = [Window(e, (e - 1, e), (0.5, 0.5)) for e in (2, 4, 6, 8)]
    assert live_accumulators(disjoint) == 2 * 1 + 1 + 3


# ---------------------------------------------------------------- the staging on CPU tensors


PLANS = {
    "lawa": lambda run, out: api.plan_lawa(run, StepRange(5000, 9000), k=5, interval=1000, out=out),
    "lawa-disjoint": lambda run, out: api.plan_lawa(run, StepRange(3000, 9000), k=3, interval=3000, out=out),
    "ema": lambda run, out: api.plan_ema(run, StepRange(1000, 9000), interval=2000, out=out),
    "swa": lambda run, out: api.plan_swa(run, StepRange(3000, 9000), every=1000, interval=2000, out=out),
    "avg": lambda run, out: api.plan_avg(
        [f"{run}/step{s}" for s in (1000, 4000, 9000)], weights=[0.2, 0.3, 0.5], out=out / "avg"
    ),
}


def staged(streams: HostStreams, free: int = 8 * GiB):
    """engine.stage_for giving the CUDA stage on CPU tensors, as the test's streams."""
    made: list[cuda_stage.CudaStage] = []

    def stage_for(job: engine.Job, averaged: list[str]) -> engine.Stage:
        made.append(cuda_stage.CudaStage.for_job(job, averaged, streams=streams, free=free))
        return made[-1]

    return stage_for, made


def outputs(plan: api.Plan) -> list[bytes]:
    """The weight files' bytes (ckptavg.json differs in its time and paths)."""
    return [f.read_bytes() for p in plan.outputs for f in sorted(p.glob("*.safetensors"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(PLANS))
@pytest.mark.parametrize("eager", [True, False])
def test_the_staging_gives_the_cpu_paths_bytes(make_st_run, tmp_path: Path, monkeypatch, method, dtype, eager: bool):
    make_st_run(list(range(1000, 9001, 1000)), dtype)
    cpu = PLANS[method](str(tmp_path / "run"), tmp_path / "cpu")
    api.average(cpu, api.Options(chunk=1000))
    streams = HostStreams(eager=eager)
    stage_for, made = staged(streams)
    monkeypatch.setattr(engine, "stage_for", stage_for)
    gpu = PLANS[method](str(tmp_path / "run"), tmp_path / "staged")
    api.average(gpu, api.Options(chunk=1000))
    assert made and all(isinstance(s, cuda_stage.CudaStage) for s in made)
    assert outputs(cpu) and outputs(gpu) == outputs(cpu)


def test_the_default_chunk_is_the_stages(make_st_run, tmp_path: Path, monkeypatch):
    """Without --chunk, chunks are as large as the plan's largest tensor allows (one per tensor here)."""
    make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    cpu = PLANS["lawa"](str(tmp_path / "run"), tmp_path / "cpu")
    api.average(cpu)
    stage_for, made = staged(HostStreams(eager=False))
    monkeypatch.setattr(engine, "stage_for", stage_for)
    gpu = PLANS["lawa"](str(tmp_path / "run"), tmp_path / "staged")
    api.average(gpu)
    assert made[0].sizing.chunk == 5000  # the largest tensor (layer.w)
    assert outputs(gpu) == outputs(cpu)


def test_order_copy_then_compute_and_recycled_after_the_copy(make_st_run, tmp_path: Path, monkeypatch):
    """Each copy to the device waits for the compute that last used its buffer, the compute waits for the copy,
    and the return copy waits for the compute that made the mean; pending events are waited for before the
    buffer behind them is reused or written."""
    make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    streams = HostStreams(eager=False)
    stage_for, made = staged(streams)
    monkeypatch.setattr(engine, "stage_for", stage_for)
    api.average(PLANS["lawa"](str(tmp_path / "run"), tmp_path / "o"), api.Options(chunk=1000))
    log = streams.log
    recorded = [e[1] for e in log if e[0] == "record"]
    copies = [n for n in recorded if n.startswith("copy")]
    backs = [n for n in recorded if n.startswith("back")]
    assert copies and backs
    position = {e: i for i, e in enumerate(log)}
    for name in copies:  # the compute stream waits for every copy, right after it was queued
        assert position[("wait", "compute", name)] == position[("record", name)] + 1
    for name in backs:  # every return copy is waited for (by the writer) before its bytes are written
        assert ("sync", name) in position
    waited_by_copy = [e[2] for e in log if e[:2] == ("wait", "copy")]
    assert waited_by_copy and all(n.startswith("compute") for n in waited_by_copy)
    for e in log:  # a copy waits only for compute work recorded before it
        if e[:2] == ("wait", "copy"):
            assert position[("record", e[2])] < position[e]
    depth = made[0].sizing.read_depth
    assert len(copies) > depth  # the ring went round: buffers were reused


def test_a_nonfinite_input_is_blamed_through_the_staging(make_st_run, tmp_path: Path, monkeypatch):
    states = make_st_run([1000, 2000, 3000], torch.float32)
    from safetensors.torch import save_file

    states[2000]["layer.w"][1234] = float("inf")
    save_file(states[2000], tmp_path / "run" / "step2000" / "model.safetensors", metadata={"format": "pt"})
    stage_for, _ = staged(HostStreams(eager=False))
    monkeypatch.setattr(engine, "stage_for", stage_for)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / "o")
    with pytest.raises(NonFiniteError, match=r"tensor 'layer.w' holds NaN or Inf at step 2000"):
        api.average(plan, api.Options(chunk=1000))
    assert not (tmp_path / "o" / "step3000").exists()


def test_a_mean_too_large_for_the_output_dtype_is_refused_through_the_staging(make_st_run, tmp_path: Path, monkeypatch):
    """The GPU's check is the CPU's: a finite sum does not clear an output narrower than the inputs."""
    states = make_st_run([1000, 2000, 3000], torch.float32)
    from safetensors.torch import save_file

    for s in (1000, 2000, 3000):
        states[s]["layer.w"][1234] = 1e6
        save_file(states[s], tmp_path / "run" / f"step{s}" / "model.safetensors", metadata={"format": "pt"})
    stage_for, _ = staged(HostStreams(eager=False))
    monkeypatch.setattr(engine, "stage_for", stage_for)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / "o")
    with pytest.raises(NonFiniteError, match=r"tensor 'layer.w' for step 3000 .* overflows float16 to Inf"):
        api.average(plan, api.Options(chunk=1000, dtype="float16"))
    assert not (tmp_path / "o" / "step3000").exists()


class RecordingStreams(HostStreams):
    """``HostStreams`` that keep every host buffer they hand out (pinned ones, on a GPU)."""

    def __init__(self) -> None:
        super().__init__(eager=False)
        self.hosts: list[torch.Tensor] = []

    def host(self, nbytes: int) -> torch.Tensor:
        self.hosts.append(super().host(nbytes))
        return self.hosts[-1]


def test_the_readers_fill_the_stages_host_buffers_with_the_threads_given(make_st_run, tmp_path: Path, monkeypatch):
    make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    streams = RecordingStreams()
    stage_for, _ = staged(streams)
    opened = []

    def recording_stage_for(job: engine.Job, averaged: list[str]) -> engine.Stage:
        stage = stage_for(job, averaged)
        open_stage = stage.open

        def open_recording(*args):  # type: ignore[no-untyped-def]
            opened.append(open_stage(*args))
            return opened[-1]

        stage.open = open_recording  # type: ignore[method-assign]
        return stage

    monkeypatch.setattr(engine, "stage_for", recording_stage_for)
    plan = PLANS["lawa"](str(tmp_path / "run"), tmp_path / "staged")
    api.average(plan, api.Options(threads=6))
    reads, _ = opened[-1]
    assert len(reads.threads) == read_threads(6) == 4
    assert len(reads.ring) == read_depth(4)
    assert {b.data_ptr() for b in reads.ring} <= {h.data_ptr() for h in streams.hosts}


# ---------------------------------------------------------------- --gpu-memory


def test_gpu_memory_with_the_cpu_device_is_refused_by_the_library(make_st_run, tmp_path: Path):
    make_st_run([1000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(1000, 1000), k=1, out=tmp_path / "o")
    with pytest.raises(OptionError, match=r"^--gpu-memory: applies to --device cuda only, not --device cpu$"):
        api.average(plan, api.Options(gpu_memory=GiB))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [[], ["--device", "cpu"], ["--dry-run"]])
def test_gpu_memory_with_the_cpu_device_is_a_usage_error(make_st_run, tmp_path: Path, extra: list[str]):
    make_st_run([1000], torch.float16)
    args = ["lawa", str(tmp_path / "run"), "--steps", "1000:1000", "--k", "1", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*args, "--gpu-memory", "8GiB", *extra])
    assert "--gpu-memory: applies to --device cuda only, not --device cpu" in error_line(result, 2)


def test_gpu_memory_parses_as_a_size_with_cuda(make_st_run, tmp_path: Path):
    make_st_run([1000], torch.float16)
    args = ["lawa", str(tmp_path / "run"), "--steps", "1000:1000", "--k", "1", "--out", str(tmp_path / "o")]
    ok = CliRunner().invoke(cli, [*args, "--device", "cuda", "--gpu-memory", "8GiB", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, [*args, "--device", "cuda", "--gpu-memory", "lots"])
    assert "'lots' is not a size" in error_line(bad, 2)
