"""nanoGPT -> GPT-2: the converted folder's logits equal nanoGPT's own forward pass."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from factories import NANO_ARGS, write_nanogpt_ckpt

from ckptavg import api, convert
from ckptavg.cli import cli
from ckptavg.convert import scratch_prefix
from ckptavg.errors import Terminated
from ckptavg.scratch import sigterm_raises, uninterrupted
from ckptavg.steps import StepRange


def nanogpt_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (model.py) written out: pre-LN blocks, causal SDPA, exact GELU, tied head."""
    a = NANO_ARGS
    n_head, e = int(a["n_head"]), int(a["n_embd"])
    b, t = idx.shape

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (e,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][torch.arange(t)]
    for i in range(int(a["n_layer"])):
        p = f"transformer.h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"].T).split(e, dim=2)
        q, k, v = (z.view(b, t, n_head, e // n_head).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(b, t, e) @ sd[p + "attn.c_proj.weight"].T
        h = torch.nn.functional.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T)
        x = x + h @ sd[p + "mlp.c_proj.weight"].T
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


@pytest.mark.parametrize("source", ["ckpt.pt", "averaged folder"])
def test_converted_logits_equal_nanogpt(tmp_path: Path, source: str):
    from transformers import AutoModelForCausalLM

    steps = [1000, 2000, 3000]
    for s in steps:
        write_nanogpt_ckpt(tmp_path / "run" / f"ckpt_{s}.pt", s)
    if source == "ckpt.pt":
        src = tmp_path / "run" / "ckpt_3000.pt"
        sd = {k.removeprefix("_orig_mod."): v for k, v in torch.load(src, weights_only=True)["model"].items()}
    else:
        plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / "lawa")
        api.average(plan)
        src = plan.outputs[0]
        from safetensors.torch import load_file

        sd = load_file(src / "model.safetensors")
    result = CliRunner().invoke(cli, ["convert", str(src), "--out", str(tmp_path / "gpt2")])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert model.config.model_type == "gpt2"
    idx = torch.randint(0, int(NANO_ARGS["vocab_size"]), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, nanogpt_forward(sd, idx), rtol=1e-5, atol=1e-5)
    again = CliRunner().invoke(cli, ["convert", str(src), "--out", str(tmp_path / "gpt2")])
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_convert_refuses_a_folder_without_model_args(tmp_path: Path):
    (tmp_path / "x").mkdir()
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "x"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "no nanoGPT model_args" in r.stderr


# ---------------------------------------------------------------- what a conversion leaves beside --out


@pytest.fixture
def nano(tmp_path: Path) -> Path:
    src = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(src, 1000)
    return src


def convert_cli(src: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(cli, ["convert", str(src), "--out", str(out), *extra])


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_replaces_a_file_or_a_symlink_never_its_target(nano: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "gpt2").write_text("a file, not a model")
    refused = convert_cli(nano, out / "gpt2")
    assert (
        refused.exit_code == 1
        and refused.stderr == f"Error: {out / 'gpt2'}: already exists; pass --overwrite to replace it\n"
    )
    r = convert_cli(nano, out / "gpt2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "gpt2" / "config.json").is_file() and beside(out) == ["gpt2"]

    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    (out / "link").symlink_to(target)
    (out / "dangling").symlink_to(tmp_path / "nowhere")
    assert "already exists" in convert_cli(nano, out / "dangling").stderr  # a dangling link is there too
    for name in ("link", "dangling"):
        r = convert_cli(nano, out / name, "--overwrite")
        assert r.exit_code == 0, r.output
        assert not (out / name).is_symlink() and (out / name / "config.json").is_file()
    assert beside(target) == ["keep.txt"] and beside(out) == ["dangling", "gpt2", "link"]


def test_a_long_output_name_gets_a_legal_temporary_name(nano: Path, tmp_path: Path):
    name = "m" * 250
    r = convert_cli(nano, tmp_path / "o" / name)
    assert r.exit_code == 0, r.output
    assert beside(tmp_path / "o") == [name]
    again = convert_cli(nano, tmp_path / "o" / name, "--overwrite")
    assert again.exit_code == 0 and beside(tmp_path / "o") == [name]


def test_convert_refuses_to_replace_its_source(tmp_path: Path):
    for s in (1000, 2000):
        write_nanogpt_ckpt(tmp_path / "run" / f"ckpt_{s}.pt", s)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(2000, 2000), k=2, out=tmp_path / "lawa")
    api.average(plan)
    r = convert_cli(plan.outputs[0], plan.outputs[0], "--overwrite")
    assert r.exit_code == 1 and "would replace input" in r.stderr
    assert (plan.outputs[0] / "ckptavg.json").is_file() and beside(tmp_path / "lawa") == ["step2000"]


def test_a_killed_conversions_folder_goes_and_a_live_ones_stays(nano: Path, tmp_path: Path):
    out = tmp_path / "gpt2"
    prefix = scratch_prefix(out)
    killed = tmp_path / f"{prefix}deadbeef"  # what SIGKILL leaves: a folder nobody holds
    (killed / "gpt2").mkdir(parents=True)
    live = tmp_path / f"{prefix}live0000"
    live.mkdir()
    other = tmp_path / ".gpt2.ckptavg-tmp-0123456789abcdef"  # an averaging run's progress: not ours
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the live conversion holds its folder
        r = convert_cli(nano, out)
    finally:
        os.close(fd)
    assert r.exit_code == 0, r.output
    assert beside(tmp_path) == sorted(["ckpt.pt", "gpt2", live.name, other.name])


def test_sigterm_during_a_conversion_leaves_what_was_there(nano: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "o" / "gpt2"
    assert convert_cli(nano, out).exit_code == 0
    before = beside(out)
    replace = convert._replace

    def terminated_first(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends at the time limit, while the folder is built
        replace(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "_replace", terminated_first)
    with pytest.raises(Terminated), sigterm_raises():
        convert.convert(nano, out, overwrite=True)
    assert beside(tmp_path / "o") == ["gpt2"] and beside(out) == before
    with pytest.raises(Terminated), sigterm_raises():
        convert.convert(nano, tmp_path / "o" / "new")
    assert beside(tmp_path / "o") == ["gpt2"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_waits_for_the_swap():
    """A SIGTERM between setting the old output aside and renaming the new one in would lose both."""
    done = []
    with pytest.raises(Terminated), sigterm_raises():
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append(1)
    assert done == [1]
