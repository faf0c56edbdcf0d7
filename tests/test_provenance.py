"""What every output says about where it came from (ckptavg.json), and what make sees of it.

- the record: method, members, files; ``created``, ``cwd``, ``origin`` outside the plan id; ``--hash``;
- the safetensors metadata: the part that decides the bytes (the same in every run of the plan);
- a rerun: a complete output is skipped and touched (make sees it newer than its inputs), one made from
  other inputs is refused naming the member that changed;
- convert keeps the record and adds its own step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import error_line
from factories import write_nanogpt_ckpt
from safetensors import safe_open
from safetensors.torch import save_file

from ckptavg import api
from ckptavg.cli import cli
from ckptavg.steps import StepRange

STEPS = [1000, 2000, 3000, 4000]


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def lawa(run: Path, out: Path, *extra: object) -> Result:
    return invoke("lawa", run, "--steps", "3000:4000", "--k", "2", "--out", out, *extra)


def record_of(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "ckptavg.json").read_text())


@pytest.fixture
def run(make_st_run, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    make_st_run(STEPS)
    return tmp_path / "run"


# ---------------------------------------------------------------- the record


def test_record_says_when_where_and_from_what(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    before = time.time()
    r = lawa(Path("run"), Path("lawa"))  # relative paths: cwd resolves them
    assert r.exit_code == 0, r.output
    record = record_of(tmp_path / "lawa" / "step3000")
    created = time.mktime(time.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 1 <= created <= time.time() + 1
    assert record["cwd"] == str(tmp_path)
    assert record["origin"] == {"run": "run"}
    member = record["members"][0]
    assert member["step"] == 2000 and member["path"] == "run/step2000"
    [f] = member["files"]
    st = (tmp_path / "run" / "step2000" / "model.safetensors").stat()
    assert f == {"path": "run/step2000/model.safetensors", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert (Path(record["cwd"]) / f["path"]).is_file()


def test_weights_metadata_holds_the_plan_part_the_same_in_every_run(run: Path, tmp_path: Path):
    """created, cwd and origin are in ckptavg.json only: the weight files of one plan have the same bits
    whenever and wherever they are made, and a resumed file's header keeps its size."""
    plan = api.plan_lawa(str(run), StepRange(3000, 3000), k=2, out=tmp_path / "a")
    api.average(plan)
    record = record_of(tmp_path / "a" / "step3000")
    with safe_open(tmp_path / "a" / "step3000" / "model.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["ckptavg"])
    assert meta == api.plan_record(plan, 0, api.Options())
    assert meta["plan_id"] == record["plan_id"]
    assert {k: v for k, v in record.items() if k not in ("created", "cwd", "origin")} == meta

    other = api.plan_lawa(str(run), StepRange(3000, 3000), k=2, out=tmp_path / "b")
    api.average(other, api.Options(hash_inputs=True))
    a = (tmp_path / "a" / "step3000" / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "step3000" / "model.safetensors").read_bytes() == a


def test_hash_records_each_input_files_sha256(run: Path, tmp_path: Path):
    r = lawa(run, tmp_path / "lawa", "--hash")
    assert r.exit_code == 0, r.output
    for step, out in ((3000, "step3000"), (4000, "step4000")):
        for member in record_of(tmp_path / "lawa" / out)["members"]:
            [f] = member["files"]
            assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
        assert [m["step"] for m in record_of(tmp_path / "lawa" / out)["members"]] == [step - 1000, step]
    without = lawa(run, tmp_path / "plain")
    assert without.exit_code == 0
    assert "sha256" not in json.dumps(record_of(tmp_path / "plain" / "step3000"))
    # the hash is outside the plan id: a rerun with --hash skips what a run without it made
    again = lawa(run, tmp_path / "plain", "--hash")
    assert again.exit_code == 0 and again.stderr.count("is complete (same plan); skipped") == 2
    assert record_of(tmp_path / "lawa" / "step3000")["plan_id"] == record_of(tmp_path / "plain" / "step3000")["plan_id"]


# ---------------------------------------------------------------- reruns, as make does them


def test_a_skipped_complete_output_is_touched(run: Path, tmp_path: Path):
    out = tmp_path / "lawa"
    assert lawa(run, out).exit_code == 0
    old = time.time_ns() - 3600 * 10**9  # an hour ago: older than any input
    for p in (out / "step3000", out / "step3000" / "ckptavg.json"):
        os.utime(p, ns=(old, old))
    newest_input = max(p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file())
    again = lawa(run, out)
    assert again.exit_code == 0 and f"{out / 'step3000'} is complete (same plan); skipped" in again.stderr
    for p in (out / "step3000", out / "step3000" / "ckptavg.json"):
        assert p.stat().st_mtime_ns > newest_input  # make now sees the target up to date


def test_a_folder_we_did_not_make_is_never_touched(run: Path, tmp_path: Path):
    out = tmp_path / "lawa"
    assert lawa(run, out).exit_code == 0
    (out / "step3000" / "ckptavg.json").write_text('{"plan_id": "x"}')  # not ours: no tool, another plan
    old = time.time_ns() - 3600 * 10**9
    os.utime(out / "step3000", ns=(old, old))
    msg = error_line(lawa(run, out))
    assert msg == f"{out / 'step3000'}: already exists and was not made by this plan; pass --overwrite to replace it"
    assert (out / "step3000").stat().st_mtime_ns == old


def test_a_changed_input_is_named(run: Path, tmp_path: Path):
    out = tmp_path / "lawa"
    assert lawa(run, out).exit_code == 0
    weights = run / "step2000" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, another mtime
    msg = error_line(lawa(run, out))
    assert msg == (
        f"{out / 'step3000'}: made from other inputs (step 2000: model.safetensors changed mtime); "
        "pass --overwrite to replace it"
    )
    from safetensors.torch import load_file

    state = load_file(weights)
    save_file(state, weights, metadata={"format": "pt", "note": "rewritten"})  # a longer header: another size
    msg = error_line(lawa(run, out))
    assert msg == (
        f"{out / 'step3000'}: made from other inputs (step 2000: model.safetensors changed size/mtime); "
        "pass --overwrite to replace it"
    )
    r = lawa(run, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert lawa(run, out).exit_code == 0  # the same plan again: skipped


def test_avg_names_a_changed_member_by_its_path(run: Path, tmp_path: Path):
    args = ["avg", run / "step1000", run / "step2000", "--out", tmp_path / "soup"]
    assert invoke(*args).exit_code == 0
    weights = run / "step1000" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    msg = error_line(invoke(*args))
    assert msg == (
        f"{tmp_path / 'soup'}: made from other inputs ({run / 'step1000'}: model.safetensors changed mtime); "
        "pass --overwrite to replace it"
    )


def test_other_parameters_are_named(run: Path, tmp_path: Path):
    out = tmp_path / "lawa"
    assert lawa(run, out).exit_code == 0
    msg = error_line(invoke("lawa", run, "--steps", "3000:3000", "--k", "3", "--out", out))
    assert msg == f"{out / 'step3000'}: made with other parameters (k was 2, now 3); pass --overwrite to replace it"
    msg = error_line(lawa(run, out, "--dtype", "float32"))
    assert msg == (
        f"{out / 'step3000'}: made with other options (--dtype was null, now float32); pass --overwrite to replace it"
    )


INPUTS, NOW = "made from other inputs", "step 2000 and step 3000"
CHANGES = [
    (lambda r: r["members"][0].update(step=1000), f"{INPUTS} (members were step 1000 and step 3000, now {NOW})"),
    (lambda r: r["members"][0].update(weight=0.25), f"{INPUTS} (members' weights differ)"),
    (lambda r: r["members"][1]["files"][0].update(size=1), f"{INPUTS} (step 3000: model.safetensors changed size)"),
    (lambda r: r["members"][1].update(path="x/3000"), f"{INPUTS} (step 3000: read from /R/step3000, was x/3000)"),
    (lambda r: r.update(version="0.0.1"), "made by ckptavg 0.0.1 (this is {version})"),
    (lambda r: r.update(method="ema"), "made by another plan (method was ema, now lawa)"),
    (lambda r: r.update(accumulate="float64"), "made with other options (--accumulate was float64, now float32)"),
    (lambda r: r.update(tokenizer={"tokenizer.json": "ab"}), "made with --tokenizer (none given now)"),
]  # fmt: skip


@pytest.mark.parametrize("change, phrase", CHANGES)
def test_plan_changes_says_the_first_difference(change, phrase: str):  # type: ignore[no-untyped-def]
    from ckptavg import __version__

    def member(step: int) -> dict:  # type: ignore[type-arg]
        f = {"path": f"/R/step{step}/model.safetensors", "size": 10, "mtime_ns": 5}
        return {"step": step, "weight": 0.5, "path": f"/R/step{step}", "files": [f]}

    new = {"tool": "ckptavg", "version": __version__, "method": "lawa", "params": {"k": 2}, "source": "/R",
           "step": 3000, "members": [member(2000), member(3000)], "accumulate": "float32", "dtype": None}  # fmt: skip
    old = json.loads(json.dumps(new))
    change(old)
    assert api.plan_changes(old, new) == phrase.format(version=__version__)


def test_hub_member_commit_change(run: Path):
    def rec(commit: str) -> dict:  # type: ignore[type-arg]
        files = [{"repo": "o/r", "revision": "step1000", "commit": commit}]
        member = {"step": 1000, "weight": 1.0, "path": "o/r@step1000", "files": files}
        return {"method": "lawa", "source": "o/r", "step": 1000, "members": [member]}

    assert api.plan_changes(rec("a" * 40), rec("b" * 40)) == (
        f"made from other inputs (step 1000: o/r@step1000 is now commit {'b' * 12}, was {'a' * 12})"
    )


# ---------------------------------------------------------------- nanoGPT: --format ckpt, convert


@pytest.fixture
def nano(tmp_path: Path) -> Path:
    for s in (1000, 2000):
        write_nanogpt_ckpt(tmp_path / "nano" / f"ckpt_{s}.pt", s)
    return tmp_path / "nano"


def test_format_ckpt_with_max_shard_size_warns(nano: Path, tmp_path: Path):
    args = ["lawa", nano, "--steps", "2000:2000", "--k", "2", "--format", "ckpt", "--out", tmp_path / "o"]
    r = invoke(*args, "--max-shard-size", "1MB")
    assert r.exit_code == 0, r.output
    assert (
        "ckptavg: warning: --max-shard-size is ignored with --format ckpt: nanoGPT loads one ckpt.pt, so each "
        "output is one ckpt.pt and one model.safetensors"
    ) in r.stderr.splitlines()
    assert sorted(p.name for p in (tmp_path / "o" / "step2000").glob("*.safetensors")) == ["model.safetensors"]
    plain = invoke(*args[:-1], tmp_path / "p")
    assert plain.exit_code == 0 and "--max-shard-size" not in plain.stderr
    assert "--max-shard-size does not apply" in " ".join(invoke("lawa", "--help").stdout.split())


def test_convert_keeps_the_provenance_and_adds_its_step(nano: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("lawa", nano, "--steps", "2000:2000", "--k", "2", "--out", "lawa", "-q").exit_code == 0
    source = record_of(tmp_path / "lawa" / "step2000")
    r = invoke("convert", "lawa/step2000", "--out", "gpt2")
    assert r.exit_code == 0, r.output
    record = record_of(tmp_path / "gpt2")
    converted = record.pop("converted")
    assert record == source
    assert converted["from"] == "lawa/step2000" and converted["cwd"] == str(tmp_path)
    assert converted["tool"] == "ckptavg" and converted["format"] == "gpt2 (transformers)"
    assert converted["tokenizer"] is None
    time.strptime(converted["created"], "%Y-%m-%dT%H:%M:%SZ")

    file_r = invoke("convert", nano / "ckpt_1000.pt", "--out", "gpt2-file")  # no record to carry
    assert file_r.exit_code == 0, file_r.output
    assert set(record_of(tmp_path / "gpt2-file")) == {"tool", "version", "converted"}

    msg = error_line(invoke("convert", "gpt2", "--out", "again"))
    assert msg == "gpt2: already converted to GPT-2 by ckptavg convert; give the nanoGPT folder or ckpt.pt it came from"

    # a converted folder at an output's place is not that output: not skipped, not touched
    monkeypatch.chdir(tmp_path)
    msg = error_line(invoke("avg", nano / "ckpt_1000.pt", nano / "ckpt_2000.pt", "--out", "gpt2"))
    assert msg == "gpt2: already exists and was not made by this plan; pass --overwrite to replace it"
