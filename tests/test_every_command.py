"""Every command of the CLI under hostile option values and files: one line naming the option or file,
exit code 1 (2 for usage errors), no traceback, stdout empty, and nothing created or changed anywhere in
the folder the command ran in (no output, temporary folder, lock, results or image file).

A command cannot ship without rows here: ``test_every_command_has_hostile_cases`` compares the table
with the commands the CLI has.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import write_nanogpt_ckpt, write_pythia_run

from ckptavg.cli import cli

STEPS = [1000, 2000, 3000]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40

# command -> (arguments, exit code, a fragment of the one line). In arguments, {run} is a run of three
# step folders, {ckpt} a nanoGPT ckpt.pt, {text} held-out text, {empty} an empty file, {trunc} a
# truncated ckpt.pt, {notjson} a file that is not JSON, {w} the folder the command runs in.
CASES: dict[str, list[tuple[list[str], int, str]]] = {
    "lawa": [
        (["{run}", "--steps", "3000:3000", "--k", "0", "--out", "{w}/o"], 2, "'--k': 0 is not in the range"),
        (["{run}", "--steps", "3000:30000000", "--k", "2", "--out", "{w}/o"], 1, "--steps 3000:30000000"),
        (["{run}", "--steps", "3000:3000", "--k", "2", "--out", "{w}/o\nx"], 1, "may not hold a line break"),
        (["{run}", "--steps", "3000:3000", "--max-shard-size", "-1GB", "--out", "{w}/o"], 2, "is negative"),
        (["{run}", "--steps", "3000:3000", "--k", "2", "--out", "{run}"], 1, "choose another --out"),
    ],
    "ema": [
        (["{run}", "--steps", "1000:3000", "--decay", "1.5", "--out", "{w}/o"], 2, "'--decay': 1.5 is not in"),
        (["{run}", "--steps", "1000:3000", "--every", "0", "--out", "{w}/o"], 2, "'--every': 0 is not in"),
    ],
    "swa": [
        (["{run}", "--steps", "3000:3000", "--interval", "0", "--out", "{w}/o"], 2, "'--interval': 0 is not"),
        (["{run}", "--steps", "3000:3000", "--start", "-5", "--out", "{w}/o"], 2, "'--start': -5 is not"),
    ],
    "avg": [
        (["{run}/step1000", "{w}/nowhere", "--out", "{w}/o"], 1, "nowhere: no such file or folder"),
        (["{run}/step1000", "{run}/step2000", "--weights", "nan,1", "--out", "{w}/o"], 2, "--weights"),
        (["{trunc}", "{ckpt}", "--out", "{w}/o"], 1, "trunc.pt: "),
    ],
    "plan": [
        (["{run}", "--steps", "1000:3000", "--interval", "0"], 2, "'--interval': 0 is not"),
        (["{w}/nowhere", "--steps", "1000:3000"], 1, "nowhere: no such run folder"),
    ],
    "status": [
        ([], 2, "Missing argument 'COMMAND...'"),
        (["lawa", "{run}", "--steps", "3000:3000", "--k", "0", "--out", "{w}/o"], 2, "'--k': 0 is not"),
    ],
    "slurm": [
        (["--time", "1\n#SBATCH --uid=0", "lawa", "{run}", "--steps", "3000:3000", "--out", "{w}/o"], 2, "--time"),
        (["--mem", "4X", "lawa", "{run}", "--steps", "3000:3000", "--out", "{w}/o"], 2, "not a SLURM memory size"),
        (["--job-name", "a b", "lawa", "{run}", "--steps", "3000:3000", "--out", "{w}/o"], 2, "--job-name"),
    ],
    "eval": [
        (["{run}/step1000", "--data", "{empty}"], 1, "is empty: no tokens to score"),
        (["{run}/step1000", "--data", "{text}", "--seq-len", "1"], 2, "'--seq-len': 1 is not in the range"),
        (["{run}/step1000", "--data", "{text}", "--results", "{w}/no/r.json"], 1, "does not exist"),
        (["--run", "{run}", "--steps", "0:1000000000000:1", "--data", "{text}"], 1, "names 1000000000001 steps"),
    ],
    "interpolate": [
        (["{run}/step1000", "{run}/step2000", "--alphas", "0:1:1e-300", "--data", "{text}"], 2, "points"),
        (
            ["{run}/step1000", "{run}/step2000", "--alphas", "0:1:0.5", "--data", "{text}", "--plot", "{w}/x.gif"],
            1,
            "--plot",
        ),  # fmt: skip
        (["{run}/step1000", "{run}/step2000", "--alphas", "0:1:0.5", "--data", "{empty}"], 1, "is empty"),
    ],
    "plot": [
        (["{notjson}", "-o", "{w}/c.png"], 1, "notjson.json: "),
        (["{notjson}", "-o", "{w}/c.gif"], 1, "-o "),
    ],
    "convert": [
        (["{trunc}", "--out", "{w}/gpt2"], 1, "trunc.pt: "),
        (["{ckpt}", "--out", "{text}"], 1, "already exists; pass --overwrite"),
        (["{ckpt}", "--out", "{w}/g", "--tokenizer", "{w}/nowhere"], 2, "--tokenizer"),
    ],
    "ls": [
        (["{w}/nowhere"], 1, "nowhere: no such run folder"),
        (["{run}", "--retry-time", "nan"], 2, "'--retry-time': nan is not a finite number"),
    ],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    write_pythia_run(root / "run", STEPS, fmt="safetensors", legacy_buffers=False)
    write_nanogpt_ckpt(root / "ckpt.pt", 1000)
    data = (root / "ckpt.pt").read_bytes()
    (root / "trunc.pt").write_bytes(data[: len(data) // 2])
    (root / "text.txt").write_text(TEXT)
    (root / "empty.txt").write_bytes(b"")
    (root / "notjson.json").write_text("{not json")
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()}


def digest(root: Path) -> dict[str, str]:
    """Every name under ``root`` (hidden ones too) with its content hash or kind."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return seen


def test_every_command_has_hostile_cases():
    assert sorted(CASES) == sorted(cli.commands)


@pytest.mark.parametrize(
    ("command", "args", "code", "fragment"),
    [(c, a, code, f) for c, rows in CASES.items() for a, code, f in rows],
    ids=[f"{c}-{i}" for c, rows in CASES.items() for i in range(len(rows))],
)
def test_hostile_values_are_one_line_and_leave_nothing(
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    args: list[str],
    code: int,
    fragment: str,
):
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a temporary folder left in $TMPDIR counts as left too
    values = {"w": str(tmp_path), **{k: str(v) for k, v in inputs.items()}}
    argv = [command, *(a.format(**values) for a in args)]
    before_inputs = digest(inputs["run"].parent)

    r = CliRunner().invoke(cli, argv)

    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert "Traceback" not in r.stderr and r.stdout == ""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, r.stderr
    if code == 1:
        assert r.stderr == errors[0] + "\n", r.stderr  # nothing but the one line
    assert fragment in errors[0], errors[0]
    assert digest(tmp_path) == {}, "left behind in the folder the command ran in"
    assert digest(inputs["run"].parent) == before_inputs, "an input changed"
