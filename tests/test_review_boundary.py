"""Breaks of the input boundary found by a hostile review, through the real CLI: each case must either work
as a user would expect or fail with one line naming the file, exit code 1, nothing written under --out
and the inputs untouched.

Files are real (tests/factories.py writes them with torch and transformers) and then damaged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import error_line, tree_digest
from factories import write_nanogpt_ckpt

from ckptavg.cli import cli

STEPS = [1000, 2000, 3000]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)


def invoke(*args: object, color: bool = False) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], color=color)


def nano_run(folder: Path) -> Path:
    for s in STEPS:
        write_nanogpt_ckpt(folder / f"ckpt_{s}.pt", s)
    return folder


def edit_ckpt(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def lawa(run: object, out: Path, *extra: object) -> Result:
    return invoke("lawa", run, "--steps", "3000:3000", "--k", 3, "--interval", 1000, "--out", out, *extra)


# ---------------------------------------------------------------- globs find regular files only


def test_a_fifo_matched_by_a_glob_is_not_read(tmp_path: Path):
    """``runs/*.pt`` matching a named pipe: opening it blocked forever waiting for a writer."""
    run = nano_run(tmp_path / "run")
    os.mkfifo(run / "pipe.pt")
    out = tmp_path / "out"

    r = subprocess.run(
        [sys.executable, "-m", "ckptavg", "lawa", f"{run}/*.pt", "--steps", "3000:3000", "--k", "3",
         "--interval", "1000", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out / 'step3000'}\n"


def test_an_output_folder_a_glob_matches_does_not_break_the_next_run(tmp_path: Path):
    """``--out runs/soup.pt`` with ``runs/*.pt``: the output folder it made was then read as a checkpoint."""
    run = nano_run(tmp_path / "run")
    pattern = f"{run}/*.pt"

    first = lawa(pattern, run / "soup.pt")
    assert first.exit_code == 0, first.stderr
    again = lawa(pattern, tmp_path / "out")

    assert again.exit_code == 0, again.stderr
    assert again.stdout == f"{tmp_path / 'out' / 'step3000'}\n"


# ---------------------------------------------------------------- messages are one line, with no escapes


@pytest.mark.parametrize("name", ["red\nline.pt", "\x1b[31mred.pt", "bell\x07.pt"])
def test_a_file_name_with_control_characters_is_shown_escaped(tmp_path: Path, name: str):
    run = nano_run(tmp_path / "run")
    (run / name).write_bytes(b"junk")

    r = invoke("ls", f"{run}/*.pt", color=True)  # color=True: as on a terminal, where click keeps escapes

    line = error_line(r)
    assert not any(ord(c) < 0x20 for c in line), repr(line)
    assert line.endswith(": not a torch checkpoint (neither a zip archive nor a pickle)")
    assert repr(name)[1:-1] in line


def test_a_torch_tensor_name_with_control_characters_is_refused(tmp_path: Path):
    """safetensors headers refused such names, torch files did not: messages broke into lines, and outputs
    were written that ckptavg itself refuses to read."""
    run = nano_run(tmp_path / "run")
    evil = run / "ckpt_3000.pt"
    edit_ckpt(evil, lambda c: c["model"].__setitem__("evil\n\x1b[31mname", torch.ones(3)))
    out = tmp_path / "out"

    line = error_line(lawa(run, out))

    assert line == f'{evil}: tensor name "evil\\n\\u001b[31mname" holds control characters'
    assert not out.exists()


# ---------------------------------------------------------------- nanoGPT's own fields


def test_a_compiled_and_a_plain_name_for_one_tensor_are_refused(tmp_path: Path):
    """``_orig_mod.x`` and ``x`` in one state dict both became ``x``: one of them silently won."""
    run = nano_run(tmp_path / "run")
    bad = run / "ckpt_3000.pt"
    edit_ckpt(bad, lambda c: c["model"].__setitem__("transformer.ln_f.weight", torch.full((16,), 99.0)))
    out = tmp_path / "out"

    line = error_line(lawa(run, out))

    assert line == (
        f"{bad}: tensor 'transformer.ln_f.weight' appears both with and without the "
        "'_orig_mod.' prefix; which one is the model is ambiguous"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("iter_num", "shown"),
    [
        (torch.tensor([1, 2]), "a tensor of 2 elements"),
        (True, "True"),
        (-5, "-5"),
        (torch.tensor(1.5), "tensor(1.5000)"),
        (torch.tensor(-1), "tensor(-1)"),
    ],
)
def test_an_iter_num_that_is_no_step_is_refused(tmp_path: Path, iter_num: object, shown: str):
    run = nano_run(tmp_path / "run")
    bad = run / "ckpt_2000.pt"
    edit_ckpt(bad, lambda c: c.__setitem__("iter_num", iter_num))

    line = error_line(invoke("ls", run))

    assert line == f"{bad}: nanoGPT checkpoint's 'iter_num' is {shown}, not a step (a non-negative integer)"


# ---------------------------------------------------------------- convert: outputs and model_args


@pytest.mark.parametrize("kind", ["file", "symlink", "broken symlink"])
def test_convert_overwrite_onto_a_file_or_link_leaves_only_the_output(tmp_path: Path, kind: str):
    src, out = tmp_path / "ckpt.pt", tmp_path / "gpt2"
    write_nanogpt_ckpt(src, 1000)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    if kind == "file":
        out.write_text("old")
    elif kind == "symlink":
        out.symlink_to(target)
    else:
        out.symlink_to(tmp_path / "nowhere")

    r = invoke("convert", src, "--out", out, "--overwrite")

    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{out}\n"
    assert out.is_dir() and not out.is_symlink() and (out / "model.safetensors").is_file()
    assert (target / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "gpt2", "target"]


def test_convert_may_not_replace_or_write_into_its_input(tmp_path: Path):
    run = nano_run(tmp_path / "run")
    assert lawa(run, tmp_path / "avg").exit_code == 0
    src = tmp_path / "avg" / "step3000"
    before = tree_digest(tmp_path / "avg")

    replace = error_line(invoke("convert", src, "--out", src, "--overwrite"))
    inside = error_line(invoke("convert", src, "--out", src / "gpt2"))

    assert replace == f"{src}: would replace input {src}; choose another --out"
    assert inside == f"{src / 'gpt2'}: would be written inside input {src}; choose another --out"
    assert tree_digest(tmp_path / "avg") == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["model_args"].update(n_embd=32),
            "model_args: vocab_size x n_embd is 96 x 32, but transformer.wte.weight is [96, 16]",
        ),
        (
            lambda c: c["model_args"].update(vocab_size=1 << 30),
            "model_args: vocab_size x n_embd is 1073741824 x 16, but transformer.wte.weight is [96, 16]",
        ),
        (
            lambda c: c["model_args"].update(block_size=1 << 30),
            "model_args: block_size x n_embd is 1073741824 x 16, but transformer.wpe.weight is [32, 16]",
        ),
        (
            lambda c: c["model_args"].update(n_layer=3),
            "model_args: n_layer is 3, but the weights hold 2 blocks (transformer.h.0 to transformer.h.1)",
        ),
        (
            lambda c: [c["model"].pop(k) for k in ("_orig_mod.transformer.wte.weight", "_orig_mod.lm_head.weight")],
            "no tensor transformer.wte.weight; not a nanoGPT GPT",
        ),
        (
            lambda c: c.__setitem__("model", {k: v.to(torch.int32) for k, v in c["model"].items()}),
            "transformer.wte.weight is int32; a GPT-2 folder holds floating-point weights",
        ),
        (
            lambda c: c["model"].__setitem__("_orig_mod.transformer.h.0.ln_1.weight", torch.ones(7)),
            "does not fit GPT-2 (size mismatch for transformer.h.0.ln_1.weight",
        ),
    ],
)
def test_convert_checks_the_weights_against_model_args_before_building(tmp_path: Path, edit, message: str):  # type: ignore[no-untyped-def]
    """model_args sized the model before any tensor was compared: a lying vocab_size allocated gigabytes,
    and a mismatch was a RuntimeError, KeyError or TypeError traceback."""
    src, out = tmp_path / "ckpt.pt", tmp_path / "gpt2"
    write_nanogpt_ckpt(src, 1000)
    edit_ckpt(src, edit)

    line = error_line(invoke("convert", src, "--out", out))

    assert line.startswith(f"{src}: {message}"), line
    assert not out.exists() and not list(tmp_path.glob(".gpt2*"))
