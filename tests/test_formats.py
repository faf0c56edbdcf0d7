"""Real checkpoint formats in, loadable folders out: Pythia-style .bin and safetensors, nanoGPT ckpt.pt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import (
    NANO_ARGS,
    neox_state,
    to_disk_names,
    write_nanogpt_ckpt,
    write_pythia_run,
    write_pythia_step,
)
from safetensors import safe_open
from safetensors.torch import load_file

from ckptavg import api
from ckptavg.steps import StepRange

STEPS = [1000, 2000, 3000, 4000]


def f64_mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(s[n].double() for s in states) / len(states) for n in states[0]}


def lawa(run: Path, out: Path, **opts: object) -> api.Plan:
    plan = api.plan_lawa(str(run), StepRange(4000, 4000), k=4, out=out)
    api.average(plan, api.Options(accumulate="float64", **opts))  # type: ignore[arg-type]
    return plan


def test_pythia_bin_run_loads_in_transformers_with_float64_logits(tmp_path: Path):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    states = write_pythia_run(tmp_path / "run", STEPS)
    lawa(tmp_path / "run", tmp_path / "out")
    out = tmp_path / "out" / "step4000"
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "ckptavg.json"}

    got = load_file(out / "model.safetensors")
    mean = f64_mean([states[s] for s in STEPS])
    for name, t in got.items():
        if name.endswith(("attention.bias", "masked_bias", "inv_freq")):
            assert torch.equal(t, states[4000][name]), f"{name} must be copied from the newest step"
        else:
            assert torch.equal(t, mean[name].to(torch.float16)), name

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = GPTNeoXForCausalLM(model.config).eval()
    in_memory = {n: mean[n if n != "lm_head.weight" else "embed_out.weight"] for n in neox_state(0)}
    ref.load_state_dict({n: t.to(torch.float16).float() for n, t in in_memory.items()})
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("fmt", "shards"), [("bin", 3), ("safetensors", 1), ("safetensors", 3)])
def test_every_input_layout_gives_the_same_bits(tmp_path: Path, fmt: str, shards: int):
    write_pythia_run(tmp_path / "plain", STEPS, legacy_buffers=False, tokenizer=False)
    write_pythia_run(tmp_path / "other", STEPS, fmt=fmt, shards=shards, legacy_buffers=False, tokenizer=False)
    if shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        assert (tmp_path / "other" / "step1000" / index).exists()
    lawa(tmp_path / "plain", tmp_path / "a")
    lawa(tmp_path / "other", tmp_path / "b")
    a = load_file(tmp_path / "a" / "step4000" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step4000" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_sharded_output_loads_in_transformers(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    write_pythia_run(tmp_path / "run", STEPS, tokenizer=False)
    lawa(tmp_path / "run", tmp_path / "out", max_shard_size=20_000)
    out = tmp_path / "out" / "step4000"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(out / s).values()
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    single = tmp_path / "single"
    lawa(tmp_path / "run", single)
    ref = AutoModelForCausalLM.from_pretrained(single / "step4000", dtype=torch.float32)
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_provenance_in_sidecar_and_metadata(tmp_path: Path):
    write_pythia_run(tmp_path / "run", STEPS, tokenizer=False)
    plan = lawa(tmp_path / "run", tmp_path / "out")
    out = plan.outputs[0]
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["method"] == "lawa" and record["params"]["k"] == 4
    assert [m["step"] for m in record["members"]] == STEPS
    assert [m["weight"] for m in record["members"]] == [0.25] * 4
    first = record["members"][0]["files"][0]
    assert first["size"] == (tmp_path / "run" / "step1000" / "pytorch_model.bin").stat().st_size
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["ckptavg"])["plan_id"] == record["plan_id"]


def test_bf16_and_fp32_safetensors_runs(tmp_path: Path):
    for dtype in (torch.bfloat16, torch.float32):
        root = tmp_path / str(dtype)
        states = {s: write_pythia_step(root / f"step{s}", s, fmt="safetensors", dtype=dtype) for s in STEPS}
        lawa(root, root / "out")
        got = load_file(root / "out" / "step4000" / "model.safetensors")
        mean = f64_mean([states[s] for s in STEPS])
        assert all(got[n].dtype == dtype and torch.equal(got[n], mean[n].to(dtype)) for n in got)


# ---------------------------------------------------------------- nanoGPT


class NanoGPTShape(torch.nn.Module):
    """The parameter names and tying of nanoGPT's GPT class (model.py), enough to load_state_dict strictly."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, **_: object):
        super().__init__()
        e = n_embd
        block = {
            "ln_1": torch.nn.LayerNorm(e, bias=False),
            "attn": torch.nn.ModuleDict(
                {"c_attn": torch.nn.Linear(e, 3 * e, bias=False), "c_proj": torch.nn.Linear(e, e, bias=False)}
            ),
            "ln_2": torch.nn.LayerNorm(e, bias=False),
            "mlp": torch.nn.ModuleDict(
                {"c_fc": torch.nn.Linear(e, 4 * e, bias=False), "c_proj": torch.nn.Linear(4 * e, e, bias=False)}
            ),
        }
        self.transformer = torch.nn.ModuleDict(
            {
                "wte": torch.nn.Embedding(vocab_size, e),
                "wpe": torch.nn.Embedding(block_size, e),
                "h": torch.nn.ModuleList(
                    [torch.nn.ModuleDict({k: _clone(v) for k, v in block.items()}) for _ in range(n_layer)]
                ),
                "ln_f": torch.nn.LayerNorm(e, bias=False),
            }
        )
        self.lm_head = torch.nn.Linear(e, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does


def _clone(m: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(m)


def test_nanogpt_run(tmp_path: Path):
    steps = [2000, 3000, 4000, 5000, 6000]
    states = {s: write_nanogpt_ckpt(tmp_path / "run" / f"ckpt_{s}.pt", s) for s in steps}
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(5000, 6000), k=3, interval=1000, out=tmp_path / "out")
    assert [w.steps for w in plan.windows] == [(3000, 4000, 5000), (4000, 5000, 6000)]
    api.average(plan, api.Options(accumulate="float64", write_ckpt=True))
    out = tmp_path / "out" / "step6000"
    got = load_file(out / "model.safetensors")
    mean = f64_mean([states[s] for s in (4000, 5000, 6000)])
    assert got.keys() == mean.keys()  # prefix stripped, both tied names present
    assert all(torch.equal(got[n], mean[n].float()) for n in got)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])

    model = NanoGPTShape(**NANO_ARGS)  # type: ignore[arg-type]
    model.load_state_dict(got, strict=True)

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["iter_num"] == 6000 and ckpt["model_args"] == NANO_ARGS
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()
    model.load_state_dict(ckpt["model"], strict=True)


def test_nanogpt_glob_and_uncompiled(tmp_path: Path):
    for s in (1000, 2000):
        write_nanogpt_ckpt(tmp_path / f"it{s}" / "ckpt.pt", s, compiled=False)
    plan = api.plan_lawa(str(tmp_path / "it*" / "ckpt.pt"), StepRange(2000, 2000), k=2, out=tmp_path / "out")
    assert plan.windows[0].steps == (1000, 2000)


def test_disk_names_match_transformers(tmp_path: Path):
    """Our Pythia fixture writes what transformers itself writes (embed_out.weight on disk)."""
    write_pythia_step(tmp_path / "st", 1000, fmt="safetensors")
    on_disk = load_file(tmp_path / "st" / "model.safetensors")
    assert set(on_disk) == set(to_disk_names(neox_state(1000)))


def test_dtype_option_is_announced_in_config(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    write_pythia_run(tmp_path / "run", STEPS, tokenizer=False)
    lawa(tmp_path / "run", tmp_path / "out", dtype="float32")
    out = tmp_path / "out" / "step4000"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    weights = load_file(out / "model.safetensors")
    assert weights["gpt_neox.embed_in.weight"].dtype == torch.float32
    assert weights["gpt_neox.layers.0.attention.rotary_emb.inv_freq"].dtype == torch.float16  # copied as is
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float32
