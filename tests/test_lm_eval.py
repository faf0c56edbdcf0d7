"""eval --tasks: zero-shot downstream scores by lm-evaluation-harness, in the results file beside the losses.

The tasks are the two that ship in examples/tasks (KJV Genesis, read offline from JSONL beside the YAML);
the models are real tiny GPT-NeoX folders from the factories. Tests that run the harness skip, saying
why, where the extra is not installed (pip install 'ckptavg[lm-eval]').
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import error_line
from factories import write_pythia_run

from ckptavg.cli import cli
from ckptavg.errors import ResultsFileError
from ckptavg.results import check_row

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"
LIMIT = 8
needs_lm_eval = pytest.mark.skipif(
    find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed: pip install 'ckptavg[lm-eval]'"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval") / "run"
    write_pythia_run(root, [1000, 2000], legacy_buffers=False)
    return root


def tasks_args(run: Path, results: Path, *more: str, include: Path = TASKS) -> list[str]:
    return [
        "eval",
        "--run",
        str(run),
        "--steps",
        "1000:2000:1000",
        "--tasks",
        "genesis_next_word,genesis_heldout",
        "--include-path",
        str(include),
        "--limit",
        str(LIMIT),
        "--results",
        str(results),
        *more,
    ]


def rows_of(results: Path) -> dict[tuple[str, str], dict]:
    saved = json.loads(results.read_text())
    return {(Path(r["model"]).name, r.get("task", "loss")): r for r in saved["rows"]}


def reference_acc(folder: Path, n: int) -> float:
    """Accuracy on the first n items, computed with transformers alone: the choice whose tokens, after the
    context and a space, have the highest summed log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    items = [json.loads(line) for line in (TASKS / "genesis_next_word.jsonl").read_text().splitlines()[:n]]
    right = 0
    for item in items:
        ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += scores.index(max(scores)) == item["gold"]
    return right / n


@needs_lm_eval
def test_tasks_score_every_model_and_a_rerun_skips_them(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = tmp_path / "r.json"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    first = CliRunner().invoke(cli, tasks_args(run, results))
    assert first.exit_code == 0, (first.stderr, first.exception)
    rows = rows_of(results)
    assert set(rows) == {(s, t) for s in ("step1000", "step2000") for t in ("genesis_next_word", "genesis_heldout")}
    for (step, task), r in rows.items():
        assert (r["method"], r["step"], r["n"]) == ("original", int(step.removeprefix("step")), LIMIT)
        if task == "genesis_next_word":
            assert set(r["metrics"]) == {"acc", "acc_norm"}
            assert all(0 <= v <= 1 for v in r["metrics"].values())
        else:
            assert set(r["metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
            assert all(v > 0 for v in r["metrics"].values())
    # the harness's accuracy is the one transformers gives: the wiring scores what it says it scores
    assert rows[("step2000", "genesis_next_word")]["metrics"]["acc"] == reference_acc(run / "step2000", LIMIT)
    saved = json.loads(results.read_text())
    assert saved["slice"] is None  # no --data: no held-out loss, no slice
    assert not results.with_suffix(".csv").exists()
    assert len(results.with_suffix(".tasks.csv").read_text().splitlines()) == 1 + 2 * (2 + 3)
    header, *lines = first.stdout.splitlines()
    assert header.split("\t") == [
        "method",
        "step",
        "genesis_heldout/word_perplexity",
        "genesis_heldout/byte_perplexity",
        "genesis_heldout/bits_per_byte",
        "genesis_next_word/acc",
        "genesis_next_word/acc_norm",
        "model",
    ]
    assert [ln.split("\t")[:2] for ln in lines] == [["original", "1000"], ["original", "2000"]]
    assert "Running loglikelihood" not in first.stderr  # lm-eval's progress bars stay off stderr
    assert list((tmp_path / "cwd").iterdir()) == []  # no cache or log left where it ran

    before = results.read_bytes()
    again = CliRunner().invoke(cli, tasks_args(run, results))
    assert again.exit_code == 0, again.stderr
    assert again.stderr.count("2 task(s) already in") == 2 and "ckptavg: scored" not in again.stderr
    assert results.read_bytes() == before and again.stdout == first.stdout


@needs_lm_eval
def test_a_changed_task_is_scored_again(run: Path, tmp_path: Path):
    results = tmp_path / "r.json"
    assert CliRunner().invoke(cli, tasks_args(run, results)).exit_code == 0
    old = rows_of(results)
    changed = tmp_path / "tasks"
    shutil.copytree(TASKS, changed)
    items = (changed / "genesis_next_word.jsonl").read_text().splitlines()
    (changed / "genesis_next_word.jsonl").write_text("\n".join(items[1:]) + "\n")  # the first item dropped
    r = CliRunner().invoke(cli, tasks_args(run, results, include=changed))
    assert r.exit_code == 0, r.stderr
    scored = [ln for ln in r.stderr.splitlines() if ln.startswith("ckptavg: scored ")]
    assert [ln.rsplit(" on ", 1)[1] for ln in scored] == ["genesis_next_word", "genesis_next_word"]
    new = rows_of(results)
    assert len(new) == 4  # replaced, not added beside
    for step in ("step1000", "step2000"):
        assert new[(step, "genesis_next_word")]["task_hash"] != old[(step, "genesis_next_word")]["task_hash"]
        assert new[(step, "genesis_heldout")] == old[(step, "genesis_heldout")]


@needs_lm_eval
def test_losses_and_tasks_share_one_file_and_plot_in_panels(run: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "heldout.txt"
    data.write_text((TASKS.parent / "heldout.txt").read_text())
    results = tmp_path / "r.json"
    loss = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--data", str(data), "--results", str(results)])
    assert loss.exit_code == 0, loss.stderr
    # a tasks-only run keeps the file's slice and its loss row, and the loss CSV beside it
    r = CliRunner().invoke(cli, tasks_args(run, results))
    assert r.exit_code == 0, r.stderr
    saved = json.loads(results.read_text())
    assert saved["slice"]["data"] == str(data)
    assert set(rows_of(results)) >= {("step1000", "loss"), ("step2000", "genesis_heldout")}
    assert len(results.with_suffix(".csv").read_text().splitlines()) == 2
    out = tmp_path / "curves.png"
    p = CliRunner().invoke(cli, ["plot", str(results), "-o", str(out)])
    assert p.exit_code == 0, p.stderr
    assert p.stdout.splitlines() == [str(out), "original\t1000"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from ckptavg.plot import load_rows, task_curves
    from ckptavg.results import task_rows

    panels = task_curves(task_rows(load_rows(results)))
    assert list(panels) == [("genesis_heldout", "bits_per_byte"), ("genesis_next_word", "acc")]
    assert [s for s, _ in panels[("genesis_next_word", "acc")]["original"]] == [1000, 2000]


@needs_lm_eval
@pytest.mark.parametrize(
    ("tasks", "says"),
    [
        ("nope.yaml", "--tasks nope.yaml: no such task YAML file"),
        (",", "'--tasks': names no task"),
    ],
)
def test_a_bad_task_is_one_line_naming_it(run: Path, tmp_path: Path, tasks: str, says: str):
    results = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--tasks", tasks, "--results", str(results)])
    assert says in error_line(r, 2)
    assert not results.exists()


@needs_lm_eval
def test_a_task_named_with_a_tab_is_refused_before_any_model(run: Path, tmp_path: Path):
    """A task's name is a column of the printed table and of the results file: a tab or line break in it
    (a YAML may say anything) would break both."""
    for f in ("genesis_next_word.jsonl", "local_json.py"):
        shutil.copy(TASKS / f, tmp_path / f)
    yaml = (TASKS / "genesis_next_word.yaml").read_text().replace("task: genesis_next_word", 'task: "next\\tword"')
    (tmp_path / "tabbed.yaml").write_text(yaml)
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--tasks", str(tmp_path / "tabbed.yaml")])
    assert error_line(r) == (
        f"--tasks {tmp_path / 'tabbed.yaml'}: names a task 'next\\tword' with a tab, line break or other "
        "control character"
    )


@needs_lm_eval
@pytest.mark.slow  # indexes all of lm-eval's own tasks to know the name is none of them (tens of seconds)
def test_an_unknown_task_name_is_one_line_naming_it(run: Path, tmp_path: Path):
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--tasks", "genesis_next_word,no_such_task",
                                 "--include-path", str(TASKS)])  # fmt: skip
    assert error_line(r, 2).startswith("--tasks no_such_task: not a task, group or tag of lm-eval or in ")


def test_options_of_tasks_need_tasks(run: Path, tmp_path: Path):
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000"), "--limit", "3"])
    assert "--limit needs --tasks" in error_line(r, 2)
    r = CliRunner().invoke(cli, ["eval", str(run / "step1000")])
    assert "Missing option '--data'" in error_line(r, 2)  # --data stays required without --tasks


def test_without_the_extra_tasks_say_which_extra(run: Path):
    """What an environment without lm_eval looks like: the import fails (a None in sys.modules)."""
    code = (
        "import sys; sys.modules['lm_eval'] = None; from ckptavg.cli import main; "
        f"sys.argv = ['ckptavg', 'eval', {str(run / 'step1000')!r}, '--tasks', 'genesis_next_word']; main()"
    )
    import subprocess

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == ("Error: eval --tasks needs lm-evaluation-harness: pip install 'ckptavg[lm-eval]'"), (
        p.stderr
    )


TASK_ROW = {
    "model": "/m/step1000",
    "method": "lawa",
    "step": 1000,
    "task": "piqa",
    "task_hash": "ab12",
    "n": 5,
    "metrics": {"acc": 0.6, "acc_norm": 0.5},
}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"n": 0}, "'n' is 0, not a positive count"),
        ({"metrics": {}}, "'metrics' is {}, not an object of metric values"),
        ({"metrics": {"acc": "high"}}, "metric 'acc' is \"high\", not a finite number or null"),
        ({"task": ""}, "'task' is \"\", not a non-empty string"),
        ({"task_hash": None}, "'task_hash' is null, not a non-empty string"),
        ({"task": "piqa\tlawa"}, "'task' is \"piqa\\tlawa\", which holds a tab, line break or other control character"),
        ({"method": "lawa\n"}, "'method' is \"lawa\\n\", which holds a tab, line break or other control character"),
    ],
)
def test_a_task_row_is_checked_like_a_loss_row(change: dict, says: str):
    assert check_row(Path("r.json"), 0, {**TASK_ROW, "metrics": {"word_perplexity": None}}) is not None
    with pytest.raises(ResultsFileError) as e:
        check_row(Path("r.json"), 3, {**TASK_ROW, **change})
    assert str(e.value) == f"r.json: row 3: {says}; not a row that ckptavg eval writes"
