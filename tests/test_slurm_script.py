"""Job scripts are data, not code: hostile option values are refused, hostile paths run as the intended words.

Each generated script is run for real under bash, with SLURM_ARRAY_TASK_ID set and a stub in place of the
interpreter (``sys.executable``, which the script runs, points at the stub while the script is generated):
the stub records its working folder and argv as bytes, and the test proves that argv is exactly the
intended command, that nothing else ran (no marker file appeared), and that the script's #SBATCH lines are
exactly the intended ones. The real sbatch reads these scripts in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli
from ckptavg.errors import OptionError
from ckptavg.progress import one_line
from ckptavg.slurm import check_memory, check_name, check_time, job_script, shell_quote

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-run"
MARK = "PWNED"  # what every hostile name tries to create; no file of this name may ever appear
STEPS = ["--steps", "9000:10000", "--k", "2"]  # two outputs: planning reads a few headers only

HOSTILE_NAMES = {
    "space": "a b",
    "command substitution": f"$(touch {MARK})",
    "backticks": f"`touch {MARK}`",
    "single quote": f"it's; touch {MARK}",
    "double quote": f'say "hi"; touch {MARK}',
    "newline": f"x\ntouch {MARK}",
    "newline and #SBATCH": "x\n#SBATCH --uid=0",
    "carriage return": f"x\rtouch {MARK}",
    "tab and escape": "t\tx\x1b[2J",
    "leading dash": "-rf",
    "hash and percent": "#x %j",
    "variables": "$HOME ${PATH} $1",
    "backslashes": "a\\b\\\\c\\",
    "glob": "*",
    "non-utf-8": os.fsdecode(b"\xff\xfe latin \xe9"),
    "unicode line separator": "a\u2028b",
    "right-to-left override": "a\u202eb",
    "utf-8": "données",
}


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in interpreter, in a folder whose own name needs quoting, that records $PWD and its argv."""
    record = tmp_path / "record"
    folder = tmp_path / f"bin 'x' $(touch {MARK})"
    folder.mkdir()
    path = folder / "python"
    path.write_text(f'#!/bin/bash\nprintf \'%s\\0\' "$PWD" "$@" > {shell_quote(record)}\n')
    path.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(path))
    return record


def header(script: str) -> list[str]:
    """The script's leading comment block, as sbatch reads it: up to the first line that is a command."""
    lines = script.split("\n")
    assert lines[0] == "#!/bin/bash"
    block = []
    for line in lines[1:]:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        block.append(line)
    return block


def run_script(script: str, tmp_path: Path, task: int = 1) -> subprocess.CompletedProcess[bytes]:
    elsewhere = tmp_path / "elsewhere"  # bash starts away from the working folder: the script must go there
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "job.sbatch").write_text(script)
    env = {"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": str(task), "HOME": str(tmp_path)}
    return subprocess.run(["bash", "job.sbatch"], cwd=elsewhere, env=env, capture_output=True, timeout=10)


def recorded(record: Path) -> list[bytes]:
    return record.read_bytes().split(b"\0")[:-1]


TASK_OPTIONS = ["--threads", "2", "--task-index"]  # what the script adds after the subcommand's name


def assert_nothing_else_ran(tmp_path: Path) -> None:
    assert not [p for p in tmp_path.rglob("*") if p.name == MARK]


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_a_hostile_folder_and_arguments_reach_the_command_as_they_are(
    name: str, stub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The job's working folder, the run and the output all carry the name; the command gets them exactly."""
    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.chdir(folder)
    # The run and the output carry the name too, where ckptavg itself takes it: a run path with a glob
    # character is a pattern, and an output path may not hold a line break.
    run = str(EXAMPLE)
    if not set(name) & set("*?[") and not any("\udc80" <= c <= "\udcff" for c in name):  # UTF-8
        run = os.path.join(".", name)
        (folder / name).symlink_to(EXAMPLE)
    out = f"out {name}" if len(name.splitlines()) == 1 else "out"
    command = ["lawa", run, *STEPS, "--out", out]
    result = CliRunner().invoke(cli, ["slurm", "--num-tasks", "2", *command])
    assert result.exit_code == 0, result.output
    script = result.stdout

    # sbatch gets the folder where it reads it back as it is: printable ASCII without its quotes, escape,
    # comment or %, in double quotes if it has a space; the others are only in the body's cd.
    where = str(folder)
    chdir = []
    if where.isascii() and where.isprintable() and not set(where) & set("\"'\\#%"):
        chdir = [f'#SBATCH --chdir="{where}"' if " " in where else f"#SBATCH --chdir={where}"]
    directives = [line for line in header(script) if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=ckptavg-lawa",
        "#SBATCH --array=0-1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=2G",
        *chdir,
    ]
    body = script.split("\n")[1 + len(header(script)) :]
    assert body[0] == "set -euo pipefail" and body[1].startswith("cd -- ") and body[2].startswith("exec ")
    assert body[3:] == [""]  # one command per line: no word of the script spans lines
    assert all(c == "\n" or c.isprintable() for c in script), "a control character in the script"
    assert not any(line.startswith("#SBATCH") for line in body)

    done = run_script(script, tmp_path, task=1)
    assert done.returncode == 0, done.stderr
    assert recorded(stub) == [
        os.fsencode(folder),
        *(os.fsencode(w) for w in ["-m", "ckptavg", command[0], *TASK_OPTIONS, "1", "--num-tasks", "2", *command[1:]]),
    ]
    assert_nothing_else_ran(tmp_path)


@pytest.mark.parametrize(
    ("given", "threads"), [([], ["--threads", "6"]), (["--threads", "3"], [])], ids=["from --cpus", "the command's"]
)
def test_each_task_uses_its_cpus_unless_the_command_says_otherwise(
    given: list[str], threads: list[str], stub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Where SLURM does not bind tasks to cores, a task's affinity is the whole node: --threads keeps it to its
    --cpus-per-task."""
    monkeypatch.chdir(tmp_path)
    command = ["lawa", str(EXAMPLE), *STEPS, "--out", "o", *given]
    result = CliRunner().invoke(cli, ["slurm", "--cpus", "6", *command])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --cpus-per-task=6" in header(result.stdout)
    done = run_script(result.stdout, tmp_path, task=0)
    assert done.returncode == 0, done.stderr
    words = [command[0], *threads, "--task-index", "0", "--num-tasks", "1", *command[1:]]
    assert recorded(stub)[3:] == [os.fsencode(w) for w in words]


def test_the_script_names_the_folder_it_cannot_give_sbatch(stub: Path, tmp_path: Path, monkeypatch):
    folder = tmp_path / "it's"
    folder.mkdir()
    monkeypatch.chdir(folder)
    script = CliRunner().invoke(cli, ["slurm", "lawa", str(EXAMPLE), *STEPS, "--out", "o"]).stdout
    assert "#SBATCH --chdir" not in script
    assert (
        "# No --chdir: sbatch cannot read this folder's name from an #SBATCH line, so logs go to the folder sbatch "
        "runs in.\n" in script
    )
    assert f"\ncd -- {shell_quote(folder)}\n" in script


def test_a_hostile_out_is_one_escaped_word_in_the_comment(stub: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = f"o\t#SBATCH --uid=0 $(touch {MARK})\x1b\u202e"
    result = CliRunner().invoke(cli, ["slurm", "lawa", str(EXAMPLE), *STEPS, "--out", out])
    assert result.exit_code == 0, result.output
    comment = header(result.stdout)[0]
    assert comment.startswith("# ckptavg lawa: 2 outputs in 1 array tasks;")
    assert comment.endswith(f"into $'o\\x09#SBATCH --uid=0 $(touch {MARK})\\x1b\\xe2\\x80\\xae'")
    done = run_script(result.stdout, tmp_path, task=0)
    assert done.returncode == 0, done.stderr
    assert recorded(stub)[-1] == os.fsencode(out)
    assert_nothing_else_ran(tmp_path)


# ---------------------------------------------------------------- option values


def refusal(option: str, value: str) -> str:
    result = CliRunner().invoke(cli, ["slurm", option, value, "lawa", str(EXAMPLE), *STEPS, "--out", "o"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"Error: Invalid value for '{option}': ")
    return last.partition(": ")[2].partition(": ")[2]


NAME_RULE = "a SLURM name here must be printable ASCII without spaces, control characters or any of # ' \" \\"
TIME_RULE = "is not a SLURM time: give minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED"
MEMORY_RULE = "is not a SLURM memory size: give a whole number with an optional K, M, G or T, e.g. 4G"

REFUSED = [
    ("--job-name", "x\n#SBATCH --uid=0", f"'x\\n#SBATCH --uid=0' holds '\\n': {NAME_RULE}"),
    ("--job-name", "a b", f"'a b' holds ' ': {NAME_RULE}"),
    ("--job-name", "x#y", f"'x#y' holds '#': {NAME_RULE}"),
    ("--job-name", "", f"'' is empty: {NAME_RULE}"),
    ("--job-name", "données", f"'données' holds 'é': {NAME_RULE}"),
    ("--job-name", "x\\y", f"'x\\\\y' holds '\\\\': {NAME_RULE}"),
    ("--partition", "cpu\n#SBATCH --uid=0", f"'cpu\\n#SBATCH --uid=0' holds '\\n': {NAME_RULE}"),
    ("--partition", "a'b", f'"a\'b" holds "\'": {NAME_RULE}'),
    ("--partition", 'a"b', f"'a\"b' holds '\"': {NAME_RULE}"),
    ("--partition", "gpu\t", f"'gpu\\t' holds '\\t': {NAME_RULE}"),
    ("--mem", "4G\nrm -rf ~", f"'4G\\nrm -rf ~' {MEMORY_RULE}"),
    ("--mem", "4.5G", f"'4.5G' {MEMORY_RULE}"),
    ("--mem", "-1", f"'-1' {MEMORY_RULE}"),
    ("--mem", "4P", f"'4P' {MEMORY_RULE}"),
    ("--mem", "", f"'' {MEMORY_RULE}"),
    ("--time", f"1:00:00\ntouch {MARK}", f"'1:00:00\\ntouch {MARK}' {TIME_RULE}"),
    ("--time", "2:00:00:00", f"'2:00:00:00' {TIME_RULE}"),
    ("--time", "1h", f"'1h' {TIME_RULE}"),
    ("--time", "1-", f"'1-' {TIME_RULE}"),
    ("--time", " 60", f"' 60' {TIME_RULE}"),
    ("--cpus", "0", "0 is not in the range 1<=x<=4096."),
    ("--cpus", "4097", "4097 is not in the range 1<=x<=4096."),
]


@pytest.mark.parametrize(("option", "value", "message"), REFUSED)
def test_a_value_sbatch_would_misread_is_a_usage_error_naming_the_option(option: str, value: str, message: str):
    assert refusal(option, value) == message


ACCEPTED = [
    ("--time", "90"),
    ("--time", "90:30"),
    ("--time", "1:99:00"),
    ("--time", "2-12"),
    ("--time", "2-12:30"),
    ("--time", "2-12:30:15"),
    ("--time", "UNLIMITED"),
    ("--time", "infinite"),
    ("--mem", "4096"),
    ("--mem", "512m"),
    ("--mem", "4G"),
    ("--mem", "1T"),
    ("--mem", "4GB"),
    ("--mem", "0"),
    ("--partition", "gpu,cpu"),
    ("--job-name", "my-job_1.v2"),
]


@pytest.mark.parametrize(("option", "value"), ACCEPTED)
def test_slurm_formats_pass_through_as_given(option: str, value: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["slurm", option, value, "lawa", str(EXAMPLE), *STEPS, "--out", "o"])
    assert result.exit_code == 0, result.output
    line = {"--time": "--time", "--mem": "--mem", "--partition": "--partition", "--job-name": "--job-name"}[option]
    assert f"#SBATCH {line}={value}" in header(result.stdout)


# ---------------------------------------------------------------- the library


def test_job_script_checks_what_it_is_given(tmp_path: Path):
    kw = {"tasks": 2, "workdir": tmp_path, "job_name": "j"}
    for bad, option in (
        ({"mem": "1G\nx"}, "--mem"),
        ({"time": "x"}, "--time"),
        ({"partition": "a b"}, "--partition"),
        ({"job_name": "a\nb"}, "--job-name"),
        ({"cpus": 0}, "--cpus"),
        ({"tasks": 0}, "--num-tasks"),
    ):
        with pytest.raises(OptionError) as e:
            job_script(["python"], **{**kw, **bad})  # type: ignore[arg-type]
        assert e.value.option == option and "\n" not in str(e.value)
    for ok in ("5", "1:02", "1:02:03", "1-2", "1-2:3", "1-2:3:4", "Unlimited", "INFINITE"):
        assert check_time(ok) == ok
    assert check_memory("16g") == "16g" and check_name("a,b", "--partition") == "a,b"


def test_job_script_shape(tmp_path: Path):
    script = job_script(
        ["/opt/py/bin/python", "-m", "ckptavg", "lawa", "run", "--out", "o"],
        tasks=3,
        workdir="/scratch/me/proj",
        job_name="ckptavg-lawa",
        cpus=4,
        mem="8G",
        time="1-00:00",
        partition="cpu",
        summary="ckptavg lawa: 6 outputs\nrm -rf ~",
        token="required",
    )
    assert script.split("\n") == [
        "#!/bin/bash",
        "# ckptavg lawa: 6 outputs\\nrm -rf ~",
        "#SBATCH --job-name=ckptavg-lawa",
        "#SBATCH --array=0-2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=8G",
        "#SBATCH --chdir=/scratch/me/proj",
        "#SBATCH --partition=cpu",
        "#SBATCH --time=1-00:00",
        "set -euo pipefail",
        "cd -- /scratch/me/proj",
        "# Hub token: not in this script. The job reads HF_TOKEN from the environment sbatch passes on:",
        "# export HF_TOKEN=... (or HF_TOKEN=$(cat ~/.cache/huggingface/token)) before sbatch, or give the",
        "# command --token-file PATH instead.",
        ': "${HF_TOKEN:?this job needs a Hub token: export HF_TOKEN=... before sbatch, or use --token-file}"',
        'exec /opt/py/bin/python -m ckptavg lawa run --out o --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks 3',
        "",
    ]


WORDS = [
    *HOSTILE_NAMES.values(),
    "",
    "'",
    "\\'",
    "$'x'",
    "\x01\x7f",
    "!event",
    "~user",
    os.fsdecode(b"\x80\xff'\\"),
]


def test_shell_quote_gives_bash_the_exact_bytes_on_one_line(tmp_path: Path):
    quoted = [shell_quote(w) for w in WORDS]
    assert all("\n" not in q and q.isprintable() for q in quoted)
    done = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + " ".join(quoted)], capture_output=True, cwd=tmp_path, timeout=10
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(b"\0")[:-1] == [os.fsencode(w) for w in WORDS]
    assert_nothing_else_ran(tmp_path)
    assert shell_quote("plain/path-1.0") == "plain/path-1.0" and shell_quote("a b") == "'a b'"
    with pytest.raises(ValueError, match="NUL"):
        shell_quote("a\0b")


def test_one_line_escapes_every_line_break():
    assert one_line("a\nb\rc\u2028d\x85e\x1b") == "a\\nb\\rc\\u2028d\\x85e\\x1b"
