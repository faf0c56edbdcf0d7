"""A run killed outright resumes after its last finished tensor; reruns skip finished outputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SHAPES = {f"t{i}": (300_000,) for i in range(8)}


def start(run: Path, out: Path) -> subprocess.Popen[str]:
    args = ["lawa", str(run), "--steps", "5000:6000", "--k", "5", "--out", str(out), "--chunk", "2048"]
    return subprocess.Popen(
        [sys.executable, "-m", "ckptavg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_run_resumes_where_it_stopped(make_st_run, tmp_path: Path):
    make_st_run(list(range(1000, 6001, 1000)), torch.float32, shapes=SHAPES)
    run, out = tmp_path / "run", tmp_path / "out"
    proc = start(run, out)
    progress = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob(".step6000.ckptavg-tmp-*/progress.json"))
        if found:
            try:
                record = json.loads(found[0].read_bytes())
            except ValueError:  # caught between the writer's truncate and its write: look again
                continue
            if record["tensors_done"] >= 2:
                progress = record
                break
        time.sleep(0.005)
    assert progress is not None, "the run finished before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "step6000").exists()  # nothing with the output's name until it is whole
    assert len(list(out.glob(".step6000.ckptavg-tmp-*"))) == 1

    again = start(run, out)
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert "resuming an interrupted run after" in stderr
    assert stdout.splitlines() == [str(out / "step5000"), str(out / "step6000")]
    assert not list(out.glob(".*"))  # temporary folders gone

    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptavg",
            "lawa",
            str(run),
            "--steps",
            "5000:6000",
            "--k",
            "5",
            "--out",
            str(tmp_path / "ref"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ref.returncode == 0
    for step in ("step5000", "step6000"):
        a = load_file(out / step / "model.safetensors")
        b = load_file(tmp_path / "ref" / step / "model.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in b)
        assert not (out / step / "progress.json").exists()


def test_two_processes_never_write_one_output(make_st_run, tmp_path: Path):
    """A second run of the same plan finds the output's temporary folder locked and stops, touching nothing."""
    import fcntl
    import os

    from ckptavg import api
    from ckptavg.errors import OutputError
    from ckptavg.steps import StepRange

    make_st_run([1000, 2000, 3000], torch.float16)
    plan = api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 3000), k=3, out=tmp_path / "out")
    plan_id = api.provenance(plan, 0, api.Options())["plan_id"]
    busy = tmp_path / "out" / f".step3000.ckptavg-tmp-{plan_id}"
    busy.mkdir(parents=True)
    (busy / "marker").write_text("the other process's work\n")
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputError, match="another ckptavg process is writing this output"):
            api.average(plan)
        assert (busy / "marker").read_text() == "the other process's work\n"
        assert not (tmp_path / "out" / "step3000").exists()
    finally:
        os.close(fd)
    api.average(plan)  # once the other process is gone, its folder is taken over
    assert (tmp_path / "out" / "step3000" / "model.safetensors").is_file()
    assert not busy.exists()


def test_a_partial_folder_is_resumed_only_with_the_same_layout(tmp_path: Path):
    from ckptavg.sources import TensorInfo
    from ckptavg.writers import FolderWriter

    layout = [(f"t{i}", TensorInfo((1000,), torch.float16)) for i in range(4)]

    def writer(max_shard: int) -> FolderWriter:
        return FolderWriter(
            tmp_path / "step1",
            layout,
            aliases={},
            provenance={"plan_id": "p1"},
            extra_files={},
            max_shard_size=max_shard,
            overwrite=False,
        )

    first = writer(10**9)
    assert first.open() == 0
    first.write("t0", 0, torch.ones(1000, dtype=torch.float16))
    first.tensor_done(1)
    first.abort(keep=True)  # what SIGKILL leaves: the folder, its progress record

    same = writer(10**9)
    assert same.open() == 1  # resumes after t0
    same.abort(keep=True)
    resharded = writer(2500)  # two tensors per shard now: the old bytes sit at other offsets
    assert resharded.open() == 0
    resharded.abort()
    assert not list(tmp_path.glob(".step1*"))


def test_an_output_has_the_same_bits_whichever_other_outputs_the_rerun_still_had_to_make(make_st_run, tmp_path: Path):
    """What a run killed between its two commits leaves: step3000 published, step4000 not yet."""
    from ckptavg import api
    from ckptavg.steps import StepRange

    make_st_run([1000, 2000, 3000, 4000], torch.float32, shapes={"a": (5000,), "b": (4100,)})

    def plan(out: Path) -> api.Plan:
        return api.plan_lawa(str(tmp_path / "run"), StepRange(3000, 4000), k=3, out=out)

    opts = api.Options(chunk=2048)
    api.average(plan(tmp_path / "ref"), opts)
    api.average(plan(tmp_path / "out"), opts)
    shutil.rmtree(tmp_path / "out" / "step4000")
    api.average(plan(tmp_path / "out"), opts)
    got, want = tmp_path / "out" / "step4000", tmp_path / "ref" / "step4000"
    assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()

    def record(folder: Path) -> dict[str, object]:  # all but when the run began, which differs between runs
        fields = json.loads((folder / "ckptavg.json").read_text())
        del fields["created"]
        return fields

    assert record(got) == record(want)
