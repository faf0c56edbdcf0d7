"""eval and plot under hostile input and shared results files, through the real CLI.

Each failing case: one line on stderr naming the file or option, exit code 1 (2 for usage errors), no
traceback, and nothing left behind: no results file, CSV, temporary or lock file, no image. Models are
real tiny GPT-NeoX and GPT-2 folders written by tests/factories.py and transformers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from factories import write_pythia_run, write_tokenizer

from ckptavg import evaluate
from ckptavg.cli import check_plot_target, cli
from ckptavg.errors import OutputError, ResultsFileError
from ckptavg.results import Results

TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs far away"] * 8)
STEPS = [1000, 2000, 3000, 4000, 5000, 6000]
SMALL = ["--max-tokens", "64", "--seq-len", "32"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "run"
    write_pythia_run(root, STEPS, fmt="safetensors", legacy_buffers=False)
    return root


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding only heldout.txt: after a failure it must hold nothing more."""
    (tmp_path / "heldout.txt").write_text(TEXT)
    return tmp_path


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, err
    assert result.stdout == ""
    return lines[0].removeprefix("Error: ")


def left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "heldout.txt")


# ---------------------------------------------------------------- sharing one results file


def test_two_writers_of_one_results_file_keep_every_row(run: Path, work: Path):
    """Two Results on one file, as two job-array tasks hold them: each add merges with what is on disk."""
    sl = evaluate.make_slice(work / "heldout.txt", 64, 32)
    a, b = Results(work / "r.json", sl), Results(work / "r.json", sl)
    row = {"method": "original", "loss": 4.0, "ppl": math.exp(4.0), "tokens": 62}
    a.add({**row, "model": str(run / "step1000"), "step": 1000})
    b.add({**row, "model": str(run / "step2000"), "step": 2000})  # b read the file before a wrote it
    a.add({**row, "model": str(run / "step3000"), "step": 3000})
    saved = json.loads((work / "r.json").read_text())
    assert [r["step"] for r in saved["rows"]] == [1000, 2000, 3000]
    assert b.has(run / "step1000")  # what others wrote is seen before evaluating again
    assert left(work) == ["r.csv", "r.json"]  # no lock or temporary file stays


def _eval_in_child(args: list[str], ready: Any) -> None:
    ready.wait(timeout=60)  # both processes start evaluating at once
    cli.main(args, prog_name="ckptavg")  # exits with the command's exit code


def test_concurrent_eval_processes_share_one_results_file(run: Path, work: Path):
    """A SLURM job array in miniature: two processes, three models each, one --results; each runs the real
    CLI and rewrites the file after every model. They fork from a fresh server process that has imported
    torch and transformers once (a new interpreter takes ~10 s for that; forking this one, whose threads
    other tests may have left holding locks, can hang the child)."""
    results = work / "shared.json"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "ckptavg.cli", "ckptavg.evaluate"])
    ready = ctx.Barrier(2)
    procs = []
    for steps in (STEPS[0::2], STEPS[1::2]):
        models = [str(run / f"step{s}") for s in steps]
        args = ["eval", *models, "--data", str(work / "heldout.txt"), *SMALL, "--results", str(results)]
        procs.append(ctx.Process(target=_eval_in_child, args=(args, ready)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0
    saved = json.loads(results.read_text())
    assert [r["step"] for r in saved["rows"]] == STEPS
    csv = results.with_suffix(".csv").read_text().splitlines()
    assert csv[0] == "method,step,loss,ppl,tokens,model"
    assert [ln.split(",")[1] for ln in csv[1:]] == [str(s) for s in STEPS]
    assert left(work) == ["shared.csv", "shared.json"]


def test_results_file_that_eval_did_not_write_is_refused_naming_the_row(run: Path, work: Path):
    good = {"model": "/m", "method": "original", "step": 1, "loss": 3.0, "ppl": 20.0, "tokens": 31}
    cases = [  # and whether plot, which needs only method, step and loss, refuses it too
        ([good, "step1000"], "row 1: is a JSON string, not an object", True),
        ([good, {k: v for k, v in good.items() if k != "loss"}], "row 1: has no 'loss'", True),
        ([{**good, "step": "1000"}], "row 0: 'step' is \"1000\", not a step number or null", True),
        ([good, good, {**good, "loss": float("nan")}], "row 2: 'loss' is nan, not a finite number", True),
        ([{**good, "tokens": True}], "row 0: 'tokens' is true, not a positive count", False),
    ]
    sl = evaluate.asdict(evaluate.make_slice(work / "heldout.txt", 64, 32))
    for rows, message, plot_too in cases:
        results = work / "r.json"
        results.write_text(json.dumps({"slice": sl, "rows": rows}))
        before = results.read_bytes()
        err = one_line(invoke("eval", run / "step1000", "--data", work / "heldout.txt", *SMALL, "--results", results))
        assert err.startswith(f"{results}: {message}"), err
        assert results.read_bytes() == before and left(work) == ["r.json"]
        if plot_too:
            err = one_line(invoke("plot", results, "-o", work / "c.png"))
            assert err.startswith(f"{results}: {message}") and left(work) == ["r.json"]
    results.write_text("[1, 2]")
    err = one_line(invoke("plot", results, "-o", work / "c.png"))
    assert err == f"{results}: not a ckptavg results file (no 'slice' and 'rows')"


def test_results_option_checked_before_any_model(run: Path, work: Path):
    base = ["eval", run / "step1000", "--data", work / "heldout.txt", *SMALL]
    err = one_line(invoke(*base, "--results", work / "no" / "r.json"))
    assert err.startswith(f"--results {work / 'no' / 'r.json'}: folder {work / 'no'} does not exist")
    assert left(work) == []
    err = one_line(invoke(*base, "--results", work / "r.csv"))
    assert "the CSV goes beside it; use a .json name" in err and left(work) == []


# ---------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "is empty: no tokens to score"),
        ("latin1.txt", b"the fox " * 10 + "caf\xe9".encode("latin-1"), "byte 0xe9 at offset 83"),
        ("binary.txt", b"the fox\x00\x01\x02", "holds a NUL byte at offset 7: binary, not text"),
        ("odd.bin", b"\x01\x00\x02", "3 bytes, not a whole number of uint16 token ids"),
        ("empty.bin", b"", "is empty"),
    ],
)
def test_data_that_is_not_text_is_refused_with_where(run: Path, work: Path, name: str, content: bytes, message: str):
    data = work / name
    data.write_bytes(content)
    err = one_line(invoke("eval", run / "step1000", "--data", data, *SMALL, "--results", work / "r.json"))
    assert err.startswith(f"{data}: ") and message in err, err
    assert left(work) == [name]


def test_invalid_utf8_offset_across_read_chunks(tmp_path: Path):
    data = tmp_path / "t.txt"
    data.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode()[:1] + b"x")  # a character split by the 1 MiB read
    with pytest.raises(Exception, match=f"byte 0xc3 at offset {(1 << 20) - 1}"):
        evaluate.make_slice(data, 64, 32)


# ---------------------------------------------------------------- models and options


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 has learned positions: n_positions rows of them, and nothing past them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "step1000"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=128)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def test_seq_len_past_learned_positions_is_refused_naming_option_and_model(gpt2: Path, work: Path):
    data = ["--data", work / "heldout.txt", "--results", work / "r.json"]
    err = one_line(invoke("eval", gpt2, *data, "--seq-len", 48, "--max-tokens", 96))
    assert err == f"--seq-len 48 is longer than the 32 positions {gpt2} has (n_positions); give --seq-len 32 or less"
    err = one_line(invoke("eval", gpt2, *data))
    assert err.startswith("--seq-len 64 (the default) is longer than the 32 positions")
    assert left(work) == []


def test_seq_len_past_rotary_context_is_scored_with_a_warning(run: Path, work: Path):
    r = invoke("eval", run / "step1000", "--data", work / "heldout.txt", "--seq-len", 80, "--max-tokens", 160)
    assert r.exit_code == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "--seq-len 80 is longer than the 64 positions it was trained on" in warning[0]
    assert "(max_position_embeddings)" in warning[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": 128}, "weights do not fit config.json: gpt_neox.layers.0.mlp.dense_4h_to_h.weight"),
        ({"num_hidden_layers": 3}, "weights lack tensors that config.json asks for: gpt_neox.layers.2."),
    ],
)
def test_model_whose_config_disagrees_with_its_weights(run: Path, work: Path, change: dict, message: str):
    folder = work / "model"
    shutil.copytree(run / "step1000", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    err = one_line(invoke("eval", folder, "--data", work / "heldout.txt", *SMALL, "--results", work / "r.json"))
    assert err.startswith(f"{folder}: {message}"), err
    assert left(work) == ["model"]


def test_huge_steps_range_is_refused_from_arithmetic(run: Path, work: Path):
    data = ["--data", work / "heldout.txt", *SMALL, "--results", work / "r.json"]
    err = one_line(invoke("eval", "--run", run, "--steps", "0:1000000000000:1", *data))
    assert err == (
        f"--steps 0:1000000000000:1 names 1000000000001 steps, but {run} has 6 checkpoints (steps 1000..6000); "
        "narrow START:END or give a larger EVERY"
    )
    err = one_line(invoke("eval", "--run", run, "--steps", "1000:3000:500", *data))
    assert err.startswith("steps 1500, 2500") and "not found" in err
    assert left(work) == []


def test_options_are_named_as_given(run: Path, work: Path):
    data = ["--data", work / "heldout.txt"]
    err = one_line(invoke("eval", run / "step1000", *data, "--seq-len", 40000), code=2)
    assert "--seq-len 40000: longer than the --max-tokens 32768 (the default) scored" in err
    err = one_line(invoke("eval", run / "step1000", *data, "--max-tokens", 10), code=2)
    assert "--max-tokens 10: shorter than one sequence of --seq-len 64 (the default)" in err
    err = one_line(invoke("eval", run / "step1000", *data, "--steps", "1000:2000"), code=2)
    assert "--steps needs --run RUN" in err
    err = one_line(invoke("eval", run / "step1000", *data, "--batch-size", 10**9), code=2)
    assert "--batch-size" in err
    if not __import__("torch").cuda.is_available():
        err = one_line(invoke("eval", run / "step1000", *data, "--device", "cuda"), code=2)
        assert "--device" in err and "no CUDA device here" in err
    assert left(work) == []


# ---------------------------------------------------------------- plot


ROWS = [{"method": "original", "step": s, "loss": 3.0 - s / 1e4, "model": f"o{s}"} for s in (1000, 2000)]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing/c.png", "-o {p}: folder {w}/missing does not exist; create it or choose another -o"),
        ("curves", "-o {p}: a name without an image suffix is not an image format matplotlib writes"),
        ("curves.gif", "-o {p}: a .gif file is not an image format matplotlib writes; use .png, .pdf or .svg"),
    ],
)
def test_plot_target_checked_before_drawing(work: Path, target: str, message: str):
    pytest.importorskip("matplotlib")
    results = work / "r.json"
    results.write_text(json.dumps({"slice": {}, "rows": ROWS}))
    out = work / target
    err = one_line(invoke("plot", results, "-o", out))
    assert err.startswith(message.format(p=out, w=work)), err
    assert left(work) == ["r.json"]
    with pytest.raises(OutputError, match="--plot"):
        check_plot_target(out)  # what interpolate --plot checks before evaluating


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_plot_into_a_read_only_folder(work: Path):
    pytest.importorskip("matplotlib")
    results = work / "r.json"
    results.write_text(json.dumps({"slice": {}, "rows": ROWS}))
    (work / "ro").mkdir(mode=0o555)
    err = one_line(invoke("plot", results, "-o", work / "ro" / "c.png"))
    assert "cannot write in" in err and "choose another -o" in err


def test_plot_of_nothing_plottable(work: Path):
    results = work / "r.json"
    results.write_text(json.dumps({"slice": {}, "rows": [{**ROWS[0], "step": None}]}))
    err = one_line(invoke("plot", results, "-o", work / "c.png"))
    assert err.startswith(f"{results}: no rows with a training step to plot")
    results.write_text(json.dumps({"slice": {}, "rows": [ROWS[0], {**ROWS[1], "loss": None}]}))
    err = one_line(invoke("plot", results, "-o", work / "c.png"))
    assert err.startswith(f"{results}: row 1: 'loss' is null, not a finite number")
    results.write_text('{"slice": {}, "rows": [{"method": "o", "step": 1, "loss": NaN}]}')
    err = one_line(invoke("plot", results, "-o", work / "c.png"))
    assert err.startswith(f"{results}: row 0: 'loss' is nan")
    assert left(work) == ["r.json"]


def test_results_error_type():
    with pytest.raises(ResultsFileError, match="row 0: is a JSON array"):
        from ckptavg.results import check_row

        check_row(Path("r.json"), 0, [])
