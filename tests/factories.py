"""Real tiny checkpoints, written the way Pythia and nanoGPT write theirs.

Pythia-layout runs: a tiny ``GPTNeoXForCausalLM`` whose weights drift with the step, saved per step as
``pytorch_model.bin`` (torch zip, fp16, with Pythia's legacy buffers) or sharded ``.bin`` with an index,
or by ``save_pretrained`` as (sharded) safetensors. nanoGPT runs: ``torch.save`` of the dict nanoGPT's
train.py writes, with ``_orig_mod.`` keys and the tied embedding.

Also a script: ``python tests/factories.py examples/tiny-nanogpt`` regenerates the nanoGPT example that
ships (``make example-data``). The Pythia-layout example, examples/tiny-run, is a real training run made by
examples/study/train.py, not by these factories.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, VOCAB, FFN, MAX_POS = 32, 2, 4, 128, 64, 64


def neox_config():  # type: ignore[no-untyped-def]
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        rotary_pct=0.25,
        dtype="float16",
        bos_token_id=0,
        eos_token_id=0,
    )


def neox_state(step: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The parameters of the tiny model at ``step``: a fixed init plus a step-dependent drift."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(neox_config())
    g = torch.Generator().manual_seed(step)
    state = {}
    for name, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=g) * 0.02
        state[name] = (t.float() + noise).to(dtype) if t.is_floating_point() else t.clone()
    return state


def pythia_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pythia's step files carry, per layer, a bool causal mask, masked_bias (-1e9 in fp16: -inf) and inv_freq."""
    out = {}
    rot = int(HIDDEN // HEADS * 0.25)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}.attention."
        out[p + "bias"] = torch.tril(torch.ones(MAX_POS, MAX_POS, dtype=torch.bool)).view(1, 1, MAX_POS, MAX_POS)
        out[p + "masked_bias"] = torch.tensor(-1e9).half()
        out[p + "rotary_emb.inv_freq"] = inv_freq.half()
    return out


def to_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 calls the head lm_head.weight in memory; Pythia's files say embed_out.weight."""
    return {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in state.items()}


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 32 + VOCAB - 2))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(folder)


def write_pythia_step(
    folder: Path,
    step: int,
    *,
    fmt: str = "bin",
    shards: int = 1,
    dtype: torch.dtype = torch.float16,
    legacy_buffers: bool = True,
    tokenizer: bool = True,
) -> dict[str, torch.Tensor]:
    """One step folder as Pythia has them; returns the tensors written (disk names)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = neox_config()
    cfg.dtype = str(dtype).removeprefix("torch.")
    if fmt == "safetensors":
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM(cfg).to(dtype)
        model.load_state_dict(neox_state(step, dtype))
        size = "20KB" if shards > 1 else "5GB"
        model.save_pretrained(folder, max_shard_size=size)
        state = to_disk_names(neox_state(step, dtype))
    else:
        cfg.save_pretrained(folder)
        state = to_disk_names(neox_state(step, dtype))
        if legacy_buffers:
            state.update(pythia_buffers(state))
        _save_bin(folder, state, shards)
    if tokenizer:
        write_tokenizer(folder)
    return state


def _save_bin(folder: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / fname)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_pythia_run(root: Path, steps: list[int], **kw: object) -> dict[int, dict[str, torch.Tensor]]:
    return {s: write_pythia_step(root / f"step{s}", s, **kw) for s in steps}  # type: ignore[arg-type]


# ---------------------------------------------------------------- nanoGPT

NANO_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "bias": False, "vocab_size": 96, "dropout": 0.0}


def nanogpt_model_state(step: int, *, compiled: bool = True) -> dict[str, torch.Tensor]:
    """nanoGPT GPT's state dict layout (fp32), with the tied wte/lm_head and optional _orig_mod. prefix."""
    a = NANO_ARGS
    e, v, b = a["n_embd"], a["vocab_size"], a["block_size"]
    g = torch.Generator().manual_seed(step)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    wte = r(v, e)
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(b, e)}
    for i in range(int(a["n_layer"])):
        p = f"transformer.h.{i}."
        sd.update(
            {
                p + "ln_1.weight": 1 + r(e),
                p + "attn.c_attn.weight": r(3 * e, e),
                p + "attn.c_proj.weight": r(e, e),
                p + "ln_2.weight": 1 + r(e),
                p + "mlp.c_fc.weight": r(4 * e, e),
                p + "mlp.c_proj.weight": r(e, 4 * e),
            }
        )
    sd["transformer.ln_f.weight"] = 1 + r(e)
    sd["lm_head.weight"] = wte  # tied: one storage
    prefix = "_orig_mod." if compiled else ""
    return {prefix + k: t for k, t in sd.items()}


def write_nanogpt_ckpt(path: Path, step: int, *, compiled: bool = True) -> dict[str, torch.Tensor]:
    """What nanoGPT's train.py saves: model, optimizer, model_args, iter_num, best_val_loss, config."""
    model = nanogpt_model_state(step, compiled=compiled)
    params = [t for k, t in model.items() if not k.endswith("lm_head.weight")]
    optimizer = {
        "state": {
            i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.ones_like(t)}
            for i, t in enumerate(params)
        },
        "param_groups": [
            {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(range(len(params)))}
        ],
    }
    ckpt = {
        "model": model,
        "optimizer": optimizer,
        "model_args": dict(NANO_ARGS),
        "iter_num": step,
        "best_val_loss": torch.tensor(3.0),
        "config": {"learning_rate": 6e-4, "compile": compiled, "dataset": "tiny"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return {k.removeprefix("_orig_mod."): t for k, t in model.items()}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-nanogpt")
    for step in range(1000, 4001, 1000):
        write_nanogpt_ckpt(target / f"ckpt_{step}.pt", step)
    print(target)
