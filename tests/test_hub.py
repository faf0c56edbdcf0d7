"""Runs on a Hub: the real huggingface_hub client against a Hub-like server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from factories import write_pythia_step
from hub_server import HubServer, PeakSize, commit_of
from safetensors.torch import load_file

from ckptavg.cli import cli
from ckptavg.progress import human_bytes

REPO = "EleutherAI/pythia-tiny"
SHARDED = "EleutherAI/pythia-tiny-sharded"
BROKEN = "EleutherAI/pythia-tiny-broken"  # two of its revisions hold no weights
TRAINER = "someone/trainer-run"  # the HF Trainer's names and safetensors, one revision sharded
STEPS = [1000, 2000, 3000, 4000]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    for s in STEPS:  # Pythia's layout: .bin-only step branches, one of them sharded
        write_pythia_step(root / REPO / f"step{s}", s, shards=3 if s == 3000 else 1)
    write_pythia_step(root / REPO / "main", 4000, fmt="safetensors")
    for s in STEPS:  # every revision in three shards, as Pythia-12B's are
        write_pythia_step(root / SHARDED / f"step{s}", s, shards=3)
    for s in (100, 200, 300):
        write_pythia_step(root / TRAINER / f"checkpoint-{s}", s, fmt="safetensors", shards=3 if s == 200 else 1)
    for s in STEPS:
        write_pythia_step(root / BROKEN / f"step{s}", s)
        if s in (2000, 3000):
            (root / BROKEN / f"step{s}" / "pytorch_model.bin").unlink()
    (root / "Private" / "gated" / "step1000").mkdir(parents=True)
    (root / "Private" / "terms" / "step1000").mkdir(parents=True)
    local = tmp_path_factory.mktemp("local")
    for s in STEPS:  # the same checkpoints as a local run
        write_pythia_step(local / f"step{s}", s, shards=3 if s == 3000 else 1)
    with HubServer(root) as server:
        server.faults["gated"] = {"Private/gated"}
        server.faults["forbidden"] = {"Private/terms"}
        server.local_run = local  # type: ignore[attr-defined]
        server.local_sharded = root / SHARDED  # type: ignore[attr-defined]
        yield server


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries wait milliseconds, not seconds (here and in the subprocesses tests start)."""
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "0.01")


def hub_args(hub: HubServer, tmp_path: Path) -> list[str]:
    return ["--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache")]


def test_ls_lists_step_revisions_numerically(hub: HubServer, tmp_path: Path):
    r = CliRunner().invoke(cli, ["ls", "--repo", REPO, "--json", *hub_args(hub, tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["step"] for row in rows] == STEPS  # main is not a step
    size = sum(f.stat().st_size for f in (hub.root / REPO / "step1000").iterdir())  # weights, config, tokenizer
    assert rows[0] == {"step": 1000, "format": "bin", "bytes": size, "path": f"{REPO}@step1000", "name": "step1000"}
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.bin"))


def test_lawa_from_the_hub_equals_lawa_from_local_files(hub: HubServer, tmp_path: Path):
    cmd = ["lawa", "--steps", "4000:4000", "--k", "3", "--out"]
    remote = CliRunner().invoke(cli, [*cmd, str(tmp_path / "remote"), "--repo", REPO, *hub_args(hub, tmp_path)])
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(cli, [*cmd, str(tmp_path / "local"), str(hub.local_run)])  # type: ignore[attr-defined]
    assert local.exit_code == 0, local.output
    a = load_file(tmp_path / "remote" / "step4000" / "model.safetensors")
    b = load_file(tmp_path / "local" / "step4000" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    record = json.loads((tmp_path / "remote" / "step4000" / "ckptavg.json").read_text())
    assert record["source"] == REPO
    assert [m["files"] for m in record["members"]] == [
        [{"repo": REPO, "revision": f"step{s}", "commit": commit_of(REPO, f"step{s}")}] for s in (2000, 3000, 4000)
    ]
    assert (tmp_path / "remote" / "step4000" / "config.json").is_file()
    assert not any("step1000" in r for r in hub.requests if "/resolve/" in r)  # only members are fetched

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "remote" / "step4000")


def test_safetensors_revisions_named_by_a_template(hub: HubServer, tmp_path: Path):
    """Headers of safetensors files (whole and sharded) come by HTTP range too; the result is the local one."""
    args = ["--steps", "300:300", "--k", "3", "--interval", "100"]
    hub.requests.clear()
    remote = CliRunner().invoke(
        cli,
        ["lawa", "--repo", TRAINER, "--revision-template", "checkpoint-{step}", *args, "--out", str(tmp_path / "r")]
        + hub_args(hub, tmp_path),
    )
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(cli, ["lawa", str(hub.root / TRAINER), *args, "--out", str(tmp_path / "l")])
    assert local.exit_code == 0, local.output
    a = load_file(tmp_path / "r" / "step300" / "model.safetensors")
    b = load_file(tmp_path / "l" / "step300" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert len(downloads_of(hub, ".safetensors")) == 5  # 1 + 3 shards + 1, each once


def test_avg_of_explicit_steps_from_the_hub(hub: HubServer, tmp_path: Path):
    remote = CliRunner().invoke(
        cli,
        [
            "avg",
            "--repo",
            REPO,
            "2000",
            "4000",
            "--weights",
            "1,3",
            "--out",
            str(tmp_path / "r"),
            *hub_args(hub, tmp_path),
        ],
    )
    assert remote.exit_code == 0, remote.output
    run = hub.local_run  # type: ignore[attr-defined]
    local = CliRunner().invoke(
        cli, ["avg", str(run / "step2000"), str(run / "step4000"), "--weights", "1,3", "--out", str(tmp_path / "l")]
    )
    assert local.exit_code == 0, local.output
    a, b = load_file(tmp_path / "r" / "model.safetensors"), load_file(tmp_path / "l" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    bad = CliRunner().invoke(
        cli, ["avg", "--repo", REPO, "step2000", "--out", str(tmp_path / "x"), *hub_args(hub, tmp_path)]
    )
    assert bad.exit_code == 1 and "give step numbers (e.g. 143000), not 'step2000'" in bad.stderr


def test_plan_fails_before_any_download(hub: HubServer, tmp_path: Path):
    hub.requests.clear()
    r = CliRunner().invoke(
        cli,
        [
            "lawa",
            "--repo",
            REPO,
            "--steps",
            "5000:6000",
            "--k",
            "2",
            "--out",
            str(tmp_path / "o"),
            *hub_args(hub, tmp_path),
        ],
    )
    assert r.exit_code == 1
    assert r.stderr.strip() == f"Error: steps 5000, 6000 not found in {REPO} (nearest available: 4000)"
    assert not any("/resolve/" in req for req in hub.requests)
    dry = CliRunner().invoke(
        cli,
        [
            "lawa",
            "--repo",
            REPO,
            "--steps",
            "3000:4000",
            "--k",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--dry-run",
            "--json",
            *hub_args(hub, tmp_path),
        ],
    )
    assert dry.exit_code == 0, dry.output
    assert [json.loads(ln)["bytes_to_read"] > 0 for ln in dry.stdout.splitlines()] == [True, True]
    assert "ckptavg: downloads 5 weight files" in dry.stderr  # steps 2000 and 4000 whole, 3000 in 3 shards
    # Weights were not downloaded: only their headers were read, by closed ranges of at most 64 KiB.
    weights = [req for req in hub.requests if "/resolve/" in req and re.search(r"\.bin( \[|$)", req)]
    assert weights and all(re.search(r"\[bytes=(\d+)-(\d+)\]$", req) for req in weights), weights
    assert all(int(b) - int(a) < 1 << 16 for a, b in (re.findall(r"(\d+)-(\d+)\]$", req)[0] for req in weights))


def test_revisions_without_weights_are_listed_in_one_error_before_any_download(hub: HubServer, tmp_path: Path):
    hub.requests.clear()
    r = CliRunner().invoke(
        cli,
        [
            "lawa",
            "--repo",
            BROKEN,
            "--steps",
            "4000:4000",
            "--k",
            "4",
            "--out",
            str(tmp_path / "o"),
            *hub_args(hub, tmp_path),
        ],
    )
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert line.startswith(f"Error: {BROKEN}: 2 revisions cannot be used: ") and len(line.splitlines()) == 1, line
    assert f"{BROKEN}@step2000: no weights in a supported format (has config.json, tokenizer.json" in line
    assert f"{BROKEN}@step3000: no weights" in line
    assert not downloads(hub) and not (tmp_path / "o").exists()


def test_the_token_goes_to_the_server_and_nowhere_else(hub: HubServer, tmp_path: Path):
    secret = "hf_SECRETabc123"
    hub.requests.clear()
    hub.tokens.clear()
    r = CliRunner().invoke(
        cli,
        ["lawa", "--repo", SHARDED, "--steps", "2000:2000", "--k", "2", "--out", str(tmp_path / "o")]
        + ["--token", secret, *hub_args(hub, tmp_path)],
    )
    assert r.exit_code == 0, r.output
    assert downloads(hub) and hub.tokens and set(hub.tokens) == {f"Bearer {secret}"}  # listings, headers, files
    assert secret not in r.stdout + r.stderr
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_hub_errors_are_one_line_and_keep_the_token_secret(hub: HubServer, tmp_path: Path):
    base = ["ls", *hub_args(hub, tmp_path)]
    missing = CliRunner().invoke(cli, [*base, "--repo", "Nobody/nothing"])
    assert missing.exit_code == 1 and "Nobody/nothing" in missing.stderr and "not found" in missing.stderr
    gated = CliRunner().invoke(cli, [*base, "--repo", "Private/gated", "--token", "hf_SECRET123"])
    assert gated.exit_code == 1 and "token is needed" in gated.stderr
    assert "hf_SECRET123" not in gated.stderr + gated.stdout
    terms = CliRunner().invoke(cli, [*base, "--repo", "Private/terms", "--token", "hf_SECRET123"])
    assert terms.exit_code == 1 and "this token cannot read it" in terms.stderr and "hf_SECRET123" not in terms.stderr
    hub.faults["status"] = 503
    try:
        down = CliRunner().invoke(cli, [*base, "--repo", REPO, "--retry-time", "0"])
    finally:
        del hub.faults["status"]
    assert down.exit_code == 1 and "503" in down.stderr and len(down.stderr.strip().splitlines()) == 1
    template = CliRunner().invoke(cli, [*base, "--repo", REPO, "--revision-template", "checkpoint-{step}"])
    assert template.exit_code == 1 and "no revision matches 'checkpoint-{step}'" in template.stderr


def downloads(hub: HubServer) -> list[str]:
    """Weight files served whole (or resumed): what a run downloaded, as opposed to header reads."""
    return downloads_of(hub, ".bin")


def downloads_of(hub: HubServer, suffix: str) -> list[str]:
    pattern = re.escape(suffix) + r"( \[bytes=\d+-\])?$"
    return [r for r in hub.requests if r.startswith("GET") and re.search(pattern, r)]


def assert_same_as_local_sharded(hub: HubServer, out: Path, local: Path) -> None:
    """LAWA 2000:4000, k=2 of SHARDED from the Hub (in ``out``) equals the same from local files, bit for bit."""
    r = CliRunner().invoke(
        cli, ["lawa", str(hub.local_sharded), "--steps", "2000:4000", "--k", "2", "--out", str(local)]
    )  # type: ignore[attr-defined]
    assert r.exit_code == 0, r.output
    for s in (2000, 3000, 4000):
        a = load_file(out / f"step{s}" / "model.safetensors")
        b = load_file(local / f"step{s}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_shard_by_shard_within_a_budget_smaller_than_one_window(hub: HubServer, tmp_path: Path):
    """Like Pythia-12B (three .bin shards per revision): the disk holds k shards at a time, not k checkpoints."""

    cache = tmp_path / "cache"
    folders = [hub.root / SHARDED / f"step{s}" for s in STEPS]
    shard = max(f.stat().st_size for d in folders for f in d.glob("pytorch_model-*.bin"))
    extras = sum(
        f.stat().st_size for d in folders[1:] for f in d.iterdir() if f.suffix == ".json" and "model" not in f.name
    )
    budget = 2 * shard + extras  # k = 2 shards, plus configs and tokenizers held to the end
    window = 2 * max(sum(f.stat().st_size for f in d.iterdir()) for d in folders)
    assert budget < 0.6 * window

    cmd = ["lawa", "--repo", SHARDED, "--steps", "2000:4000", "--k", "2", *hub_args(hub, tmp_path)]
    hub.requests.clear()
    with PeakSize(cache) as sampled:
        r = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "o"), "--disk-budget", str(budget)])
    assert r.exit_code == 0, r.output
    assert 0 < sampled.peak <= budget, (sampled.peak, budget)
    parts = re.search(r"part 1 of (\d+)", r.stderr)
    assert parts and int(parts.group(1)) > 3, r.stderr  # shard by shard: more parts than windows
    got = downloads(hub)
    assert len(got) == len(set(got)) == 4 * 3, got  # each shard of each revision exactly once
    repo_cache = cache / f"models--{SHARDED.replace('/', '--')}"
    left = [*(repo_cache / "blobs").iterdir(), *(p for p in (repo_cache / "snapshots").rglob("*") if not p.is_dir())]
    assert not left  # everything the run brought in is gone again (refs and lock files stay)
    assert_same_as_local_sharded(hub, tmp_path / "o", tmp_path / "local")

    small = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "o2"), "--disk-budget", str(budget - 1)])
    assert small.exit_code == 1
    assert small.stderr.startswith(f"Error: --disk-budget {human_bytes(budget - 1)} is too small: the window for ")
    assert "pytorch_model-00001-of-00003.bin of each member" in small.stderr
    assert not (tmp_path / "o2").exists()


def with_fault(hub: HubServer, fault: str, spec: dict[str, int], args: list[str]) -> Result:
    hub.faults[fault] = spec
    try:
        return CliRunner().invoke(cli, args)
    finally:
        hub.faults.pop(fault)


def test_a_dropped_download_is_retried_and_a_dead_one_is_one_clear_error(hub: HubServer, tmp_path: Path):
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    ok = with_fault(hub, "drop", {"pytorch_model.bin": 1}, [*cmd, "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    local = CliRunner().invoke(
        cli,
        [
            "lawa",
            str(hub.local_run),
            "--steps",
            "2000:2000",
            "--k",
            "2",  # type: ignore[attr-defined]
            "--out",
            str(tmp_path / "local"),
        ],
    )
    a = load_file(tmp_path / "ok" / "step2000" / "model.safetensors")
    b = load_file(tmp_path / "local" / "step2000" / "model.safetensors")
    assert local.exit_code == 0 and all(torch.equal(a[n], b[n]) for n in a)

    hub.faults["drop"] = {"pytorch_model.bin": 1000}
    c2 = tmp_path / "c2"
    try:  # in a process of its own: huggingface_hub's retry warnings would go to the real stderr
        dead = subprocess.run(
            [sys.executable, "-m", "ckptavg", *cmd, "--out", str(tmp_path / "dead"), "--cache-dir", str(c2)]
            + ["--retry-time", "0.3"],
            capture_output=True,
            text=True,
        )
    finally:
        hub.faults.pop("drop")
    assert dead.returncode == 1
    assert len(dead.stderr.strip().splitlines()) == 1 and REPO in dead.stderr and "pytorch_model.bin" in dead.stderr
    assert not (tmp_path / "dead").exists() or not list((tmp_path / "dead").iterdir())


def test_a_download_cut_by_a_killed_run_is_continued_not_restarted(hub: HubServer, tmp_path: Path):
    """What a run killed mid-download leaves behind: the first bytes of the file under the cache's blobs, in
    a partial file named for its process (host, pid, random), which is gone."""
    import hashlib
    import socket

    data = (hub.root / REPO / "step1000" / "pytorch_model.bin").read_bytes()
    blobs = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    gone = dead_pid()
    partial = f"{hashlib.sha256(data).hexdigest()}.ckptavg-{socket.gethostname()}-{gone}-0123abcd.incomplete"
    (blobs / partial).write_bytes(data[:30000])
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    hub.requests.clear()
    r = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    of_1000 = [r for r in downloads(hub) if f"/{commit_of(REPO, 'step1000')}/" in r]
    assert len(of_1000) == 1 and of_1000[0].endswith("/pytorch_model.bin [bytes=30000-]"), of_1000
    a = load_file(tmp_path / "o" / "step2000" / "model.safetensors")
    local = CliRunner().invoke(
        cli,
        ["lawa", str(hub.local_run), "--steps", "2000:2000", "--k", "2", "--out", str(tmp_path / "l")],  # type: ignore[attr-defined]
    )
    assert local.exit_code == 0
    b = load_file(tmp_path / "l" / "step2000" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not list(blobs.iterdir())


def dead_pid() -> int:
    """The pid of a process that has ended."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _tensors_done(record: Path) -> int:
    """A progress record's count, or -1 when caught between its creation and its first write."""
    try:
        return int(json.loads(record.read_bytes())["tensors_done"])
    except ValueError:
        return -1


def test_a_killed_run_resumes_after_its_finished_units_without_downloading_them_again(hub: HubServer, tmp_path: Path):
    index = json.loads((hub.root / SHARDED / "step4000" / "pytorch_model.bin.index.json").read_text())
    first = [n for n, f in index["weight_map"].items() if f == "pytorch_model-00001-of-00003.bin"]
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ckptavg", "lawa", "--repo", SHARDED, "--steps", "2000:4000", "--k", "2"]
    cmd += ["--out", str(out), *hub_args(hub, tmp_path)]
    hub.faults["slow"] = {"pytorch_model-00002-of-00003.bin": 30}  # the run stalls on the second shards
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            done = [_tensors_done(p) for p in out.glob(".step*/progress.json")]
            if len(done) == 3 and min(done) >= len(first):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        hub.faults.pop("slow")
    assert len(done) == 3 and min(done) >= len(first), done
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # no output is whole yet

    hub.requests.clear()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming an interrupted run after" in again.stderr
    got = downloads(hub)
    assert got and not [r for r in got if "00001-of-00003" in r], got  # the first shards were done with
    assert_same_as_local_sharded(hub, out, tmp_path / "l")


def test_a_run_failed_by_a_hub_that_stays_down_keeps_its_progress_and_resumes_without_downloading_it_again(
    hub: HubServer, tmp_path: Path
):
    """The first shards are averaged, then every download of step 1000's second shard answers 503 past
    --retry-time: one line, exit 1, and the finished work stays, with the second shards that did arrive.
    The same command later downloads only what is missing."""
    second = "pytorch_model-00002-of-00003.bin"
    out = tmp_path / "o"
    cmd = ["lawa", "--repo", SHARDED, "--steps", "2000:4000", "--k", "2", "--out", str(out), *hub_args(hub, tmp_path)]
    hub.inject("download", 1000, file=f"{commit_of(SHARDED, 'step1000')}/{second}", status=503)
    try:
        failed = CliRunner().invoke(cli, [*cmd, "--retry-time", "0.2"])
    finally:
        hub.queued["download"].clear()
    assert failed.exit_code == 1
    assert "Traceback" not in failed.stderr
    [line] = [ln for ln in failed.stderr.splitlines() if not ln.startswith("ckptavg: part ")]  # one line, and logs
    assert re.fullmatch(
        rf"Error: {SHARDED}@step\d000/{second}: gave up downloading it after \d+ attempts in [\d.]+ s "
        r"\(last: HTTP 503\); run the same command again to resume",
        line,
    ), line
    done = [json.loads(p.read_bytes())["tensors_done"] for p in out.glob(".step*/progress.json")]
    assert len(done) == 3 and min(done) > 0  # every output holds the first shard's tensors
    status = CliRunner().invoke(cli, ["status", *cmd])
    assert [ln.split("\t")[1] for ln in status.stdout.splitlines()] == ["partial"] * 3
    snapshots = tmp_path / "cache" / f"models--{SHARDED.replace('/', '--')}" / "snapshots"
    # The other second shards download concurrently: those that arrived before the run gave up stay (how
    # many depends on timing: all three on a quiet machine), and only the rest is fetched again below.
    kept = {p.parent.name for p in snapshots.glob(f"*/{second}")}
    members = {commit_of(SHARDED, f"step{s}") for s in (1000, 2000, 3000, 4000)}
    assert kept < members and commit_of(SHARDED, "step1000") not in kept

    hub.requests.clear()
    again = CliRunner().invoke(cli, cmd)
    assert again.exit_code == 0, again.output
    assert "resuming an interrupted run after" in again.stderr
    got = downloads(hub)
    assert not [r for r in got if "00001-of-00003" in r], got  # the first shards were done with
    again_second = {r.split()[1].split("/")[4] for r in got if second in r}
    assert again_second == members - kept, got  # only the second shards that were missing
    assert_same_as_local_sharded(hub, out, tmp_path / "l")


def test_a_header_that_cannot_be_read_fails_the_plan_in_one_line(hub: HubServer, tmp_path: Path):
    hub.faults["unresolvable"] = {"pytorch_model-00002-of-00003.bin"}
    try:
        r = CliRunner().invoke(
            cli, ["plan", "--repo", REPO, "--steps", "3000:3000", "--k", "2", *hub_args(hub, tmp_path)]
        )
    finally:
        hub.faults.pop("unresolvable")
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"Error: {REPO} on {hub.url}: file not found while trying to read the header of "
        "pytorch_model-00002-of-00003.bin of step3000"
    )


def test_two_tasks_sharing_a_cache_and_members_do_not_delete_each_others_files(hub: HubServer, tmp_path: Path):
    """A SLURM array's tasks share the members at their boundaries (here step 2000) and the cache."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ckptavg", "lawa", "--repo", SHARDED, "--steps", "2000:4000", "--k", "2"]
    cmd += ["--out", str(out), "--num-tasks", "2", *hub_args(hub, tmp_path)]
    hub.faults["slow"] = {"pytorch_model-00003-of-00003.bin": 0.3}  # both tasks hold step 2000 for a while
    try:
        tasks = [
            subprocess.Popen([*cmd, "--task-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        results = [t.communicate(timeout=120) for t in tasks]
    finally:
        hub.faults.pop("slow")
    assert [t.returncode for t in tasks] == [0, 0], [err for _, err in results]
    assert_same_as_local_sharded(hub, out, tmp_path / "l")
    repo_cache = tmp_path / "cache" / f"models--{SHARDED.replace('/', '--')}"
    assert not list((repo_cache / "blobs").iterdir())  # whoever finished last deleted the shared files


def test_a_pickle_that_is_not_plain_weights_is_refused_while_planning(hub: HubServer, tmp_path: Path):
    from test_bad_input import Reduces

    repo = "Evil/run"
    for s in (1000, 2000):
        write_pythia_step(hub.root / repo / f"step{s}", s)
    f = hub.root / repo / "step2000" / "pytorch_model.bin"
    marker = tmp_path / "marker"
    torch.save({**torch.load(f, weights_only=True), "extra": Reduces(str(marker))}, f)
    hub.requests.clear()
    r = CliRunner().invoke(
        cli,
        [
            "lawa",
            "--repo",
            repo,
            "--steps",
            "2000:2000",
            "--k",
            "2",
            "--out",
            str(tmp_path / "o"),
            *hub_args(hub, tmp_path),
        ],
    )
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: {repo}@step2000/pytorch_model.bin: holds objects other than plain weights"), (
        r.stderr
    )
    assert not marker.exists() and not downloads(hub) and not (tmp_path / "o").exists()


def test_a_file_shorter_than_announced_is_an_error_and_is_not_used(hub: HubServer, tmp_path: Path):
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    r = with_fault(hub, "short", {"pytorch_model.bin": 10}, [*cmd, "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    size = (hub.root / REPO / "step2000" / "pytorch_model.bin").stat().st_size
    assert re.fullmatch(
        f"Error: {REPO}@step(1000|2000)/pytorch_model.bin: the server sends {size - 10} bytes of a file its HEAD "
        f"announced as {size} bytes; it may have changed on the server: run the same command again\n",
        r.stderr,
    ), r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    weights = {hub.etag(hub.root / REPO / f"step{s}" / "pytorch_model.bin") for s in (1000, 2000)}
    blobs = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.split(".")[0] in weights]


def test_offline_from_a_warm_cache(hub: HubServer, tmp_path: Path):

    from huggingface_hub import hf_hub_download

    for s in (1000, 2000):  # the user's own downloads, as `hf download` makes them
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin"):
            hf_hub_download(REPO, f, revision=f"step{s}", cache_dir=tmp_path / "cache", endpoint=hub.url)

    def cache_files() -> list[Path]:  # lock files (huggingface_hub's and ours) aside
        return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and ".locks" not in p.parts)

    cached = cache_files()
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    warm = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "online")])
    assert warm.exit_code == 0, warm.output
    assert cache_files() == cached  # not ours to delete
    hub.faults["status"] = 503  # the network is gone: offline mode must not ask
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        run = [sys.executable, "-m", "ckptavg", *cmd]
        offline = subprocess.run([*run, "--out", str(tmp_path / "offline")], env=env, capture_output=True, text=True)
        uncached = subprocess.run(
            [*run[:7], "3000:3000", *run[8:], "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True
        )
    finally:
        del hub.faults["status"]
    assert offline.returncode == 0, offline.stderr
    a = load_file(tmp_path / "online" / "step2000" / "model.safetensors")
    b = load_file(tmp_path / "offline" / "step2000" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert uncached.returncode == 1
    assert uncached.stderr.strip() == f"Error: step 3000 not found in {REPO} (nearest available: 2000)"
