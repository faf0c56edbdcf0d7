"""Held-out loss of model folders on one fixed slice of data, and how often two models disagree.

The slice is the first ``max_tokens`` tokens of the data (a text file tokenized with each model's own
tokenizer, or nanoGPT's ``val.bin`` of uint16 token ids), cut into ``seq_len``-token sequences; every
model is scored on the same slice, and a results file remembers which slice it holds, so that
evaluations of a long trajectory can resume and never mix two slices.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, cast

import torch

from ckptavg.errors import DataFileError, InvalidArgumentError, ModelFolderError
from ckptavg.results import Results, Slice, check_row, read_results
from ckptavg.sources.extras import TOKENIZER_FILES
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.steps import StepRange

__all__ = ["Results", "Slice", "check_row", "read_results"]  # the results file lives in ckptavg.results

_STEP = re.compile(r"(?:step|checkpoint-)(\d+)$")
_CHUNK = 1 << 20
# Where a config states how many positions a model was trained on; the first one present counts.
_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "seq_length")
# A config with any of these has rotary (or ALiBi) positions: computed for any position, so transformers
# scores sequences past the trained context without complaint. Without them, positions are a learned
# table of that many rows, and a longer sequence fails inside the model (GPT-2: IndexError).
_OPEN_ENDED_KEYS = (
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "rotary_pct",
    "rotary_dim",
    "partial_rotary_factor",
    "rotary_emb_base",
    "alibi",
)


def asdict(sl: Slice) -> dict[str, Any]:
    from dataclasses import asdict as fields

    return fields(sl)


def make_slice(data: Path, max_tokens: int, seq_len: int) -> Slice:
    """The slice of ``data`` every model is scored on; ``data`` is read once here and checked.

    Text must be UTF-8: a byte that is not is refused with its offset, not decoded as U+FFFD, since the
    loss on a replacement character says nothing about the held-out text. A NUL byte marks a binary
    file (token ids are read only from ``*.bin``).
    """
    if seq_len < 2:
        raise InvalidArgumentError(f"--seq-len must be at least 2, got {seq_len}")
    if max_tokens < seq_len:
        raise InvalidArgumentError(f"--max-tokens ({max_tokens}) is shorter than one sequence ({seq_len})")
    digest = hashlib.sha256()
    size = 0
    text = data.suffix != ".bin"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(data, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if text:
                    _check_text(data, chunk, size, decoder)
                size += len(chunk)
        if text:
            _check_text(data, b"", size, decoder, final=True)
    except OSError as e:
        raise DataFileError(data, f"cannot read ({e.strerror})") from e
    if size == 0:
        raise DataFileError(data, "is empty: no tokens to score")
    if not text and size % 2:
        raise DataFileError(data, f"{size} bytes, not a whole number of uint16 token ids (2 bytes each, as val.bin)")
    return Slice(str(data), digest.hexdigest(), max_tokens, seq_len)


def _check_text(data: Path, chunk: bytes, offset: int, decoder: Any, final: bool = False) -> None:
    """Decode ``chunk`` (the bytes at ``offset``) as the next part of UTF-8 text, or say where it is not."""
    nul = chunk.find(b"\0")
    pending = decoder.getstate()[0]  # an unfinished character from the chunk before: the error counts it
    try:
        decoder.decode(chunk if nul < 0 else chunk[:nul], final or nul >= 0)
    except UnicodeDecodeError as e:
        where = offset - len(pending) + e.start
        raise DataFileError(
            data, f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {where} ({e.reason}); save it as UTF-8"
        ) from e
    if nul >= 0:
        raise DataFileError(
            data, f"holds a NUL byte at offset {offset + nul}: binary, not text (token ids must be in a *.bin file)"
        )


def context_check(folder: Path, seq_len: int, option: str = "") -> str | None:
    """Refuse a --seq-len longer than a model with learned positions has; return a warning for one with
    rotary or ALiBi positions (scored, but past what it was trained on); None when it fits."""
    option = option or f"--seq-len {seq_len}"
    found = _context(folder)
    if found is None:
        return None
    limit, key, open_ended = found
    if seq_len <= limit:
        return None
    if not open_ended:
        raise InvalidArgumentError(
            f"{option} is longer than the {limit} positions {folder} has ({key}); give --seq-len {limit} or less"
        )
    return (
        f"{folder}: {option} is longer than the {limit} positions it was trained on ({key}); its positions "
        f"are computed (rotary or ALiBi), so it is scored, but past position {limit} the loss measures extrapolation"
    )


def _context(folder: Path) -> tuple[int, str, bool] | None:
    config = folder / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_bytes())
        except (OSError, ValueError) as e:
            raise ModelFolderError(folder, f"config.json is not readable JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ModelFolderError(folder, "config.json is not a JSON object")
        cfgs = [cfg, *(v for v in cfg.values() if isinstance(v, dict))]  # also a text_config inside
        for c in cfgs:
            for key in _CONTEXT_KEYS:
                v = c.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    open_ended = any(c.get(k) not in (None, False) for k in _OPEN_ENDED_KEYS)
                    return v, key, open_ended
        return None
    if _has_model_args(folder):  # nanoGPT: learned positions, block_size of them
        args = json.loads((folder / PROVENANCE_FILE).read_text())["model_args"]
        if isinstance(args, dict) and isinstance(args.get("block_size"), int):
            return int(args["block_size"]), "block_size", False
    return None


def run_steps(have: list[int], span: StepRange, source: str) -> list[int]:
    """The run's checkpoints that ``--steps`` names. With EVERY, every step of the progression must be a
    checkpoint; a progression longer than the run is refused from arithmetic, before it is listed."""
    have = sorted(set(have))
    if not span.every:
        return [s for s in have if span.start <= s <= span.end]
    count = (span.end - span.start) // span.every + 1
    if count > len(have):
        what = f"{source} has {len(have)} checkpoint{'s' * (len(have) != 1)}"
        if have:
            what += f" (steps {have[0]}..{have[-1]})"
        raise InvalidArgumentError(
            f"--steps {span} names {count} steps, but {what}; narrow START:END or give a larger EVERY"
        )
    return [span.start + i * span.every for i in range(count)]


def describe_model(folder: Path) -> dict[str, Any]:
    """Method and step from the provenance an output carries; an original checkpoint is ``original``."""
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        return {"method": record["method"], "step": record["step"]}
    except (OSError, ValueError, KeyError):
        m = _STEP.search(folder.resolve().name)
        return {"method": "original", "step": int(m.group(1)) if m else None}


def tokenizer_folder(folder: Path, fallback: Path | None = None) -> Path | None:
    """Where the tokenizer of ``folder`` is: the folder itself when it holds any tokenizer file (the names
    of sources/extras.py), else ``fallback`` (``--tokenizer``), else None. A folder without a tokenizer
    must not reach transformers, which would make up a tokenizer that encodes text to almost nothing."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return fallback


def tokens_for(folder: Path, sl: Slice, vocab_size: int, tokenizer: Path | None = None) -> torch.Tensor:
    """The slice's token ids for this model: (n_sequences, seq_len). Text is read with the model's own
    tokenizer, or, for a model folder without one, the tokenizer in the folder ``tokenizer``."""
    data = Path(sl.data)
    if data.suffix == ".bin":
        n = data.stat().st_size // 2
        ids = torch.from_file(str(data), size=min(n, sl.max_tokens), dtype=torch.uint16).long()
    else:
        where = tokenizer_folder(folder, tokenizer)
        if where is None:
            raise ModelFolderError(
                folder, f"no tokenizer to read {data} with (no tokenizer.json, vocab.json, ...); pass --tokenizer DIR"
            )
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(where)
        except MemoryError:
            raise
        except Exception as e:  # the boundary: whatever a broken tokenizer file makes transformers raise
            raise ModelFolderError(where, f"no tokenizer to read {data} with ({_first_line(e)})") from e
        try:
            text = data.read_bytes().decode("utf-8")  # make_slice checked it; the file may have changed since
        except (OSError, UnicodeDecodeError) as e:
            raise DataFileError(data, f"cannot read it as UTF-8 text ({e})") from e
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: sl.max_tokens], dtype=torch.long)
    n_seq = ids.numel() // sl.seq_len
    if n_seq == 0:
        raise DataFileError(data, f"{ids.numel()} tokens, fewer than one sequence of {sl.seq_len}")
    if int(ids.max()) >= vocab_size:
        raise DataFileError(data, f"token id {int(ids.max())} is outside {folder}'s vocabulary of {vocab_size}")
    return ids[: n_seq * sl.seq_len].view(n_seq, sl.seq_len)


def load_model(folder: Path, device: str) -> Any:
    """A transformers model; a folder averaged from nanoGPT is converted to GPT-2 on the way.

    A folder whose weights do not fit its config is refused: transformers would otherwise fill tensors
    missing from the files with random values (and only log it), and fails on shapes with a report.
    """
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our log lines, not a bar per model
    verbosity = hf_logging.get_verbosity()
    with tempfile.TemporaryDirectory(prefix="ckptavg-eval-") as tmp:
        source = folder
        if not (folder / "config.json").exists() and _has_model_args(folder):
            from ckptavg.convert import convert

            source = convert(folder, Path(tmp) / "gpt2")
        hf_logging.set_verbosity_error()  # its load report: what matters in it becomes our one line
        model: Any
        info: dict[str, Any]
        try:
            model, info = cast(
                tuple[Any, dict[str, Any]],
                AutoModelForCausalLM.from_pretrained(
                    source, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
                ),
            )
        except MemoryError:
            raise
        except Exception as e:  # the boundary: OSError, ValueError, a corrupt file's error, ...
            raise ModelFolderError(folder, f"not a transformers model folder ({_first_line(e)})") from e
        finally:
            hf_logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, have, want = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise ModelFolderError(
            folder,
            f"weights do not fit config.json: {name} is {list(have)} in the weights, {list(want)} by the config{more}",
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFolderError(
            folder, f"weights lack tensors that config.json asks for: {', '.join(missing[:3])}{more}"
        )
    try:
        return model.to(device).eval()
    except (RuntimeError, ValueError, AssertionError) as e:
        raise InvalidArgumentError(f"--device {device}: cannot hold {folder} ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _has_model_args(folder: Path) -> bool:
    try:
        return "model_args" in json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False


@torch.no_grad()
def predictions(model: Any, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (float64) and argmax prediction for every next token of ``batch``."""
    logits = model(batch).logits[:, :-1].float()
    target = batch[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").double()
    return loss, logits.argmax(-1)


def evaluate(
    folder: Path, sl: Slice, *, batch_size: int = 8, device: str = "cpu", tokenizer: Path | None = None
) -> dict[str, Any]:
    """Mean token loss and perplexity of one model on the slice (text read with its own tokenizer, or
    without one with the tokenizer in the folder ``tokenizer``)."""
    context_check(folder, sl.seq_len)
    model = load_model(folder, device)
    tokens = tokens_for(folder, sl, model.config.vocab_size, tokenizer)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        loss, _ = _scored(folder, model, tokens[i : i + batch_size].to(device), batch_size)
        total += float(loss.sum())
        count += loss.numel()
    mean = total / count
    if not math.isfinite(mean):
        raise ModelFolderError(folder, f"its loss on {sl.data} is {mean}: the weights hold NaN or Inf, or overflow")
    ppl = math.exp(mean) if mean < 700 else None  # beyond float range: null in JSON, inf in the CSV
    return {"model": str(folder), **describe_model(folder), "loss": mean, "ppl": ppl, "tokens": count}


def _scored(folder: Path, model: Any, batch: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """predictions(), with what the model raises on this batch said in one line naming the folder."""
    try:
        return predictions(model, batch)
    except torch.OutOfMemoryError as e:
        raise InvalidArgumentError(
            f"{folder}: out of memory scoring --batch-size {batch_size} sequences of {batch.shape[1]} tokens; "
            f"give a smaller --batch-size"
        ) from e
    except (IndexError, RuntimeError, ValueError) as e:
        raise ModelFolderError(folder, f"failed on sequences of {batch.shape[1]} tokens ({_first_line(e)})") from e


def disagreement(
    a: Path, b: Path, sl: Slice, *, batch_size: int = 8, device: str = "cpu", tokenizer: Path | None = None
) -> float:
    """Share of next-token predictions (argmax) on which two models differ (the paper's Section 2.2)."""
    context_check(a, sl.seq_len)
    context_check(b, sl.seq_len)
    ma, mb = load_model(a, device), load_model(b, device)
    tokens = tokens_for(a, sl, min(ma.config.vocab_size, mb.config.vocab_size), tokenizer)
    differ, count = 0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size].to(device)
        pa, pb = _scored(a, ma, batch, batch_size)[1], _scored(b, mb, batch, batch_size)[1]
        differ += int((pa != pb).sum())
        count += pa.numel()
    return differ / count
