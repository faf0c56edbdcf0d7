"""--tokenizer DIR|REPO: outputs that transformers and lm-eval can use although the run has no tokenizer.

Real files throughout: tiny GPT-NeoX runs written by transformers, a tokenizer saved by the tokenizers
library, and for REPO the real huggingface_hub client against the Hub-like server on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import error_line
from factories import write_pythia_run, write_pythia_step, write_tokenizer
from hub_server import HubServer, commit_of

from ckptavg import api
from ckptavg.cli import cli
from ckptavg.sources.extras import local_tokenizer
from ckptavg.steps import StepRange

STEPS = [1000, 2000, 3000]
TOK_REPO = "someone/tokenizer-only"
RUN_REPO = "EleutherAI/pythia-tiny"
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def warning_lines(result: Result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("ckptavg: warning:")]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run without tokenizer files (as research runs often are), one with its own, and a tokenizer."""
    root = tmp_path_factory.mktemp("tok")
    write_pythia_run(root / "bare", STEPS, fmt="safetensors", tokenizer=False)
    write_pythia_run(root / "own", STEPS, fmt="safetensors")
    for s in STEPS:  # a file of the run's tokenizer that the given one lacks: it must not survive
        (root / "own" / f"step{s}" / "special_tokens_map.json").write_text("{}\n")
    write_tokenizer(root / "tok")
    config = json.loads((root / "tok" / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"  # so the given tokenizer's files differ from the run's
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "notok").mkdir()
    (root / "notok" / "config.json").write_text("{}\n")  # a model file, but no tokenizer file
    return {"bare": root / "bare", "own": root / "own", "tok": root / "tok", "notok": root / "notok"}


def lawa(run: Path, out: Path, *extra: object) -> Result:
    return invoke("lawa", run, "--steps", "3000:3000", "--k", "2", "--out", out, *extra)


# ---------------------------------------------------------------- --tokenizer DIR


def test_tokenizer_dir_is_copied_and_loads_in_transformers(files: dict[str, Path], tmp_path: Path):
    from transformers import AutoTokenizer

    r = lawa(files["bare"], tmp_path / "lawa", "--tokenizer", files["tok"])
    assert r.exit_code == 0, r.output
    assert warning_lines(r) == []
    out = tmp_path / "lawa" / "step3000"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (files["tok"] / name).read_bytes()
    got, want = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(files["tok"])
    ids = got("hello world")["input_ids"]
    assert len(ids) == len("hello world") and ids == want("hello world")["input_ids"]
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["tokenizer_origin"] == {"path": str(files["tok"].absolute())}
    assert set(record["tokenizer"]) == {"tokenizer.json", "tokenizer_config.json"}


def test_tokenizer_replaces_the_runs_own(files: dict[str, Path], tmp_path: Path):
    r = lawa(files["own"], tmp_path / "lawa", "--tokenizer", files["tok"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "lawa" / "step3000"
    assert (out / "tokenizer_config.json").read_bytes() == (files["tok"] / "tokenizer_config.json").read_bytes()
    assert not (out / "special_tokens_map.json").exists()  # the run's tokenizer file, not the given one's
    assert (out / "config.json").read_bytes() == (files["own"] / "step3000" / "config.json").read_bytes()


def test_a_run_without_tokenizer_warns_once_per_command(files: dict[str, Path], tmp_path: Path):
    out = tmp_path / "lawa"
    r = invoke("lawa", files["bare"], "--steps", "2000:3000", "--k", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert warning_lines(r) == [
        f"ckptavg: warning: {out / 'step2000'} and 1 more output will have no tokenizer (the run has none); "
        "pass --tokenizer DIR|REPO so that transformers and lm-eval can use it"
    ]
    assert r.stdout.splitlines() == [str(out / "step2000"), str(out / "step3000")]  # stdout: results only
    again = invoke("lawa", files["bare"], "--steps", "2000:3000", "--k", "2", "--out", out)
    assert again.exit_code == 0 and warning_lines(again) == []  # nothing made: nothing to warn about

    quiet = lawa(files["bare"], tmp_path / "q", "-q")  # -q: no log lines, warnings included (as everywhere)
    assert quiet.exit_code == 0 and quiet.stderr == ""

    own = lawa(files["own"], tmp_path / "own")
    assert own.exit_code == 0 and warning_lines(own) == []


def test_avg_warning_names_its_output(files: dict[str, Path], tmp_path: Path):
    r = invoke("avg", files["bare"] / "step1000", files["bare"] / "step2000", "--out", tmp_path / "soup")
    assert r.exit_code == 0, r.output
    assert warning_lines(r) == [
        f"ckptavg: warning: {tmp_path / 'soup'} will have no tokenizer (its last checkpoint has none); "
        "pass --tokenizer DIR|REPO so that transformers and lm-eval can use it"
    ]


@pytest.mark.parametrize("command", ["lawa", "ema", "swa", "avg"])
def test_a_folder_without_tokenizer_files_is_refused_before_any_work(
    files: dict[str, Path], tmp_path: Path, command: str
):
    out = tmp_path / "out"
    args = {
        "lawa": ["lawa", files["bare"], "--steps", "3000:3000", "--k", "2"],
        "ema": ["ema", files["bare"], "--steps", "3000:3000"],
        "swa": ["swa", files["bare"], "--steps", "3000:3000"],
        "avg": ["avg", files["bare"] / "step1000", files["bare"] / "step2000"],
    }[command]
    msg = error_line(invoke(*args, "--out", out, "--tokenizer", files["notok"]))
    assert msg == (
        f"{files['notok']}: --tokenizer: no tokenizer files here (looked for tokenizer.json, vocab.json, "
        "tokenizer.model, ...)"
    )
    assert not out.exists()


def test_a_tokenizer_that_is_neither_a_folder_nor_a_repo_id(files: dict[str, Path], tmp_path: Path):
    nowhere = tmp_path / "no" / "such" / "dir"
    msg = error_line(lawa(files["bare"], tmp_path / "o", "--tokenizer", nowhere))
    assert msg == f"--tokenizer {nowhere}: no such folder, and not a Hub repository id (ORG/NAME)"
    (tmp_path / "afile").write_text("x")
    msg = error_line(lawa(files["bare"], tmp_path / "o", "--tokenizer", tmp_path / "afile"))
    assert msg.startswith(f"--tokenizer {tmp_path / 'afile'}: not a folder")
    assert not (tmp_path / "o").exists()


def test_another_tokenizer_remakes_the_output_and_the_same_one_skips(files: dict[str, Path], tmp_path: Path):
    """The tokenizer files' hashes are part of the plan: the same files skip, other files are 'other'."""
    tok = tmp_path / "tok"
    shutil.copytree(files["tok"], tok)
    out = tmp_path / "lawa"
    assert lawa(files["bare"], out, "--tokenizer", tok).exit_code == 0
    again = lawa(files["bare"], out, "--tokenizer", tok)
    assert again.exit_code == 0 and "is complete (same plan); skipped" in again.stderr

    (tok / "tokenizer.json").write_text((tok / "tokenizer.json").read_text().replace("<unk>", "<UNK>"))
    msg = error_line(lawa(files["bare"], out, "--tokenizer", tok))
    assert msg == (
        f"{out / 'step3000'}: made with another tokenizer (tokenizer.json differ); pass --overwrite to replace it"
    )
    msg = error_line(lawa(files["bare"], out))
    assert msg == f"{out / 'step3000'}: made with --tokenizer (none given now); pass --overwrite to replace it"

    r = lawa(files["bare"], out, "--tokenizer", tok, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "step3000" / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()


def test_library_takes_a_tokenizer_in_options(files: dict[str, Path], tmp_path: Path):
    plan = api.plan_lawa(str(files["bare"]), StepRange(3000, 3000), k=2, out=tmp_path / "lawa")
    api.average(plan, api.Options(tokenizer=local_tokenizer(files["tok"])))
    assert (tmp_path / "lawa" / "step3000" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- --tokenizer REPO (the Hub)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]):
    root = tmp_path_factory.mktemp("hub")
    write_pythia_step(root / TOK_REPO / "main", 1000, fmt="safetensors")  # weights too: only the tokenizer comes
    for s in STEPS:
        write_pythia_step(root / RUN_REPO / f"step{s}", s)
    with HubServer(root) as server:
        yield server


def test_tokenizer_repo_fetches_only_tokenizer_files(files: dict[str, Path], hub: HubServer, tmp_path: Path):
    from transformers import AutoTokenizer

    hub.requests.clear()
    cache = tmp_path / "cache"
    r = lawa(files["bare"], tmp_path / "lawa", "--tokenizer", TOK_REPO, "--endpoint", hub.url, "--cache-dir", cache)
    assert r.exit_code == 0, r.output
    out = tmp_path / "lawa" / "step3000"
    src = hub.root / TOK_REPO / "main"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (
        AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == AutoTokenizer.from_pretrained(src)("abc")["input_ids"]
    )
    fetched = [q for q in hub.requests if "/resolve/" in q]
    assert fetched and all("tokenizer" in q for q in fetched), fetched  # no weights, no config
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["tokenizer_origin"] == {"repo": TOK_REPO, "endpoint": hub.url, "commit": commit_of(TOK_REPO, "main")}
    assert not list(cache.rglob("*.safetensors"))


def test_tokenizer_repo_that_does_not_exist(files: dict[str, Path], hub: HubServer, tmp_path: Path):
    args = ["--tokenizer", "nobody/nothing", "--endpoint", hub.url, "--cache-dir", tmp_path / "cache"]
    msg = error_line(lawa(files["bare"], tmp_path / "lawa", *args))
    assert msg == (
        f"--tokenizer nobody/nothing: no such folder, and no such repository on {hub.url} (if private: pass --token)"
    )
    assert not (tmp_path / "lawa").exists()


def test_a_hub_run_with_tokenizer_dir_downloads_not_the_runs_tokenizer(
    files: dict[str, Path], hub: HubServer, tmp_path: Path
):
    hub.requests.clear()
    args = ["--repo", RUN_REPO, "--endpoint", hub.url, "--cache-dir", tmp_path / "cache", "--tokenizer", files["tok"]]
    r = invoke("lawa", "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "lawa", *args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "lawa" / "step3000"
    assert (out / "tokenizer_config.json").read_bytes() == (files["tok"] / "tokenizer_config.json").read_bytes()
    assert (out / "config.json").is_file()
    assert not [q for q in hub.requests if "/resolve/" in q and "tokenizer" in q]
    record = json.loads((out / "ckptavg.json").read_text())
    assert record["origin"] == {"repo": RUN_REPO, "endpoint": hub.url, "revision_pattern": "step{step}"}


# ---------------------------------------------------------------- eval --tokenizer


def test_eval_scores_a_tokenizerless_model_with_the_given_tokenizer(files: dict[str, Path], tmp_path: Path):
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    bare, full = files["bare"] / "step3000", tmp_path / "step3000"
    shutil.copytree(bare, full)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files["tok"] / name, full / name)
    args = ["--data", data, "--max-tokens", "256", "--seq-len", "32"]

    msg = error_line(invoke("eval", bare, *args))
    assert msg == f"{bare}: no tokenizer to read {data} with (no tokenizer.json, vocab.json, ...); pass --tokenizer DIR"

    given = invoke("eval", bare, *args, "--tokenizer", files["tok"])
    inside = invoke("eval", full, *args)
    assert given.exit_code == 0 and inside.exit_code == 0, (given.output, inside.output)
    assert given.stdout.split("\t")[:4] == inside.stdout.split("\t")[:4]  # method, step, loss, perplexity


def test_a_repo_id_with_a_trailing_line_break_is_no_repo_id(tmp_path, monkeypatch):
    """'org/name\\n' (a value read from a file) is refused before any request, not sent to the Hub."""
    import pytest

    from ckptavg.errors import InvalidArgumentError
    from ckptavg.sources.extras import resolve_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="not a Hub repository id"):
        resolve_tokenizer("org/name\n", endpoint="http://127.0.0.1:9")
