"""The CUDA path (--device cuda) gives the CPU path's results. GPU tests skip where torch sees no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptavg import api
from ckptavg.steps import StepRange


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lawa", "ema", "swa"])
def test_cuda_matches_cpu(make_st_run, tmp_path: Path, method: str):
    make_st_run(list(range(1000, 9001, 1000)), torch.float16)
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        if method == "lawa":
            plan = api.plan_lawa(str(tmp_path / "run"), StepRange(5000, 9000), k=5, interval=1000, out=out)
        elif method == "ema":
            plan = api.plan_ema(str(tmp_path / "run"), StepRange(1000, 9000), interval=2000, out=out)
        else:
            plan = api.plan_swa(str(tmp_path / "run"), StepRange(3000, 9000), every=1000, interval=2000, out=out)
        api.average(plan, api.Options(device=device, chunk=1000))
        outs[device] = [load_file(p / "model.safetensors") for p in plan.outputs]
    for a, b in zip(outs["cpu"], outs["cuda"], strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=torch.finfo(torch.float16).eps, atol=0)


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
