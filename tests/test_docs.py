"""README and --help cannot drift apart: every option a command has is documented, and every option README
names exists (in the spirit of simonw/llm's documentation checks)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ckptavg.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FLAG = re.compile(r"(?<![\w-])(--[a-z](?:[a-z0-9_-]*[a-z0-9])?)")

# Flags README names that belong to other programs, and whose they are.
OTHERS = {
    "--array": "sbatch",
    "--chdir": "sbatch",
    "--cpus-per-task": "sbatch",
    "--export": "sbatch",
    "--index-url": "pip",
    "--init_from": "nanoGPT's train.py",
    "--lazy-unpickle": "mergekit",
    "--model": "lm_eval",
    "--model_args": "lm_eval",
    "--tasks": "lm_eval",
    "--fault": "benchmarks/hub.py",
    "--repeat": "benchmarks/run.py",
    "--only": "benchmarks/run.py",
    "--small": "benchmarks/gpu.sh",
    "--help": "every command (click)",
    **{f: "examples/study/train.py" for f in ("--batch", "--lr", "--save-every", "--seed", "--threads")},
}


def options(command: click.Command) -> set[str]:
    return {
        name
        for p in command.params
        if isinstance(p, click.Option) and not p.hidden
        for name in p.opts + p.secondary_opts
        if name.startswith("--") and name != "--help"
    }


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_in_help_is_in_readme(name: str):
    documented = set(FLAG.findall(README))
    missing = sorted(options(cli.commands[name]) - documented)
    assert not missing, f"ckptavg {name}: {', '.join(missing)} not mentioned in README.md"


def test_every_option_readme_names_exists():
    ours = {o for c in cli.commands.values() for o in options(c)}
    unknown = sorted(set(FLAG.findall(README)) - ours - OTHERS.keys())
    assert not unknown, f"README.md names {', '.join(unknown)}, which no ckptavg command has"
