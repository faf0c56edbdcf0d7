"""The CUDA path (--device cuda) gives the CPU path's results. GPU tests skip where torch sees no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptavg import api
from ckptavg.steps import StepRange

PLANS = {
    "lawa": lambda run, out: api.plan_lawa(run, StepRange(5000, 9000), k=5, interval=1000, out=out),
    "ema": lambda run, out: api.plan_ema(run, StepRange(1000, 9000), interval=2000, out=out),
    "swa": lambda run, out: api.plan_swa(run, StepRange(3000, 9000), every=1000, interval=2000, out=out),
    "avg": lambda run, out: api.plan_avg(
        [f"{run}/step{s}" for s in (1000, 4000, 9000)], weights=[0.2, 0.3, 0.5], out=out / "avg"
    ),
}


def weights(plan: api.Plan) -> list[bytes]:
    return [f.read_bytes() for p in plan.outputs for f in sorted(p.glob("*.safetensors"))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(PLANS))
@pytest.mark.parametrize("chunk", [1000, None])  # small chunks across tensor borders, and the stage's own
def test_cuda_gives_the_cpu_paths_bytes(make_st_run, tmp_path: Path, method: str, dtype: torch.dtype, chunk):
    make_st_run(list(range(1000, 9001, 1000)), dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        plan = PLANS[method](str(tmp_path / "run"), tmp_path / device)
        api.average(plan, api.Options(device=device, chunk=chunk))
        outs[device] = weights(plan)
    assert outs["cpu"] and outs["cuda"] == outs["cpu"]


@pytest.mark.gpu
def test_cuda_stage_reads_into_pinned_memory_and_sizes_large_chunks(make_st_run, tmp_path: Path, monkeypatch):
    from ckptavg import cuda_stage, engine

    shapes = {"big": (3 << 20,), "small": (7,)}  # 3M elements: one chunk, where the CPU path makes 12
    make_st_run([1000, 2000, 3000], torch.float16, shapes=shapes)
    made: list[cuda_stage.CudaStage] = []
    rings: list[list[torch.Tensor]] = []

    def stage_for(job, averaged):
        stage = cuda_stage.CudaStage.for_job(job, averaged)
        open_stage = stage.open

        def open_recording(*args):
            reads, writes = open_stage(*args)
            rings.append(reads.ring)
            return reads, writes

        stage.open = open_recording
        made.append(stage)
        return stage

    monkeypatch.setattr(engine, "stage_for", stage_for)
    outs = {}
    for device in ("cpu", "cuda"):
        plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / device)
        api.average(plan, api.Options(device=device, threads=6))
        outs[device] = weights(plan)
    assert outs["cuda"] == outs["cpu"]
    assert made[-1].sizing.chunk == 3 << 20  # the whole tensor: GPU memory is plentiful
    assert made[-1].sizing.threads == 4  # --threads 6 less the caller's and the writer's
    assert all(h.is_pinned() for h in made[-1].host_out)
    assert rings and all(b.is_pinned() for b in rings[-1])  # the readers read into pinned buffers


@pytest.mark.gpu
def test_gpu_memory_caps_the_chunk_on_a_gpu(make_st_run, tmp_path: Path):
    make_st_run([1000, 2000, 3000], torch.bfloat16, shapes={"big": (1 << 22,)})
    outs = {}
    for device, cap in (("cpu", None), ("cuda", 64 << 20)):
        plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / device)
        api.average(plan, api.Options(device=device, gpu_memory=cap))
        outs[device] = weights(plan)
    assert outs["cuda"] == outs["cpu"]


@pytest.mark.gpu
def test_cuda_cli(make_st_run, tmp_path: Path):
    from click.testing import CliRunner

    from ckptavg.cli import cli

    make_st_run([1000, 2000, 3000], torch.bfloat16)
    args = ["lawa", str(tmp_path / "run"), "--steps", "3000:3000", "--k", "3", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*args, "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "step3000" / "model.safetensors").exists()


def test_cuda_requested_without_gpu_is_a_clear_error(make_st_run, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_st_run([1000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(1000, 1000), k=1, out=tmp_path / "o")
    with pytest.raises(Exception, match="no CUDA device is available"):
        api.average(plan, api.Options(device="cuda"))
