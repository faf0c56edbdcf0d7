"""Runs on a Hub: the real huggingface_hub client against a Hub-like server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import write_pythia_step
from hub_server import HubServer, commit_of
from safetensors.torch import load_file

from ckptavg.cli import cli

REPO = "EleutherAI/pythia-tiny"
STEPS = [1000, 2000, 3000, 4000]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    for s in STEPS:  # Pythia's layout: .bin-only step branches, one of them sharded
        write_pythia_step(root / REPO / f"step{s}", s, shards=3 if s == 3000 else 1)
    write_pythia_step(root / REPO / "main", 4000, fmt="safetensors")
    (root / "Private" / "gated" / "step1000").mkdir(parents=True)
    local = tmp_path_factory.mktemp("local")
    for s in STEPS:  # the same checkpoints as a local run
        write_pythia_step(local / f"step{s}", s, shards=3 if s == 3000 else 1)
    with HubServer(root) as server:
        server.faults["gated"] = {"Private/gated"}
        server.local_run = local  # type: ignore[attr-defined]
        yield server


def hub_args(hub: HubServer, tmp_path: Path) -> list[str]:
    return ["--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache")]


def test_ls_lists_step_revisions_numerically(hub: HubServer, tmp_path: Path):
    r = CliRunner().invoke(cli, ["ls", "--repo", REPO, "--json", *hub_args(hub, tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["step"] for row in rows] == STEPS  # main is not a step
    size = sum(f.stat().st_size for f in (hub.root / REPO / "step1000").iterdir())  # weights, config, tokenizer
    assert rows[0] == {"step": 1000, "format": "bin", "bytes": size, "path": f"{REPO}@step1000"}
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
    assert not any(req.endswith(".bin") for req in hub.requests if "/resolve/" in req)


def test_hub_errors_are_one_line_and_keep_the_token_secret(hub: HubServer, tmp_path: Path):
    base = ["ls", *hub_args(hub, tmp_path)]
    missing = CliRunner().invoke(cli, [*base, "--repo", "Nobody/nothing"])
    assert missing.exit_code == 1 and "Nobody/nothing" in missing.stderr and "not found" in missing.stderr
    gated = CliRunner().invoke(cli, [*base, "--repo", "Private/gated", "--token", "hf_SECRET123"])
    assert gated.exit_code == 1 and "token is needed" in gated.stderr
    assert "hf_SECRET123" not in gated.stderr + gated.stdout
    hub.faults["status"] = 503
    try:
        down = CliRunner().invoke(cli, [*base, "--repo", REPO])
    finally:
        del hub.faults["status"]
    assert down.exit_code == 1 and "503" in down.stderr and len(down.stderr.strip().splitlines()) == 1
    template = CliRunner().invoke(cli, [*base, "--repo", REPO, "--revision-template", "checkpoint-{step}"])
    assert template.exit_code == 1 and "no revision matches 'checkpoint-{step}'" in template.stderr


def test_disk_budget_holds_while_the_run_downloads_and_deletes(hub: HubServer, tmp_path: Path):
    import threading
    import time

    cache = tmp_path / "cache"

    def cache_bytes() -> int:
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and not p.is_symlink())

    window = 2 * max(sum(f.stat().st_size for f in (hub.root / REPO / f"step{s}").iterdir()) for s in STEPS)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if cache.exists():
                peak[0] = max(peak[0], cache_bytes())
            time.sleep(0.002)

    def budget_run(out: Path, budget: str) -> list[str]:
        return [
            "lawa",
            "--repo",
            REPO,
            "--steps",
            "2000:4000",
            "--k",
            "2",
            "--out",
            str(out),
            "--disk-budget",
            budget,
            *hub_args(hub, tmp_path),
        ]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = CliRunner().invoke(cli, budget_run(tmp_path / "o", str(window)))
    finally:
        stop.set()
        watcher.join()
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [str(tmp_path / "o" / f"step{s}") for s in (2000, 3000, 4000)]
    assert 0 < peak[0] <= window, (peak[0], window)
    assert "segment 1 of" in r.stderr

    small = CliRunner().invoke(cli, budget_run(tmp_path / "o2", "1000"))
    assert small.exit_code == 1 and "--disk-budget 0.00 GB is too small" in small.stderr and "needs" in small.stderr


def test_a_dropped_download_is_retried_and_a_dead_one_is_one_clear_error(hub: HubServer, tmp_path: Path):
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    hub.faults["drop"] = {"pytorch_model.bin": 1}
    try:
        ok = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "ok")])
    finally:
        hub.faults.pop("drop")
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
    try:
        dead = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "dead"), "--cache-dir", str(tmp_path / "c2")])
    finally:
        hub.faults.pop("drop")
    assert dead.exit_code == 1
    assert len(dead.stderr.strip().splitlines()) == 1 and REPO in dead.stderr and "pytorch_model.bin" in dead.stderr
    assert not (tmp_path / "dead").exists() or not list((tmp_path / "dead").iterdir())


def test_offline_from_a_warm_cache(hub: HubServer, tmp_path: Path):
    import os
    import subprocess
    import sys

    from huggingface_hub import hf_hub_download

    for s in (1000, 2000):  # the user's own downloads, as `hf download` makes them
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin"):
            hf_hub_download(REPO, f, revision=f"step{s}", cache_dir=tmp_path / "cache", endpoint=hub.url)
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    cmd = ["lawa", "--repo", REPO, "--steps", "2000:2000", "--k", "2", *hub_args(hub, tmp_path)]
    warm = CliRunner().invoke(cli, [*cmd, "--out", str(tmp_path / "online")])
    assert warm.exit_code == 0, warm.output
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached  # not ours to delete
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
