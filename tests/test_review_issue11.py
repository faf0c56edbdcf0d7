"""Adversarial review of --revision-pattern, --tokenizer/--hash/provenance, --format ckpt and eval --tasks:
each test is a break found by a hostile user, file or server, and states the behaviour that holds now.

Real files and clients throughout: tiny runs written by the factories, the real huggingface_hub client
against the Hub-like server on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from factories import write_pythia_run, write_pythia_step
from hub_server import HubServer

from ckptavg.cli import cli

STEPS = [1000, 2000, 3000]
RUN_REPO = "EleutherAI/pythia-tiny"
TOK_REPO = "someone/tokenizer-only"
SECRET = "hunter2-s3cret"


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    write_pythia_step(root / TOK_REPO / "main", 1000, fmt="safetensors")
    for s in STEPS:
        write_pythia_step(root / RUN_REPO / f"step{s}", s)
    with HubServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bare")
    write_pythia_run(root / "run", STEPS, fmt="safetensors", tokenizer=False)
    return root / "run"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


# ---------------------------------------------------------------- credentials in the endpoint URL


def test_endpoint_credentials_never_reach_provenance(hub: HubServer, tmp_path: Path):
    """HF_ENDPOINT=http://user:password@mirror is how some mirrors are reached; the password must not be
    written into every output's ckptavg.json (outputs are pushed to the Hub), nor printed."""
    endpoint = with_credentials(hub.url)
    args = ["--repo", RUN_REPO, "--cache-dir", tmp_path / "cache", "--tokenizer", TOK_REPO]
    r = invoke("lawa", "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "lawa", *args,
               env={"HF_ENDPOINT": endpoint})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert SECRET not in r.output
    text = (tmp_path / "lawa" / "step3000" / "ckptavg.json").read_text()
    assert SECRET not in text
    record = json.loads(text)
    assert record["origin"]["endpoint"] == hub.url
    assert record["tokenizer_origin"]["endpoint"] == hub.url


def test_endpoint_credentials_never_reach_an_error_line(hub: HubServer, tmp_path: Path):
    endpoint = with_credentials(hub.url)
    r = invoke("lawa", "--repo", "nobody/nothing", "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "o",
               "--cache-dir", tmp_path / "cache", "--endpoint", endpoint)  # fmt: skip
    assert r.exit_code == 1
    assert SECRET not in r.output
    r = invoke("lawa", tmp_path / "nope", "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "o",
               "--tokenizer", "nobody/nothing", "--cache-dir", tmp_path / "cache", "--endpoint", endpoint)  # fmt: skip
    assert r.exit_code in (1, 2)
    assert SECRET not in r.output


# ---------------------------------------------------------------- plot: names are text, not TeX


def test_plot_draws_a_task_named_with_dollar_signs(tmp_path: Path):
    """A task's name comes from its YAML (and a results file from anywhere): matplotlib parsed
    '$...$' in it as TeX, and an unknown command stopped plot with a 60-line traceback."""
    pytest.importorskip("matplotlib")
    rows = [
        {"model": f"lawa/step{s}", "method": "lawa", "step": s, "task": r"price $\approxx$ cost", "task_hash": "h",
         "n": 4, "metrics": {"acc": 0.25 * s}}
        for s in (1, 2)
    ]  # fmt: skip
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"slice": None, "rows": rows}))
    r = invoke("plot", results, "-o", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# ---------------------------------------------------------------- provenance's cwd


def test_a_run_from_a_removed_directory_records_no_cwd(bare: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell left in a folder that was removed since (a scratch dir, a job's submit dir): every path
    given is absolute, so the run works, but provenance's os.getcwd() raised FileNotFoundError and the
    run ended in a traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    r = invoke("lawa", bare, "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "lawa")
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "lawa" / "step3000" / "ckptavg.json").read_text())
    assert record["cwd"] is None
