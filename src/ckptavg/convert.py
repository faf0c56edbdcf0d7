"""nanoGPT weights -> a transformers GPT-2 folder, for tools that speak transformers (lm-evaluation-harness).

nanoGPT's model is GPT-2's architecture with two differences that matter here: its linear layers are
``nn.Linear`` (weight [out, in]) where transformers' GPT-2 uses ``Conv1D`` (weight [in, out]), so four
weights per block are transposed; and with ``bias=False`` it has no biases, which become zeros. Its
MLP uses the exact GELU (``gelu``), not GPT-2's tanh approximation (``gelu_new``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import CheckpointFormatError, OutputError
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.sources.nanogpt import COMPILE_PREFIX

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_nanogpt(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and model_args of a nanoGPT ckpt.pt, or of a folder ckptavg made from nanoGPT inputs."""
    if src.is_file():
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
            raise CheckpointFormatError(f"{src}: not a nanoGPT checkpoint (needs 'model' and 'model_args')")
        return {k.removeprefix(COMPILE_PREFIX): v for k, v in ckpt["model"].items()}, dict(ckpt["model_args"])
    from safetensors.torch import load_file

    try:
        args = json.loads((src / PROVENANCE_FILE).read_text())["model_args"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointFormatError(f"{src}: no nanoGPT model_args in {PROVENANCE_FILE}; give its ckpt.pt") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise CheckpointFormatError(f"{src}: no safetensors weights")
    return state, dict(args)


def gpt2_state(state: dict[str, torch.Tensor], args: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # nanoGPT's causal-mask buffer; transformers builds its own
        out[name] = t.t().contiguous() if name.endswith(_TRANSPOSED) else t
    e = int(args["n_embd"])
    zeros = {
        "ln_1.bias": e,
        "ln_2.bias": e,
        "attn.c_attn.bias": 3 * e,
        "attn.c_proj.bias": e,
        "mlp.c_fc.bias": 4 * e,
        "mlp.c_proj.bias": e,
    }
    dtype = state["transformer.wte.weight"].dtype
    for i in range(int(args["n_layer"])):
        for suffix, size in zeros.items():
            out.setdefault(f"transformer.h.{i}.{suffix}", torch.zeros(size, dtype=dtype))
    out.setdefault("transformer.ln_f.bias", torch.zeros(e, dtype=dtype))
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def convert(src: Path, out: Path, *, tokenizer: Path | None = None, overwrite: bool = False) -> Path:
    """Write a GPT-2 folder at ``out`` (built beside it under a temporary name, then renamed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    state, args = load_nanogpt(src)
    config = GPT2Config(
        vocab_size=int(args["vocab_size"]),
        n_positions=int(args["block_size"]),
        n_embd=int(args["n_embd"]),
        n_layer=int(args["n_layer"]),
        n_head=int(args["n_head"]),
        activation_function="gelu",
        resid_pdrop=float(args.get("dropout", 0.0)),
        embd_pdrop=float(args.get("dropout", 0.0)),
        attn_pdrop=float(args.get("dropout", 0.0)),
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(gpt2_state(state, args), strict=False)
    if unexpected or [m for m in missing if not m.endswith(".attn.bias")]:
        raise CheckpointFormatError(f"{src}: does not fit GPT-2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out.parent / f".{out.name}.ckptavg-convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.to(state["transformer.wte.weight"].dtype).save_pretrained(tmp)  # type: ignore[arg-type]
        if tokenizer is not None:
            for f in tokenizer.iterdir():
                if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                    shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
