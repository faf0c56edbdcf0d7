"""nanoGPT weights -> a transformers GPT-2 folder, for tools that speak transformers (lm-evaluation-harness).

nanoGPT's model is GPT-2's architecture with two differences that matter here: its linear layers are
``nn.Linear`` (weight [out, in]) where transformers' GPT-2 uses ``Conv1D`` (weight [in, out]), so four
weights per block are transposed; and with ``bias=False`` it has no biases, which become zeros. Its
MLP uses the exact GELU (``gelu``), not GPT-2's tanh approximation (``gelu_new``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ckptavg import __version__, scratch
from ckptavg.errors import InvalidCheckpointError, OutputError
from ckptavg.outputs import check_name, check_outputs, check_writable, working_dir
from ckptavg.sources import open_checkpoint
from ckptavg.sources.checkpoint import read_state
from ckptavg.sources.extras import tokenizer_files as folder_tokenizer_files
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.writers.safetensors_folder import temp_prefix

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")
_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def load_nanogpt(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and model_args of a nanoGPT ckpt.pt, or of a folder ckptavg made from nanoGPT inputs,
    read through the same checks as every input (sources/): a damaged file is one line, not a traceback."""
    if src.is_dir():
        if _converted(src):
            raise InvalidCheckpointError(
                src, "already converted to GPT-2 by ckptavg convert; give the nanoGPT folder or ckpt.pt it came from"
            )
        try:
            args = json.loads((src / PROVENANCE_FILE).read_text())["model_args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidCheckpointError(src, f"no nanoGPT model_args in {PROVENANCE_FILE}; give its ckpt.pt") from e
        ckpt, where = open_checkpoint(src), src / PROVENANCE_FILE
    else:
        ckpt = open_checkpoint(src)
        args, where = ckpt.meta.get("model_args"), src
    state = read_state(ckpt)
    checked = _checked_args(args, where)
    _check_fits(state, checked, src)
    return state, checked


def _converted(folder: Path) -> bool:
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "converted" in record


def _checked_args(args: object, where: Path) -> dict[str, Any]:
    """nanoGPT's model_args (read from ``where``) as GPT-2 needs them: the five sizes, positive integers."""
    if not isinstance(args, dict):
        raise InvalidCheckpointError(where, "model_args missing (a nanoGPT checkpoint holds them; give its ckpt.pt)")
    for key in _MODEL_ARGS:
        value = args.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
            raise InvalidCheckpointError(where, f"model_args: '{key}' is {value!r}, not a positive integer")
    if args["n_embd"] % args["n_head"]:
        raise InvalidCheckpointError(
            where, f"model_args: n_embd {args['n_embd']} is not a multiple of n_head {args['n_head']}"
        )
    dropout = args.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise InvalidCheckpointError(where, f"model_args: 'dropout' is {dropout!r}, not a number in [0, 1]")
    return dict(args)


def _check_fits(state: dict[str, torch.Tensor], args: dict[str, Any], where: Path) -> None:
    """The weights are a nanoGPT GPT of the sizes ``args`` give: checked before the model is built from
    those sizes, so a lying model_args (vocab_size 2**30) cannot make us allocate gigabytes, and what is
    allocated is about the size of the weights already read."""
    e = args["n_embd"]
    for name, rows, arg in (("transformer.wte.weight", args["vocab_size"], "vocab_size"),
                            ("transformer.wpe.weight", args["block_size"], "block_size")):  # fmt: skip
        t = state.get(name)
        if t is None:
            raise InvalidCheckpointError(where, f"no tensor {name}; not a nanoGPT GPT")
        if not t.is_floating_point():
            dtype = str(t.dtype).removeprefix("torch.")
            raise InvalidCheckpointError(where, f"{name} is {dtype}; a GPT-2 folder holds floating-point weights")
        if tuple(t.shape) != (rows, e):
            raise InvalidCheckpointError(
                where, f"model_args: {arg} x n_embd is {rows} x {e}, but {name} is {list(t.shape)}"
            )
    blocks = sorted({int(m.group(1)) for n in state if (m := _BLOCK.match(n))})
    if blocks != list(range(args["n_layer"])):
        held = (
            f"{len(blocks)} blocks (transformer.h.{blocks[0]} to transformer.h.{blocks[-1]})" if blocks else "no blocks"
        )
        raise InvalidCheckpointError(where, f"model_args: n_layer is {args['n_layer']}, but the weights hold {held}")


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
    """Write a GPT-2 folder at ``out``, built beside it in a scratch folder and renamed into place.

    The scratch folder is named after ``out`` the way the writer names its temporary folders
    (``writers.safetensors_folder.temp_prefix``, so any name that fits in a file name fits), followed by
    ``convert-`` and random characters. It is removed however the conversion ends; one that a killed
    conversion left is removed by the next conversion to the same ``out`` (``scratch.remove_abandoned``).
    With ``overwrite``, whatever is at ``out`` (a folder, a file, a symlink: never what a link points to)
    is set aside into the scratch folder, and goes with it once the new folder is in place.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    check_name(out)
    check_outputs([out], inputs=[src] + ([tokenizer] if tokenizer is not None else []))
    if os.path.lexists(out) and not overwrite:  # a broken symlink too: it is a name we would replace
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    check_writable([out])
    state, args = load_nanogpt(src)
    tokenizer_files = {} if tokenizer is None else folder_tokenizer_files(tokenizer)
    record = provenance(src, tokenizer)
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
    try:
        missing, unexpected = model.load_state_dict(gpt2_state(state, args), strict=False)
    except RuntimeError as e:  # shapes that model_args do not give (a size mismatch)
        detail = next((ln.strip() for ln in str(e).splitlines() if ln.startswith("\t")), str(e).splitlines()[0])
        raise InvalidCheckpointError(src, f"does not fit GPT-2 ({detail})") from e
    if unexpected or [m for m in missing if not m.endswith(".attn.bias")]:
        raise InvalidCheckpointError(src, f"does not fit GPT-2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    prefix = scratch_prefix(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch.remove_abandoned(scratch.with_prefix(out.parent, prefix))
        with scratch.scratch_folder(out.parent, prefix) as tmp:
            built = tmp / "gpt2"
            model.to(state["transformer.wte.weight"].dtype).save_pretrained(built)  # type: ignore[arg-type]
            for name, f in tokenizer_files.items():
                shutil.copy2(f, built / name)
            (built / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            _replace(built, out, tmp / "old", overwrite)
    except OSError as e:
        raise OutputError(f"{out}: {e.strerror or e}; nothing was written") from e
    return out


def provenance(src: Path, tokenizer: Path | None) -> dict[str, Any]:
    """The converted folder's ckptavg.json: the source's record (how it was averaged), if it has one,
    with this step added under ``converted``. The record's ``plan_id`` stays, to say which plan made the
    weights; ``converted`` marks the folder as not that plan's output, which a rerun of the plan must not
    skip (``api.output_states``) nor ``convert`` take as nanoGPT weights again (``load_nanogpt``)."""
    record: dict[str, Any] = {}
    if src.is_dir():
        try:
            found = json.loads((src / PROVENANCE_FILE).read_text())
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict):
            record = found
    if not record:
        record = {"tool": "ckptavg", "version": __version__}
    record["converted"] = {
        "tool": "ckptavg",
        "version": __version__,
        "from": str(src),
        "cwd": working_dir(),
        "format": "gpt2 (transformers)",
        "tokenizer": None if tokenizer is None else str(tokenizer.absolute()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record


def scratch_prefix(out: Path) -> str:
    """How the scratch folders of conversions to ``out`` are named: within NAME_MAX for any ``out``."""
    return f"{temp_prefix(out)}convert-"


def _replace(built: Path, out: Path, aside: Path, overwrite: bool) -> None:
    """Rename ``built`` to ``out``; with ``overwrite``, what was at ``out`` is first renamed to ``aside``
    (a rename moves a symlink itself, never what it points to), and put back if the second rename fails.
    A SIGTERM waits for the two renames: cut in between, the old output would go with the scratch folder."""
    with scratch.uninterrupted():
        moved = False
        if os.path.lexists(out):
            if not overwrite:
                raise OutputError(f"{out}: appeared while converting; not replaced")
            os.rename(out, aside)
            moved = True
        try:
            os.rename(built, out)
        except OSError:
            if moved:
                os.rename(aside, out)
            raise
