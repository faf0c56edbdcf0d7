"""Revision names: ``--revision-pattern`` (sources/revisions.py) and ``--name-by``.

The pure part first (what a pattern matches, what it refuses), then the commands against a Hub-like
server on 127.0.0.1 serving the names public trajectories use: OLMo's ``step1000-tokens4B``, LLM360's
``ckpt_000`` and the HF Trainer's ``checkpoint-100``, each beside a ``main`` branch.
"""

from __future__ import annotations

import json
import shutil
import string
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import error_line
from factories import write_nanogpt_ckpt, write_pythia_step
from hub_server import HubServer, commit_of
from hypothesis import given
from hypothesis import strategies as st

from ckptavg import api
from ckptavg.cli import cli
from ckptavg.errors import InvalidArgumentError, InvalidRunError, OutputError
from ckptavg.sources import Checkpoint
from ckptavg.sources.revisions import RevisionPattern
from ckptavg.windows import Window

# ---------------------------------------------------------------- what a pattern matches


@pytest.mark.parametrize(
    ("pattern", "name", "step"),
    [
        ("step{step}", "step143000", 143000),
        ("step{step}", "step0", 0),
        ("step{step}", "step007", None),  # plain {step}: canonical digits only
        ("step{step}", "step", None),
        ("step{step}", "step12x", None),
        ("step{step}", "main", None),
        ("step{step}", "step-1", None),
        ("step{step}", "step\u0661\u0662", None),  # Arabic-Indic digits are not a step, though int() reads them
        ("step{step:d}", "step12", 12),
        ("checkpoint-{step}", "checkpoint-1000", 1000),
        ("checkpoint-{step}", "checkpoint_1000", None),
        ("ckpt_{step:03d}", "ckpt_000", 0),
        ("ckpt_{step:03d}", "ckpt_007", 7),
        ("ckpt_{step:03d}", "ckpt_359", 359),
        ("ckpt_{step:03d}", "ckpt_1234", 1234),
        ("ckpt_{step:03d}", "ckpt_07", None),  # format(7, "03d") is 007
        ("ckpt_{step:03d}", "ckpt_0007", None),
        ("ckpt_{step:03d}", "ckpt_01234", None),
        ("step{step}-tokens{*}B", "step1000-tokens4B", 1000),
        ("step{step}-tokens{*}B", "step2000-tokens8B", 2000),
        ("step{step}-tokens{*}B", "step557000-tokens2336B", 557000),
        ("step{step}-tokens{*}B", "step1000-tokensB", 1000),  # {*} may be empty
        ("step{step}-tokens{*}B", "step1000-tokens4", None),
        ("step{step}-tokens{*}B", "step1000-tokens4/xB", None),  # {*} never crosses a '/'
        ("step{step}-tokens{*}B", "main", None),
        ("{*}/step{step}", "run-a/step5", 5),
        ("{*}/step{step}", "a/b/step5", None),
        ("step{step}-tokens4B", "step1000-tokens4B", 1000),  # a fixed suffix: a subset of OLMo's revisions
        ("step{step}-tokens4B", "step2000-tokens8B", None),
        ("v{{1}}-{step}", "v{1}-5", 5),  # {{ and }} are braces
        ("a.b{step}", "axb5", None),  # literal text is literal, not a regex
        ("(step){step}", "(step)5", 5),
    ],
)
def test_a_pattern_gives_the_step_of_a_revision_name(pattern: str, name: str, step: int | None):
    assert RevisionPattern.parse(pattern).match(name) == step


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("step", "'step': needs a {step} placeholder, e.g. step{step} or ckpt_{step:03d}"),
        ("{{step}}", "'{{step}}': needs a {step} placeholder"),
        ("{step}-{step}", "'{step}-{step}': holds {step} more than once; a name has one step"),
        ("ckpt_{n}", "'ckpt_{n}': '{n}' is not a placeholder; use {step}, {step:0Nd} (e.g. {step:03d}) or {*}"),
        ("{step}{**}", "'{**}' is not a placeholder"),
        ("{STEP}", "'{STEP}' is not a placeholder"),
        ("{step:5d}", "{step:5d} has the format spec '5d'; a step is written with {step} or zero-padded"),
        ("{step:x}", "has the format spec 'x'"),
        ("{step:03}", "has the format spec '03'"),
        ("{step:}", "has the format spec ''"),
        ("{step:00d}", "has the format spec '00d'"),
        ("step{step", "'step{step': the '{' at position 4 is not closed; write '{{' for a literal brace"),
        ("step}{step}", "'step}{step}': a lone '}' at position 4; write '}}' for a literal brace"),
    ],
)
def test_a_pattern_that_is_not_one_is_refused_naming_what(pattern: str, message: str):
    with pytest.raises(InvalidArgumentError) as e:
        RevisionPattern.parse(pattern)
    assert message in str(e.value)


def test_two_revisions_of_one_step_are_refused_naming_both():
    pattern = RevisionPattern.parse("step{step}-tokens{*}B")
    names = ["main", "step1000-tokens4B", "step2000-tokens8B", "step1000-tokens4.2B"]
    with pytest.raises(InvalidRunError) as e:
        pattern.steps(names, "org/run")
    assert str(e.value) == (
        "org/run: revisions 'step1000-tokens4.2B' and 'step1000-tokens4B' both match 'step{step}-tokens{*}B' "
        "as step 1000; give a --revision-pattern that matches one of them"
    )
    assert pattern.steps(names[:3], "org/run") == {1000: "step1000-tokens4B", 2000: "step2000-tokens8B"}


LITERAL = st.text(alphabet=string.ascii_letters + string.digits + "-_.{}/ ", max_size=8)


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@given(head=LITERAL, tail=LITERAL, step=st.integers(0, 10**12), width=st.integers(1, 12))
def test_the_step_a_pattern_writes_is_the_step_it_reads(head: str, tail: str, step: int, width: int):
    spec = "" if width == 1 else f":0{width}d"
    pattern = RevisionPattern.parse(f"{_escaped(head)}{{step{spec}}}{_escaped(tail)}")
    assert pattern.match(f"{head}{step:0{width}d}{tail}") == step


@given(
    head=LITERAL, tail=LITERAL, digits=st.text(alphabet="0123456789", min_size=1, max_size=14), width=st.integers(1, 6)
)
def test_a_name_matches_only_in_the_spelling_its_step_formats_to(head: str, tail: str, digits: str, width: int):
    """No two spellings of one step both match: ``{step:0Nd}`` takes digits d only if format(int(d)) == d."""
    spec = "" if width == 1 else f":0{width}d"
    pattern = RevisionPattern.parse(f"{_escaped(head)}{{step{spec}}}{_escaped(tail)}")
    found = pattern.match(f"{head}{digits}{tail}")
    if f"{int(digits):0{width}d}" == digits:
        assert found == int(digits)
    elif not any(c.isdigit() for c in head + tail):  # digits in the literal text could move the split
        assert found is None


@given(middle=st.text(alphabet=string.ascii_letters + string.digits + ".-_B", max_size=10), step=st.integers(0, 10**9))
def test_a_wildcard_takes_any_text_but_a_slash(middle: str, step: int):
    pattern = RevisionPattern.parse("step{step}-tokens{*}B")
    assert pattern.match(f"step{step}-tokens{middle}B") == step
    assert pattern.match(f"step{step}-tokens{middle}/B") is None


def test_a_name_that_cannot_be_a_folder_is_refused_for_name_by_revision(tmp_path: Path):
    def ckpt(step: int, name: str) -> Checkpoint:
        return Checkpoint(step, f"org/run@{name}", "bin", {}, name=name)

    windows = [Window(1, (0, 1), (0.5, 0.5)), Window(2, (1, 2), (0.5, 0.5))]
    assert api._revision_names(windows, {0: ckpt(0, "a"), 1: ckpt(1, "b"), 2: ckpt(2, "c")}) == ["b", "c"]
    with pytest.raises(OutputError) as e:
        api._revision_names(windows, {0: ckpt(0, "a"), 1: ckpt(1, "v1/step1"), 2: ckpt(2, "c")})
    assert str(e.value) == (
        "--name-by revision: org/run@v1/step1 is called 'v1/step1', which cannot name an output folder; "
        "use --name-by step"
    )
    for name in ("..", "", "a\u202eb", ".ckptavg-tmp", ".hidden"):
        with pytest.raises(OutputError, match="cannot name an output folder"):
            api._revision_names(windows, {0: ckpt(0, "a"), 1: ckpt(1, "b"), 2: ckpt(2, name)})


# ---------------------------------------------------------------- against a Hub

OLMO = "allenai/olmo-tiny"  # step{N}-tokens{4N/1000}B, safetensors, one revision sharded
LLM360 = "LLM360/amber-tiny"  # ckpt_000 ... ckpt_005, .bin
TRAINER = "someone/trainer-tiny"  # checkpoint-{N}
OLMO_STEPS = [1000, 2000, 3000, 4000]
LLM360_STEPS = [0, 1, 2, 3, 4, 5]
TRAINER_STEPS = [100, 200, 300]
OLMO_PATTERN = "step{step}-tokens{*}B"


def olmo_name(step: int) -> str:
    return f"step{step}-tokens{4 * step // 1000}B"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    local = tmp_path_factory.mktemp("local")  # the same checkpoints as local runs of step{N}/ folders
    for s in OLMO_STEPS:
        write_pythia_step(root / OLMO / olmo_name(s), s, fmt="safetensors", shards=3 if s == 3000 else 1)
        shutil.copytree(root / OLMO / olmo_name(s), local / "olmo" / f"step{s}")
    write_pythia_step(root / OLMO / "main", 4000, fmt="safetensors")
    for s in LLM360_STEPS:
        write_pythia_step(root / LLM360 / f"ckpt_{s:03d}", s)
        shutil.copytree(root / LLM360 / f"ckpt_{s:03d}", local / "llm360" / f"step{s}")
    write_pythia_step(root / LLM360 / "main", 5)
    for s in TRAINER_STEPS:
        write_pythia_step(root / TRAINER / f"checkpoint-{s}", s, fmt="safetensors")
    with HubServer(root) as server:
        server.local = local  # type: ignore[attr-defined]
        yield server


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "0.01")


def invoke(hub: HubServer, tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache")])


def json_rows(r: Result) -> list[dict]:
    assert r.exit_code == 0, (r.output, r.exception)
    return [json.loads(ln) for ln in r.stdout.splitlines()]


def same_bytes(a: Path, b: Path) -> bool:
    """The two outputs' model.safetensors hold the same tensors, byte for byte: the same header but for its
    metadata (where provenance says where each came from), and the same data after it."""

    def split(folder: Path) -> tuple[dict, bytes]:
        raw = (folder / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__")
        return header, raw[8 + n :]

    return split(a) == split(b)


def test_ls_shows_the_steps_a_pattern_matches_with_their_revision_names(hub: HubServer, tmp_path: Path):
    rows = json_rows(invoke(hub, tmp_path, "ls", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN, "--json"))
    assert [(r["step"], r["name"], r["path"]) for r in rows] == [
        (s, olmo_name(s), f"{OLMO}@{olmo_name(s)}") for s in OLMO_STEPS
    ]  # main is no step
    human = invoke(hub, tmp_path, "ls", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN)
    assert [ln.split("\t")[::3] for ln in human.stdout.splitlines()] == [
        [str(s), f"{OLMO}@{olmo_name(s)}"] for s in OLMO_STEPS
    ]
    # A fixed token count matches one revision: a subset, legitimately, and ls shows which.
    subset = json_rows(
        invoke(hub, tmp_path, "ls", "--repo", OLMO, "--revision-pattern", "step{step}-tokens8B", "--json")
    )
    assert [(r["step"], r["name"]) for r in subset] == [(2000, "step2000-tokens8B")]


def test_no_match_lists_the_revisions_the_repository_has(hub: HubServer, tmp_path: Path):
    olmo = error_line(invoke(hub, tmp_path, "ls", "--repo", OLMO))
    assert olmo == (
        f"{OLMO}: no revision matches 'step{{step}}' (--revision-pattern); it has 5 revisions: main, "
        "step1000-tokens4B, step2000-tokens8B, step3000-tokens12B, step4000-tokens16B"
    )
    llm360 = error_line(invoke(hub, tmp_path, "lawa", "--repo", LLM360, "--steps", "5:5", "--out", str(tmp_path / "o")))
    assert llm360 == (
        f"{LLM360}: no revision matches 'step{{step}}' (--revision-pattern); it has 7 revisions, e.g. "
        "ckpt_000, ckpt_001, ckpt_002, ckpt_003, ckpt_004, ..."
    )
    unpadded = error_line(invoke(hub, tmp_path, "ls", "--repo", LLM360, "--revision-pattern", "ckpt_{step}"))
    assert unpadded.startswith(f"{LLM360}: no revision matches 'ckpt_{{step}}' (--revision-pattern)")
    assert not (tmp_path / "o").exists()


def test_two_revisions_of_one_step_fail_in_one_line(hub: HubServer, tmp_path: Path):
    hub.faults["branches"] = {"step1000-tokens4.2B": commit_of(OLMO, "other")}
    try:
        line = error_line(invoke(hub, tmp_path, "ls", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN))
    finally:
        del hub.faults["branches"]
    assert line == (
        f"{OLMO}: revisions 'step1000-tokens4.2B' and 'step1000-tokens4B' both match '{OLMO_PATTERN}' as step "
        "1000; give a --revision-pattern that matches one of them"
    )


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [("ckpt_{n}", "'{n}' is not a placeholder"), ("ckpt", "needs a {step} placeholder"), ("{step:5d}", "'5d'")],
)
def test_a_bad_pattern_is_a_usage_error_before_any_request(hub: HubServer, tmp_path: Path, pattern: str, fragment: str):
    hub.requests.clear()
    for option in ("--revision-pattern", "--revision-template"):
        r = invoke(hub, tmp_path, "lawa", "--repo", LLM360, option, pattern, "--steps", "5:5", "--out", str(tmp_path))
        line = error_line(r, code=2)
        assert "'--revision-pattern' / '--revision-template'" in line and fragment in line, line
    assert hub.requests == []


def test_plan_picks_steps_and_members_from_olmo_names(hub: HubServer, tmp_path: Path):
    base = ["plan", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN, "--steps", "3000:4000", "--k", "2"]
    rows = json_rows(invoke(hub, tmp_path, *base, "--out", "o", "--json"))
    assert [(r["step"], r["members"], r["out"]) for r in rows] == [
        (3000, [2000, 3000], "o/step3000"),
        (4000, [3000, 4000], "o/step4000"),
    ]
    named = json_rows(invoke(hub, tmp_path, *base, "--out", "o", "--json", "--name-by", "revision"))
    assert [r["out"] for r in named] == ["o/step3000-tokens12B", "o/step4000-tokens16B"]
    ema = invoke(hub, tmp_path, *base[:-2], "--method", "ema", "--name-by", "revision", "--out", "e")
    assert [ln.split("\t")[:3] for ln in ema.stdout.splitlines()] == [
        ["e/step3000-tokens12B", "ema", "step=3000"],
        ["e/step4000-tokens16B", "ema", "step=4000"],
    ]


def test_lawa_of_olmo_revisions_named_by_revision_equals_lawa_of_local_copies(hub: HubServer, tmp_path: Path):
    args = ["--steps", "3000:4000", "--k", "2"]
    remote = invoke(
        hub, tmp_path, "lawa", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN, *args,
        "--name-by", "revision", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert remote.exit_code == 0, remote.output
    assert remote.stdout.splitlines() == [str(tmp_path / "r" / n) for n in ("step3000-tokens12B", "step4000-tokens16B")]
    local = CliRunner().invoke(cli, ["lawa", str(hub.local / "olmo"), *args, "--out", str(tmp_path / "l")])  # type: ignore[attr-defined]
    assert local.exit_code == 0, local.output
    for s in (3000, 4000):
        assert same_bytes(tmp_path / "r" / olmo_name(s), tmp_path / "l" / f"step{s}")
        record = json.loads((tmp_path / "r" / olmo_name(s) / "ckptavg.json").read_text())
        assert record["step"] == s
        assert [m["files"][0]["revision"] for m in record["members"]] == [olmo_name(s - 1000), olmo_name(s)]
    # Named by step, the same plan writes the same record under step{N}: naming is not part of provenance.
    by_step = invoke(
        hub, tmp_path, "lawa", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN, *args, "--out", str(tmp_path / "s")
    )
    assert by_step.exit_code == 0, by_step.output
    for s in (3000, 4000):
        a = json.loads((tmp_path / "r" / olmo_name(s) / "ckptavg.json").read_text())
        b = json.loads((tmp_path / "s" / f"step{s}" / "ckptavg.json").read_text())
        assert a["plan_id"] == b["plan_id"]
    # status and a second run find the revision-named outputs complete.
    command = [
        "lawa", "--repo", OLMO, "--revision-pattern", OLMO_PATTERN, *args, "--name-by", "revision",
        "--out", str(tmp_path / "r"), "--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    status = CliRunner().invoke(cli, ["status", "--json", *command])
    assert [(r["out"], r["state"]) for r in json_rows(status)] == [
        (str(tmp_path / "r" / olmo_name(s)), "complete") for s in (3000, 4000)
    ]
    hub.requests.clear()
    again = CliRunner().invoke(cli, command)
    assert again.exit_code == 0 and "is complete (same plan); skipped" in again.stderr
    assert not [r for r in hub.requests if r.startswith("GET") and r.endswith(".safetensors")]


def test_llm360_checkpoints_by_a_zero_padded_step(hub: HubServer, tmp_path: Path):
    """ckpt_{step:03d}: ckpt_005 is step 5; the old option name still works."""
    args = ["--steps", "3:5", "--k", "3"]
    remote = invoke(
        hub, tmp_path, "lawa", "--repo", LLM360, "--revision-template", "ckpt_{step:03d}", *args,
        "--name-by", "revision", "--out", str(tmp_path / "r"), "--json",
    )  # fmt: skip
    assert [Path(r["out"]).name for r in json_rows(remote)] == ["ckpt_003", "ckpt_004", "ckpt_005"]
    local = CliRunner().invoke(cli, ["lawa", str(hub.local / "llm360"), *args, "--out", str(tmp_path / "l")])  # type: ignore[attr-defined]
    assert local.exit_code == 0, local.output
    for s in (3, 4, 5):
        assert same_bytes(tmp_path / "r" / f"ckpt_{s:03d}", tmp_path / "l" / f"step{s}")
    record = json.loads((tmp_path / "r" / "ckpt_005" / "ckptavg.json").read_text())
    assert [m["step"] for m in record["members"]] == [3, 4, 5]
    assert [m["files"][0]["revision"] for m in record["members"]] == ["ckpt_003", "ckpt_004", "ckpt_005"]


def test_trainer_checkpoints_on_the_hub_named_by_revision(hub: HubServer, tmp_path: Path):
    remote = invoke(
        hub, tmp_path, "swa", "--repo", TRAINER, "--revision-pattern", "checkpoint-{step}", "--steps", "200:300",
        "--start", "100", "--name-by", "revision", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert remote.exit_code == 0, remote.output
    assert remote.stdout.splitlines() == [
        str(tmp_path / "r" / "checkpoint-200"),
        str(tmp_path / "r" / "checkpoint-300"),
    ]
    local = CliRunner().invoke(
        cli, ["swa", str(hub.root / TRAINER), "--steps", "200:300", "--start", "100", "--out", str(tmp_path / "l")]
    )
    assert local.exit_code == 0, local.output
    for s in (200, 300):
        assert same_bytes(tmp_path / "r" / f"checkpoint-{s}", tmp_path / "l" / f"step{s}")


# ---------------------------------------------------------------- local runs


def test_a_local_trainer_run_named_by_its_folders(tmp_path: Path):
    for s in (100, 200, 300):
        write_pythia_step(tmp_path / "run" / f"checkpoint-{s}", s, fmt="safetensors", tokenizer=False)
    base = ["lawa", str(tmp_path / "run"), "--steps", "200:300", "--k", "2"]
    rows = json_rows(CliRunner().invoke(cli, ["ls", str(tmp_path / "run"), "--json"]))
    assert [(r["step"], r["name"]) for r in rows] == [
        (100, "checkpoint-100"),
        (200, "checkpoint-200"),
        (300, "checkpoint-300"),
    ]
    named = CliRunner().invoke(cli, [*base, "--name-by", "revision", "--out", str(tmp_path / "r")])
    assert named.exit_code == 0, named.output
    assert named.stdout.splitlines() == [str(tmp_path / "r" / "checkpoint-200"), str(tmp_path / "r" / "checkpoint-300")]
    plain = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "s")])
    assert plain.stdout.splitlines() == [str(tmp_path / "s" / "step200"), str(tmp_path / "s" / "step300")]
    for s in (200, 300):
        assert same_bytes(tmp_path / "r" / f"checkpoint-{s}", tmp_path / "s" / f"step{s}")
    status = CliRunner().invoke(cli, ["status", *base, "--name-by", "revision", "--out", str(tmp_path / "r")])
    assert status.exit_code == 0 and status.stderr.strip() == "ckptavg: 2 of 2 outputs complete", status.output


def test_nanogpt_files_named_by_stem_and_shared_names_refused(tmp_path: Path):
    for s in (1000, 2000):
        write_nanogpt_ckpt(tmp_path / "glob" / f"ckpt_{s}.pt", s)
        write_nanogpt_ckpt(tmp_path / "nested" / str(s) / "ckpt.pt", s)  # every file is called ckpt
    args = ["--steps", "1000:2000", "--k", "1", "--name-by", "revision", "--dry-run", "--json"]
    stems = CliRunner().invoke(cli, ["lawa", f"{tmp_path / 'glob'}/*.pt", *args, "--out", "o"])
    assert [r["out"] for r in json_rows(stems)] == ["o/ckpt_1000", "o/ckpt_2000"]
    shared = CliRunner().invoke(cli, ["lawa", str(tmp_path / "nested"), *args, "--out", "o"])
    assert error_line(shared) == (
        "--name-by revision: the outputs at steps 1000 and 2000 would both be named 'ckpt'; use --name-by step"
    )


def test_slurm_keeps_the_pattern_and_the_naming_in_its_command(hub: HubServer, tmp_path: Path):
    r = CliRunner().invoke(
        cli,
        [
            "slurm",
            "lawa",
            "--repo",
            OLMO,
            "--revision-pattern",
            OLMO_PATTERN,
            "--steps",
            "3000:4000",
            "--k",
            "2",
            "--name-by",
            "revision",
            "--out",
            str(tmp_path / "o"),
            "--endpoint",
            hub.url,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.output
    assert f"--revision-pattern '{OLMO_PATTERN}'" in r.stdout and "--name-by revision" in r.stdout


def test_a_name_longer_than_a_file_name_is_no_step():
    """Server-supplied names are bounded before matching: a {*} pattern costs more on long names, and no
    output folder could carry such a name."""
    pattern = RevisionPattern.parse("{*}-{*}-step{step}")
    assert pattern.match("a-b-step7") == 7
    assert pattern.match("-" * 300 + "step7") is None
