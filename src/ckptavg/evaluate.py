"""Held-out loss of model folders on one fixed slice of data, and how often two models disagree.

The slice is the first ``max_tokens`` tokens of the data (a text file tokenized with each model's own
tokenizer, or nanoGPT's ``val.bin`` of uint16 token ids), cut into ``seq_len``-token sequences; every
model is scored on the same slice, and a results file remembers which slice it holds, so that
evaluations of a long trajectory can resume and never mix two slices.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import DataFileError, InvalidArgumentError, ModelFolderError, ResultsFileError
from ckptavg.sources.hf_folder import PROVENANCE_FILE

_STEP = re.compile(r"(?:step|checkpoint-)(\d+)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class Slice:
    """What makes two losses comparable: the data file's bytes and how much of it is scored."""

    data: str
    sha256: str
    max_tokens: int
    seq_len: int


def make_slice(data: Path, max_tokens: int, seq_len: int) -> Slice:
    if seq_len < 2:
        raise InvalidArgumentError(f"--seq-len must be at least 2, got {seq_len}")
    if max_tokens < seq_len:
        raise InvalidArgumentError(f"--max-tokens ({max_tokens}) is shorter than one sequence ({seq_len})")
    try:
        digest = hashlib.sha256(data.read_bytes()).hexdigest()
    except OSError as e:
        raise DataFileError(data, f"cannot read ({e.strerror})") from e
    return Slice(str(data), digest, max_tokens, seq_len)


def describe_model(folder: Path) -> dict[str, Any]:
    """Method and step from the provenance an output carries; an original checkpoint is ``original``."""
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        return {"method": record["method"], "step": record["step"]}
    except (OSError, ValueError, KeyError):
        m = _STEP.search(folder.resolve().name)
        return {"method": "original", "step": int(m.group(1)) if m else None}


def tokens_for(folder: Path, sl: Slice, vocab_size: int) -> torch.Tensor:
    """The slice's token ids for this model: (n_sequences, seq_len)."""
    data = Path(sl.data)
    if data.suffix == ".bin":
        n = data.stat().st_size // 2
        ids = torch.from_file(str(data), size=min(n, sl.max_tokens), dtype=torch.uint16).long()
    else:
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelFolderError(folder, f"no tokenizer to read {data} with (none of {', '.join(_TOKENIZER_FILES)})")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelFolderError(folder, f"no tokenizer to read {data} with ({e.__class__.__name__})") from e
        ids = torch.tensor(tokenizer(data.read_text(), add_special_tokens=False)["input_ids"][: sl.max_tokens])
    n_seq = ids.numel() // sl.seq_len
    if n_seq == 0:
        raise DataFileError(data, f"{ids.numel()} tokens, fewer than one sequence of {sl.seq_len}")
    if int(ids.max()) >= vocab_size:
        raise DataFileError(data, f"token id {int(ids.max())} is outside {folder}'s vocabulary of {vocab_size}")
    return ids[: n_seq * sl.seq_len].view(n_seq, sl.seq_len)


def load_model(folder: Path, device: str) -> Any:
    """A transformers model; a folder averaged from nanoGPT is converted to GPT-2 on the way."""
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our log lines, not a bar per model
    with tempfile.TemporaryDirectory(prefix="ckptavg-eval-") as tmp:
        source = folder
        if not (folder / "config.json").exists() and _has_model_args(folder):
            from ckptavg.convert import convert

            source = convert(folder, Path(tmp) / "gpt2")
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelFolderError(folder, f"not a transformers model folder ({e})") from e
    return model.to(device).eval()  # type: ignore[arg-type]


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


def evaluate(folder: Path, sl: Slice, *, batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Mean token loss and perplexity of one model on the slice."""
    model = load_model(folder, device)
    tokens = tokens_for(folder, sl, model.config.vocab_size)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        loss, _ = predictions(model, tokens[i : i + batch_size].to(device))
        total += float(loss.sum())
        count += loss.numel()
    mean = total / count
    return {"model": str(folder), **describe_model(folder), "loss": mean, "ppl": math.exp(mean), "tokens": count}


def disagreement(a: Path, b: Path, sl: Slice, *, batch_size: int = 8, device: str = "cpu") -> float:
    """Share of next-token predictions (argmax) on which two models differ (the paper's Section 2.2)."""
    ma, mb = load_model(a, device), load_model(b, device)
    tokens = tokens_for(a, sl, min(ma.config.vocab_size, mb.config.vocab_size))
    differ, count = 0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size].to(device)
        pa, pb = predictions(ma, batch)[1], predictions(mb, batch)[1]
        differ += int((pa != pb).sum())
        count += pa.numel()
    return differ / count


class Results:
    """A results file: the slice it was made on and one row per model, keyed by the model's folder."""

    def __init__(self, path: Path | None, sl: Slice) -> None:
        self.path = path
        self.slice = sl
        self.rows: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                old = Slice(**saved["slice"])
                rows = saved["rows"]
            except (ValueError, KeyError, TypeError) as e:
                raise ResultsFileError(path, f"not a ckptavg results file ({e!r})") from e
            if old != sl:
                diff = ", ".join(
                    f"{k} {getattr(old, k)!r} there, {getattr(sl, k)!r} here"
                    for k in asdict(sl)
                    if getattr(old, k) != getattr(sl, k)
                )
                raise ResultsFileError(path, f"holds losses on another data slice ({diff}); use another --results")
            self.rows = {r["model"]: r for r in rows}

    def key(self, folder: Path) -> str:
        return str(folder.resolve())

    def has(self, folder: Path) -> bool:
        return self.key(folder) in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[self.key(Path(row["model"]))] = {**row, "model": self.key(Path(row["model"]))}
        self.save()

    def sorted_rows(self) -> list[dict[str, Any]]:
        return sorted(self.rows.values(), key=lambda r: (r["method"] != "original", r["method"], r["step"] or 0))

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"slice": asdict(self.slice), "rows": self.sorted_rows()}, indent=2) + "\n")
        os.replace(tmp, self.path)
        csv = self.path.with_suffix(".csv")
        lines = ["method,step,loss,ppl,tokens,model"] + [
            f"{r['method']},{r['step'] if r['step'] is not None else ''},{r['loss']:.6f},{r['ppl']:.4f},"
            f"{r['tokens']},{r['model']}"
            for r in self.sorted_rows()
        ]
        tmp_csv = csv.with_name(f".{csv.name}.tmp-{os.getpid()}")
        tmp_csv.write_text("\n".join(lines) + "\n")
        os.replace(tmp_csv, csv)
