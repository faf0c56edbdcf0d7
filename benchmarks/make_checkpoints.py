#!/usr/bin/env python
"""Write synthetic Pythia-layout training-run folders for benchmarking.

    ROOT/step{N}/config.json         a real GPTNeoXConfig saved by transformers (+ Pythia's legacy keys)
    ROOT/step{N}/pytorch_model.bin   torch.save (zip format) of an fp16 state dict with Pythia's
                                     tensor names, shapes and legacy buffers

Example:
    python benchmarks/make_checkpoints.py --preset pythia-1b --root $BENCH_DATA/pythia-1b \
        --steps 1000:5000:1000

Values are random (uniform, per-step seed) so generation is fast; only names, shapes, dtypes
and byte sizes matter for the benchmark. Existing files with the expected size are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# Values from the real Pythia config.json files on the Hugging Face hub (EleutherAI/pythia-*).
PRESETS: dict[str, dict] = {
    "pythia-160m": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=50304, intermediate_size=3072
    ),
    "pythia-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, vocab_size=50304, intermediate_size=8192
    ),
    # A few MB, for benchmarks/gpu.sh --small (the script's logic, end to end, on any machine).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, intermediate_size=256),
    # Two layers of pythia-12b (hidden 5120, 40 heads, vocab 50688, ffn 20480, 36 layers in the real one).
    "12b-slice": dict(
        hidden_size=5120, num_hidden_layers=2, num_attention_heads=40, vocab_size=50688, intermediate_size=20480
    ),
}
COMMON = dict(
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=2048,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
    hidden_act="gelu",
    initializer_range=0.02,
)


def parse_steps(spec: str) -> list[int]:
    """'1000:5000:1000' -> [1000..5000 step 1000]; '1000,2000,7000' -> list."""
    if ":" in spec:
        parts = [int(p) for p in spec.split(":")]
        start, stop = parts[0], parts[1]
        step = parts[2] if len(parts) > 2 else 1000
        return list(range(start, stop + 1, step))
    return [int(s) for s in spec.split(",") if s]


def tensor_specs(p: dict, mask_dtype: torch.dtype, inv_freq_dtype: torch.dtype):
    """Yield (name, shape, dtype, kind) in the order Pythia's pytorch_model.bin stores them."""
    h, f, v = p["hidden_size"], p["intermediate_size"], p["vocab_size"]
    heads = p["num_attention_heads"]
    rotary_dim = int((h // heads) * COMMON["rotary_pct"])
    mp = COMMON["max_position_embeddings"]
    fp16 = torch.float16
    yield "gpt_neox.embed_in.weight", (v, h), fp16, "w"
    for i in range(p["num_hidden_layers"]):
        pre = f"gpt_neox.layers.{i}."
        yield pre + "input_layernorm.weight", (h,), fp16, "ln_w"
        yield pre + "input_layernorm.bias", (h,), fp16, "b"
        yield pre + "post_attention_layernorm.weight", (h,), fp16, "ln_w"
        yield pre + "post_attention_layernorm.bias", (h,), fp16, "b"
        yield pre + "attention.bias", (1, 1, mp, mp), mask_dtype, "mask"
        yield pre + "attention.masked_bias", (), fp16, "masked_bias"
        yield pre + "attention.rotary_emb.inv_freq", (rotary_dim // 2,), inv_freq_dtype, "inv_freq"
        yield pre + "attention.query_key_value.weight", (3 * h, h), fp16, "w"
        yield pre + "attention.query_key_value.bias", (3 * h,), fp16, "b"
        yield pre + "attention.dense.weight", (h, h), fp16, "w"
        yield pre + "attention.dense.bias", (h,), fp16, "b"
        yield pre + "mlp.dense_h_to_4h.weight", (f, h), fp16, "w"
        yield pre + "mlp.dense_h_to_4h.bias", (f,), fp16, "b"
        yield pre + "mlp.dense_4h_to_h.weight", (h, f), fp16, "w"
        yield pre + "mlp.dense_4h_to_h.bias", (h,), fp16, "b"
    yield "gpt_neox.final_layer_norm.weight", (h,), fp16, "ln_w"
    yield "gpt_neox.final_layer_norm.bias", (h,), fp16, "b"
    yield "embed_out.weight", (v, h), fp16, "w"


def make_state_dict(p: dict, seed: int, mask_dtype, inv_freq_dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, heads = p["hidden_size"], p["num_attention_heads"]
    rotary_dim = int((h // heads) * COMMON["rotary_pct"])
    mp = COMMON["max_position_embeddings"]
    sd: dict[str, torch.Tensor] = {}
    for name, shape, dtype, kind in tensor_specs(p, mask_dtype, inv_freq_dtype):
        if kind == "w":
            t = torch.empty(shape, dtype=dtype).uniform_(-0.035, 0.035, generator=g)  # std ~0.02
        elif kind == "b":
            t = torch.empty(shape, dtype=dtype).uniform_(-0.01, 0.01, generator=g)
        elif kind == "ln_w":
            t = torch.empty(shape, dtype=dtype).uniform_(0.9, 1.1, generator=g)
        elif kind == "mask":
            t = torch.tril(torch.ones((mp, mp), dtype=torch.bool)).view(1, 1, mp, mp).to(dtype)
        elif kind == "masked_bias":
            t = torch.tensor(-1e9).to(dtype)  # -inf once cast to fp16, as in Pythia's files
        elif kind == "inv_freq":
            t = 1.0 / (COMMON["rotary_emb_base"] ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
            t = t.to(dtype)
        else:  # pragma: no cover
            raise AssertionError(kind)
        sd[name] = t
    return sd


def expected_nbytes(p: dict, mask_dtype, inv_freq_dtype) -> int:
    n = 0
    for _, shape, dtype, _ in tensor_specs(p, mask_dtype, inv_freq_dtype):
        numel = 1
        for s in shape:
            numel *= s
        n += numel * torch.empty((), dtype=dtype).element_size()
    return n


def archive_ok(path: Path) -> bool:
    """True if the torch zip's top folder is named as torch.save names it for pytorch_model.bin."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()[0].startswith("pytorch_model/")
    except (zipfile.BadZipFile, IndexError, OSError):
        return False


def write_config(p: dict, path: Path) -> None:
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(**p, **COMMON)
    cfg.architectures = ["GPTNeoXForCausalLM"]
    try:
        cfg.dtype = torch.float16  # transformers >= 4.56 / 5.x
    except Exception:  # pragma: no cover
        pass
    tmp = path.parent / (path.name + ".tmpdir")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(tmp)
    d = json.loads((tmp / "config.json").read_text())
    # Keys real Pythia config.json files carry, which older transformers / other tools read directly.
    d.setdefault("rotary_pct", COMMON["rotary_pct"])
    d.setdefault("rotary_emb_base", COMMON["rotary_emb_base"])
    d["torch_dtype"] = "float16"
    d["dtype"] = "float16"
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (tmp / "config.json").unlink()
    tmp.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--steps", required=True, help="START:STOP[:STRIDE] (inclusive) or a comma list")
    ap.add_argument(
        "--mask-dtype",
        choices=["bool", "uint8"],
        default="bool",
        help="dtype of the legacy attention.bias causal mask (Pythia files: bool)",
    )
    ap.add_argument(
        "--inv-freq-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="dtype of rotary_emb.inv_freq (Pythia's fp16 files: float16)",
    )
    ap.add_argument("--force", action="store_true", help="rewrite files even if present")
    args = ap.parse_args(argv)

    p = PRESETS[args.preset]
    mask_dtype = getattr(torch, args.mask_dtype)
    inv_dtype = getattr(torch, args.inv_freq_dtype)
    steps = parse_steps(args.steps)
    payload = expected_nbytes(p, mask_dtype, inv_dtype)
    print(f"{args.preset}: {len(steps)} checkpoints, {payload / 1e9:.3f} GB of tensor payload each", flush=True)
    for step in steps:
        d = args.root / f"step{step}"
        d.mkdir(parents=True, exist_ok=True)
        cfg_path = d / "config.json"
        if args.force or not cfg_path.exists():
            write_config(p, cfg_path)
        bin_path = d / "pytorch_model.bin"
        # torch.save adds a little zip/pickle overhead (well under 1 MB here) on top of the payload.
        if (
            not args.force
            and bin_path.exists()
            and payload <= bin_path.stat().st_size <= payload + (4 << 20)
            and archive_ok(bin_path)
        ):
            print(f"  step{step}: exists ({bin_path.stat().st_size / 1e9:.3f} GB), skipped", flush=True)
            continue
        t0 = time.perf_counter()
        sd = make_state_dict(p, seed=step, mask_dtype=mask_dtype, inv_freq_dtype=inv_dtype)
        t1 = time.perf_counter()
        # The temp name keeps the stem "pytorch_model": torch.save names the zip's top folder after
        # the file stem, and loaders such as mergekit's lazy unpickler look for "pytorch_model/...".
        tmp = bin_path.with_suffix(".partial")
        torch.save(sd, tmp)
        os.replace(tmp, bin_path)
        del sd
        t2 = time.perf_counter()
        print(
            f"  step{step}: generated {t1 - t0:.1f}s, saved {t2 - t1:.1f}s, {bin_path.stat().st_size / 1e9:.3f} GB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
