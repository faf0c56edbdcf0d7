"""A real single-node SLURM (slurmctld + slurmd, configured under a temporary folder) runs ckptavg arrays.

CI installs Debian's slurmctld, slurmd and slurm-client; where they are missing or will not start, these
tests skip and say why. Daemons are started by the fixture and stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli

pytestmark = pytest.mark.slurm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(missing)}); CI installs it")
    if os.geteuid() != 0:
        pytest.skip("a test SLURM needs root to start slurmd")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=ckptavgtest",
                f"SlurmctldHost={host}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/none",
                "CredType=cred/none",
                "SlurmUser=root",
                "SlurmdUser=root",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "SchedulerParameters=sched_interval=1,batch_sched_delay=0",
                "ReturnToService=2",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd.log'}",
                f"NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen([d, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for d in ("slurmctld", "slurmd")
    ]

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
        return out.stdout.strip() == "idle"

    try:
        try:
            _wait(idle, 40, "node never became idle")
        except (TimeoutError, subprocess.TimeoutExpired) as e:
            log = (root / "slurmctld.log").read_text()[-600:] if (root / "slurmctld.log").exists() else ""
            pytest.skip(f"the test SLURM did not start ({e}): {log}")
        yield env
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def submit(env: dict[str, str], script: Path, *extra: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", *extra, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]

    def finished() -> bool:
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True, timeout=15)
        return q.returncode == 0 and not q.stdout.strip()

    _wait(finished, 120, f"job {job} did not finish")
    return job


COMMAND = ["lawa", "run", "--steps", "5000:10000", "--k", "5", "--out", "out"]


@pytest.fixture
def job_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(EXAMPLE, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    script = CliRunner().invoke(cli, ["slurm", "--num-tasks", "3", *COMMAND])
    assert script.exit_code == 0, script.output
    (tmp_path / "job.sbatch").write_text(script.stdout)
    return tmp_path


def status(*flags: str) -> list[str]:
    result = CliRunner().invoke(cli, ["status", *flags, *COMMAND, "--num-tasks", "3"])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_array_makes_every_output_then_a_rerun_does_no_work(slurm_env, job_dir: Path):
    submit(slurm_env, job_dir / "job.sbatch")
    rows = status()
    assert len(rows) == 6 and all("\tcomplete\t" in r for r in rows), rows
    assert status("--array") == [""]
    stamps = {p: p.stat().st_mtime_ns for p in (job_dir / "out").glob("step*/model.safetensors")}
    logs = sorted(job_dir.glob("slurm-*_*.out"))
    assert len(logs) == 3

    submit(slurm_env, job_dir / "job.sbatch")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    reruns = sorted(set(job_dir.glob("slurm-*_*.out")) - set(logs))
    assert len(reruns) == 3
    assert all("complete (same plan); skipped" in p.read_text() for p in reruns)


def test_failed_tasks_are_named_and_resubmitted(slurm_env, job_dir: Path):
    out = job_dir / "out"
    out.mkdir()
    for blocker in ("step5000", "step9000"):  # owned by tasks 0 and 2: something else has the name
        (out / blocker).write_text("not a checkpoint\n")
    submit(slurm_env, job_dir / "job.sbatch")
    assert status("--array") == ["0,2"]
    rows = status()
    assert [r.split("\t")[1] for r in rows] == ["other", "missing", "complete", "complete", "other", "missing"]

    for blocker in ("step5000", "step9000"):
        (out / blocker).unlink()
    submit(slurm_env, job_dir / "job.sbatch", "--array=0,2")
    assert status("--array") == [""]
    assert all((out / f"step{s}" / "model.safetensors").is_file() for s in range(5000, 10001, 1000))


def test_submit_prints_the_job_id(slurm_env, job_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    result = CliRunner().invoke(cli, ["slurm", "--num-tasks", "2", "--submit", *COMMAND])
    assert result.exit_code == 0, result.output
    job = result.stdout.strip()
    assert job.isdigit()

    def finished() -> bool:
        q = subprocess.run(["squeue", "-h", "-j", job], env=slurm_env, capture_output=True, text=True, timeout=15)
        return q.returncode == 0 and not q.stdout.strip()

    _wait(finished, 120, f"job {job} did not finish")
    rows = CliRunner().invoke(cli, ["status", *COMMAND, "--num-tasks", "2"]).stdout.splitlines()
    assert len(rows) == 6 and all("\tcomplete\t" in r for r in rows)


def test_a_submitted_job_record_holds_no_token(slurm_env, job_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """What SLURM keeps of a job (its script, as `scontrol write batch_script` gives it back) has no --token."""
    secret = "hf_SECRETsecret123"
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    result = CliRunner().invoke(cli, ["slurm", "--num-tasks", "2", "--submit", *COMMAND, "--token", secret])
    assert result.exit_code == 0, result.output
    job = result.stdout.strip()
    record = subprocess.run(
        ["scontrol", "write", "batch_script", job, "-"], env=slurm_env, capture_output=True, timeout=15
    )
    assert record.returncode == 0, record.stderr
    assert b"ckptavg lawa --threads 2 --task-index" in record.stdout and secret.encode() not in record.stdout
    assert secret not in result.output

    def finished() -> bool:
        q = subprocess.run(["squeue", "-h", "-j", job], env=slurm_env, capture_output=True, text=True, timeout=15)
        return q.returncode == 0 and not q.stdout.strip()

    _wait(finished, 120, f"job {job} did not finish")  # the next test's cluster starts idle


def test_jobs_run_in_folders_whose_names_need_quoting(slurm_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real sbatch reads the scripts; each job works in its folder; nothing in a name runs.

    A folder with a space is given to sbatch double-quoted (#SBATCH --chdir="..."), so its logs land there; a
    name sbatch cannot read back is only in the body's `cd --`, and logs land where sbatch ran.
    """
    names = ("job dir", "it's $(touch PWNED) `touch PWNED`")
    jobs = {}
    for name in names:
        folder = tmp_path / name
        shutil.copytree(EXAMPLE, folder / "run")
        monkeypatch.chdir(folder)
        script = CliRunner().invoke(cli, ["slurm", "--num-tasks", "2", *COMMAND])
        assert script.exit_code == 0, script.output
        assert (f'#SBATCH --chdir="{folder}"\n' in script.stdout) == (name == names[0])
        (folder / "job.sbatch").write_text(script.stdout)
        done = subprocess.run(
            ["sbatch", "--parsable", str(folder / "job.sbatch")], cwd=tmp_path, env=slurm_env, capture_output=True
        )
        assert done.returncode == 0, done.stderr
        jobs[name] = done.stdout.decode().strip().split(";")[0]

    def finished() -> bool:
        q = subprocess.run(["squeue", "-h"], env=slurm_env, capture_output=True, text=True, timeout=15)
        return q.returncode == 0 and not q.stdout.strip()

    _wait(finished, 120, f"jobs {jobs} did not finish")
    for name in names:
        monkeypatch.chdir(tmp_path / name)
        assert [r.split("\t")[1] for r in status()] == ["complete"] * 6
    assert len(list((tmp_path / names[0]).glob(f"slurm-{jobs[names[0]]}_*.out"))) == 2
    assert len(list(tmp_path.glob(f"slurm-{jobs[names[1]]}_*.out"))) == 2
    assert not list(tmp_path.rglob("PWNED"))
