"""The command line: help, stdout holding only results, exit codes, and every command README shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "tiny-run"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    lines = [ln.split("  #")[0].strip() for b in blocks("sh") for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith("ckptavg ")]


@pytest.fixture
def in_example_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "tiny-run").symlink_to(EXAMPLE)
    (tmp_path / "examples" / "heldout.txt").symlink_to(EXAMPLE.parent / "heldout.txt")
    (tmp_path / "examples" / "tiny-nanogpt").symlink_to(EXAMPLE.parent / "tiny-nanogpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_for_every_command(name: str):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert f"ckptavg {name}" in result.output  # an example line


def test_readme_documents_every_command():
    shown = {c.split()[1] for c in readme_commands()}
    assert shown == set(cli.commands)


def test_readme_commands_run_in_order(in_example_dir: Path):
    """Every command README shows, in one folder and in order, as a user would paste them."""
    import glob

    for command in readme_commands():
        args: list[str] = []
        for token in shlex.split(command)[1:]:  # the shell features README uses: globs and one redirect
            args += sorted(glob.glob(token)) or [token] if "*" in token else [token]
        redirect = args[args.index(">") + 1] if ">" in args else None
        args = args[: args.index(">")] if redirect else args
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, f"{command}\n{result.output}{result.exception}"
        assert result.stdout.strip(), command
        if redirect:
            Path(redirect).write_text(result.stdout)
        if args[0] in ("lawa", "ema", "swa", "avg") and "--dry-run" not in args:
            for line in result.stdout.splitlines():
                out = Path(json.loads(line)["out"] if line.startswith("{") else line)
                assert (out / "model.safetensors").is_file() and (out / "ckptavg.json").is_file()


def test_readme_python_api_runs(in_example_dir: Path):
    (code,) = blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    assert (in_example_dir / "averaged" / "step10000" / "model.safetensors").is_file()


def test_stdout_is_exactly_the_output_paths(in_example_dir: Path):
    args = ["lawa", "examples/tiny-run", "--steps", "8000:10000", "--k", "3", "--out", "o"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["o/step8000", "o/step9000", "o/step10000"]
    assert "ckptavg: wrote o/step10000 (lawa, 3 members, steps 8000..10000" in result.stderr
    again = CliRunner().invoke(cli, args + ["--json"])
    assert [json.loads(ln) for ln in again.stdout.splitlines()] == [{"out": f"o/step{s}"} for s in (8000, 9000, 10000)]
    assert "complete (same plan); skipped" in again.stderr


def test_dry_run_writes_nothing(in_example_dir: Path):
    args = ["ema", "examples/tiny-run", "--steps", "1000:10000", "--interval", "3000", "--out", "o", "--dry-run"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0
    rows = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [r["step"] for r in rows] == [1000, 4000, 7000, 10000]
    assert rows[-1]["members"] == list(range(1000, 10001, 1000))
    assert rows[-1]["bytes_to_read"] > 0
    assert not (in_example_dir / "o").exists()


def test_usage_errors_exit_2_and_input_errors_exit_1(in_example_dir: Path):
    usage = CliRunner().invoke(cli, ["lawa", "examples/tiny-run", "--out", "o"])
    assert usage.exit_code == 2 and "--steps" in usage.stderr
    missing = CliRunner().invoke(cli, ["lawa", "examples/tiny-run", "--steps", "10000:12000", "--out", "o"])
    assert missing.exit_code == 1
    assert missing.stderr.strip().splitlines() == [
        "Error: steps 11000, 12000 not found in examples/tiny-run (nearest available: 10000)"
    ]
    assert not (in_example_dir / "o").exists()


def test_broken_pipe_is_quiet(in_example_dir: Path):
    """`ckptavg ... | head -1`: the reader leaves early. Here it has left before the first line."""
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptavg", "plan", "examples/tiny-run", "--steps", "5000:10000", "--k", "5"],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(w)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_ls_lists_steps_formats_sizes():
    result = CliRunner().invoke(cli, ["ls", str(EXAMPLE), "--json"])
    rows = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(1000, 10001, 1000))
    assert rows[0]["format"] == "bin"
    assert rows[0]["bytes"] == (EXAMPLE / "step1000" / "pytorch_model.bin").stat().st_size


def test_output_never_replaces_an_input(in_example_dir: Path, tmp_path: Path):
    import shutil

    shutil.copytree(EXAMPLE, tmp_path / "run", symlinks=False)
    before = (tmp_path / "run" / "step10000" / "pytorch_model.bin").read_bytes()
    args = ["lawa", "run", "--steps", "10000:10000", "--k", "3", "--out", "run", "--overwrite"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "would replace input" in result.stderr and "step10000" in result.stderr
    assert (tmp_path / "run" / "step10000" / "pytorch_model.bin").read_bytes() == before
