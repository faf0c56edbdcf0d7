"""Held-out loss, disagreement and interpolation on real tiny models written by the factories."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import write_pythia_run

from ckptavg import api, evaluate
from ckptavg.cli import cli
from ckptavg.steps import StepRange

TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs far away"] * 40)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "run"
    write_pythia_run(root, [1000, 2000, 3000, 4000], legacy_buffers=False)
    return root


@pytest.fixture
def text(tmp_path: Path) -> Path:
    p = tmp_path / "heldout.txt"
    p.write_text(TEXT)
    return p


def test_loss_equals_transformers_own_loss(run: Path, text: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sl = evaluate.make_slice(text, max_tokens=300, seq_len=32)
    got = evaluate.evaluate(run / "step2000", sl, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(run / "step2000", dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(run / "step2000")(TEXT, add_special_tokens=False)["input_ids"][:300]
    n = len(ids) // 32
    batch = torch.tensor(ids[: n * 32]).view(n, 32)
    with torch.no_grad():
        ref = model(batch, labels=batch).loss  # transformers' mean over every predicted token
    assert got["tokens"] == n * 31
    assert got["loss"] == pytest.approx(float(ref), rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(float(ref)), rel=1e-6)
    assert (got["method"], got["step"]) == ("original", 2000)


def test_groups_come_from_provenance_not_folder_names(run: Path, text: Path, tmp_path: Path):
    plan = api.plan_lawa(str(run), StepRange(4000, 4000), k=3, out=tmp_path / "o")
    api.average(plan)
    renamed = tmp_path / "step1000"  # a misleading name: provenance says lawa at 4000
    shutil.move(plan.outputs[0], renamed)
    assert evaluate.describe_model(renamed) == {"method": "lawa", "step": 4000}


def test_eval_cli_resumes_and_refuses_another_slice(run: Path, text: Path, tmp_path: Path):
    results = tmp_path / "r.json"
    args = [
        "eval",
        "--run",
        str(run),
        "--steps",
        "1000:3000:2000",
        "--data",
        str(text),
        "--max-tokens",
        "256",
        "--seq-len",
        "32",
        "--results",
        str(results),
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert [ln.split("\t")[:2] for ln in first.stdout.splitlines()] == [["original", "1000"], ["original", "3000"]]
    again = CliRunner().invoke(cli, [*args, str(run / "step2000")])
    assert again.exit_code == 0
    assert again.stderr.count("already in") == 2 and "evaluated" in again.stderr
    saved = json.loads(results.read_text())
    assert [r["step"] for r in saved["rows"]] == [1000, 2000, 3000]
    assert results.with_suffix(".csv").read_text().startswith("method,step,loss,ppl,tokens,model\noriginal,1000,")
    every = CliRunner().invoke(cli, ["eval", "--run", str(run), "--steps", "2000:4000", *args[5:-2]])
    assert [ln.split("\t")[1] for ln in every.stdout.splitlines()] == ["2000", "3000", "4000"]
    other = CliRunner().invoke(cli, [*args[:-2], "--results", str(results), "--seq-len", "16"])
    assert other.exit_code == 1 and "another data slice (seq_len 32 there, 16 here)" in other.stderr


def test_disagreement_and_interpolation_endpoints(run: Path, text: Path):
    base = ["--data", str(text), "--max-tokens", "256", "--seq-len", "32"]
    same = CliRunner().invoke(cli, ["eval", "--disagreement", str(run / "step1000"), str(run / "step1000"), *base])
    assert same.stdout == "0.000000\n"
    differ = CliRunner().invoke(cli, ["eval", "--disagreement", str(run / "step1000"), str(run / "step4000"), *base])
    assert 0 < float(differ.stdout) <= 1

    pytest.importorskip("matplotlib")
    png = run.parent / "interp.png"
    interp = CliRunner().invoke(
        cli,
        ["interpolate", str(run / "step1000"), str(run / "step4000"), "--alphas", "0:1:0.5", *base, "--plot", str(png)],
    )
    assert interp.exit_code == 0, interp.output
    rows = [ln.split("\t") for ln in interp.stdout.splitlines()]
    assert [r[0] for r in rows] == ["0", "0.5", "1"]
    ends = CliRunner().invoke(cli, ["eval", str(run / "step4000"), str(run / "step1000"), *base]).stdout.splitlines()
    loss = {ln.split("\t")[1]: ln.split("\t")[2] for ln in ends}
    assert rows[0][1] == loss["4000"] and rows[2][1] == loss["1000"]  # alpha*A + (1-alpha)*B
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_evaluation_input(run: Path, text: Path, tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--data", str(short), "--seq-len", "32"])
    assert r.exit_code == 1 and "fewer than one sequence of 32" in r.stderr

    ids = tmp_path / "val.bin"
    torch.tensor([1, 2, 3, 500] * 64, dtype=torch.int32).to(torch.uint16).numpy().tofile(ids)
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--data", str(ids), "--seq-len", "16"])
    assert r.exit_code == 1 and "token id 500 is outside" in r.stderr and "vocabulary of 128" in r.stderr

    bare = tmp_path / "bare"
    shutil.copytree(run / "step1000", bare, ignore=shutil.ignore_patterns("tokenizer*"))
    r = CliRunner().invoke(cli, ["eval", str(bare), "--data", str(text)])
    assert r.exit_code == 1 and "no tokenizer" in r.stderr

    from factories import write_nanogpt_ckpt

    write_nanogpt_ckpt(tmp_path / "nano.pt", 1000)
    r = CliRunner().invoke(cli, ["interpolate", str(run / "step1000"), str(tmp_path / "nano.pt"), "--data", str(text)])
    assert r.exit_code == 1 and "is in" in r.stderr and "but not in" in r.stderr


def test_val_bin_tokens(run: Path, tmp_path: Path):
    ids = tmp_path / "val.bin"
    torch.arange(10, 74).repeat(8).to(torch.int32).to(torch.uint16).numpy().tofile(ids)
    sl = evaluate.make_slice(ids, max_tokens=512, seq_len=64)
    got = evaluate.evaluate(run / "step1000", sl)
    assert got["tokens"] == 8 * 63 and math.isfinite(got["loss"])


def test_nanogpt_outputs_are_evaluated_through_gpt2(tmp_path: Path):
    from factories import write_nanogpt_ckpt

    for step in (1000, 2000):
        write_nanogpt_ckpt(tmp_path / "run" / f"ckpt_{step}.pt", step)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(2000, 2000), k=2, out=tmp_path / "o")
    api.average(plan)
    ids = tmp_path / "val.bin"
    torch.arange(0, 96).repeat(4).to(torch.int32).to(torch.uint16).numpy().tofile(ids)
    row = evaluate.evaluate(plan.outputs[0], evaluate.make_slice(ids, 384, 32))
    assert (row["method"], row["step"]) == ("lawa", 2000)
    assert math.isfinite(row["loss"]) and row["tokens"] == 12 * 31


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_study_trainer_writes_a_pythia_layout_run(tmp_path: Path, fmt: str):
    """make study's trainer, shortened: its checkpoints are a run that ckptavg averages and evaluates.

    ``bin`` is how examples/tiny-run is made: Pythia's fp16 pytorch_model.bin, head named embed_out.
    """
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "examples" / "study"
    done = subprocess.run(
        [
            sys.executable,
            str(root / "train.py"),
            "--text",
            str(root / "genesis-kjv.txt"),
            "--lr",
            "3e-3",
            "--steps",
            "40",
            "--save-every",
            "10",
            "--warmup",
            "5",
            "--format",
            fmt,
            "--out",
            str(tmp_path / "lr3e-3"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "lr3e-3").iterdir()) == ["step10", "step20", "step30", "step40"]
    if fmt == "bin":
        state = torch.load(tmp_path / "lr3e-3" / "step40" / "pytorch_model.bin", weights_only=True)
        assert "embed_out.weight" in state and "gpt_neox.layers.0.attention.masked_bias" in state
        assert {t.dtype for t in state.values()} == {torch.float16, torch.bool}
    plan = api.plan_lawa(str(tmp_path / "lr3e-3"), StepRange(40, 40), k=3, out=tmp_path / "lawa")
    api.average(plan)
    sl = evaluate.make_slice(tmp_path / "heldout.txt", max_tokens=2048, seq_len=64)
    row = evaluate.evaluate(plan.outputs[0], sl)
    assert row["method"] == "lawa" and math.isfinite(row["loss"])
