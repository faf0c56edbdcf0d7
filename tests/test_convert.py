"""nanoGPT -> GPT-2: the converted folder's logits equal nanoGPT's own forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import NANO_ARGS, write_nanogpt_ckpt

from ckptavg import api
from ckptavg.cli import cli
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
