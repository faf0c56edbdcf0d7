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
from conftest import error_line
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


def test_a_credentialed_endpoint_follows_its_own_tree_pages(hub: HubServer, tmp_path: Path):
    """The Hub links the next page of a tree listing without the endpoint's user:password@ part: it is the
    same host, so it is followed (it was refused as 'another host' when hosts were compared with it)."""
    hub.faults["page"] = 1
    try:
        r = invoke("lawa", "--repo", RUN_REPO, "--steps", "3000:3000", "--k", "2", "--out", tmp_path / "o",
                   "--cache-dir", tmp_path / "cache", "--endpoint", with_credentials(hub.url))  # fmt: skip
    finally:
        hub.faults.pop("page")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "step3000" / "model.safetensors").is_file()


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


# ---------------------------------------------------------------- eval --tasks: a task YAML is code


def test_a_task_yaml_runs_the_python_it_names_and_the_readme_says_so(tmp_path: Path):
    """lm-eval imports the module a task YAML names with '!function' (from beside the YAML), so --tasks
    FILE.yaml and --include-path DIR run code from there: a trust boundary as real as a pickle's, which
    the README's Safety section did not state."""
    pytest.importorskip("lm_eval")
    from ckptavg.downstream import load_tasks

    examples = Path(__file__).resolve().parent.parent / "examples" / "tasks"
    task = tmp_path / "tasks"
    task.mkdir()
    (task / "items.jsonl").write_bytes((examples / "genesis_heldout.jsonl").read_bytes())
    (task / "loader.py").write_text(
        (examples / "local_json.py").read_text() + "\n(HERE / 'ran').write_text('imported')\n"
    )
    yaml = (examples / "genesis_heldout.yaml").read_text()
    yaml = yaml.replace("genesis_heldout.jsonl", "items.jsonl").replace("local_json.load", "loader.load")
    (task / "t.yaml").write_text(yaml.replace("task: genesis_heldout", "task: code_runs"))
    load_tasks([str(task / "t.yaml")], limit=2)
    assert (task / "ran").read_text() == "imported"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    safety = readme.split("\n## Safety\n", 1)[1].split("\n## ", 1)[0]
    assert "!function" in safety and "--include-path" in safety


# ---------------------------------------------------------------- --revision-pattern: a step too long to be one


def test_a_revision_with_an_absurd_step_is_no_step_of_the_run(hub: HubServer, tmp_path: Path):
    """A server listing a branch 'step999...9' with 5000 digits made every command on the repo end in
    a traceback (int() refuses more than 4300 digits). No training step has that many: the run is its
    other revisions."""
    hub.faults["branches"] = {"step" + "9" * 5000: "c" * 40}
    try:
        r = invoke("ls", "--repo", RUN_REPO, "--endpoint", hub.url, "--cache-dir", tmp_path / "cache", "--json")
    finally:
        del hub.faults["branches"]
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["step"] for line in r.stdout.splitlines()] == STEPS


# ---------------------------------------------------------------- an output's ckptavg.json is read from disk


@pytest.mark.parametrize(
    "damage",
    [
        {"members": [1, 2]},
        {"params": [1]},
        {"members": [{"step": 3000, "files": "model.safetensors"}]},
        {"members": [{"step": 3000, "files": [7]}]},
        {"tokenizer": ["tokenizer.json"]},
    ],
)
def test_an_output_whose_record_was_edited_is_refused_in_one_line(bare: Path, tmp_path: Path, damage: dict):
    """An existing output whose ckptavg.json another tool, an older schema or a hand edit left in another
    shape: saying what differs from this plan crashed (AttributeError/TypeError traceback) instead of
    refusing the folder in one line."""
    out = tmp_path / "lawa"
    assert invoke("lawa", bare, "--steps", "3000:3000", "--k", "2", "--out", out).exit_code == 0
    record_file = out / "step3000" / "ckptavg.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, **damage, "plan_id": "0" * 16}))
    r = invoke("lawa", bare, "--steps", "3000:3000", "--k", "2", "--out", out)
    assert error_line(r) == (
        f"{out / 'step3000'}: already exists and was not made by this plan; pass --overwrite to replace it"
    )
