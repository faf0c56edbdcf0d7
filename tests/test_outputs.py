"""Where outputs may go: the pure checks of ``ckptavg.outputs`` (no files), then the real CLI on tiny runs.

Every refusal is one line on stderr with exit code 1, writes nothing (no hidden temporary folder either)
and leaves the inputs as they were, byte for byte.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import error_line, tree_digest
from factories import write_nanogpt_ckpt
from safetensors.torch import save_file

from ckptavg.cli import cli
from ckptavg.errors import CkptavgError, OutputError
from ckptavg.outputs import NAME_MAX, check_name, check_outputs
from ckptavg.sources import TensorInfo, open_run
from ckptavg.writers.safetensors_folder import TMP_MARK, FolderWriter, temp_paths, temp_prefix

STEPS = [1000, 2000, 3000]
LONG_ASCII = "a" * NAME_MAX
LONG_UTF8 = "é" * 127 + "x"  # 255 bytes in 128 characters
LONG_EMOJI = "🙂" * 63 + "abc"  # 255 bytes, four to a character


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)


def refused(call: object, *args: object, **kw: object) -> str:
    with pytest.raises(OutputError) as e:
        call(*args, **kw)  # type: ignore[operator]
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- names (pure)


@pytest.mark.parametrize("out", [".", "..", "/", "a/..", "runs/.."])
def test_a_name_that_is_no_folder_is_refused(out: str):
    msg = refused(check_name, Path(out))
    assert msg == f"{Path(out)}: not a folder name an output can take; give --out a name (e.g. --out soup/)"


@pytest.mark.parametrize("out", ["a\nb", "soup\n", "\nsoup", "a\rb", "dir\n/soup"])
def test_a_line_break_in_an_output_path_is_refused(out: str):
    msg = refused(check_name, Path(out))
    assert msg == f"{out!r}: an output path may not hold a line break or NUL; choose another --out"


@pytest.mark.parametrize("name", [LONG_ASCII, LONG_UTF8, LONG_EMOJI])
def test_a_name_of_255_bytes_is_legal_and_so_are_its_temporary_names(name: str):
    assert len(name.encode()) == NAME_MAX
    check_name(Path("out") / name)
    prefix = temp_prefix(Path("out") / name)
    for suffix in ("0123456789abcdef", f"old-{4194304}"):
        raw = (prefix + suffix).encode()  # valid UTF-8: whole characters were kept
        assert len(raw) <= NAME_MAX, len(raw)
    assert prefix.startswith("." + name[:20]) and prefix.endswith(TMP_MARK)


@pytest.mark.parametrize("name", ["a" * 256, "é" * 128])
def test_a_name_over_255_bytes_is_refused(name: str):
    msg = refused(check_name, Path("out") / name)
    assert msg == (
        f"{name[:40]}...: the output name is 256 bytes, more than the 255 a file name can hold; choose a shorter --out"
    )


def test_short_names_keep_the_temporary_name_they_always_had():
    assert temp_prefix(Path("o/step3000")) == ".step3000.ckptavg-tmp-"


def test_long_names_that_differ_only_at_the_end_get_different_temporary_prefixes():
    a, b = Path("o") / ("a" * 254 + "1"), Path("o") / ("a" * 254 + "2")
    assert temp_prefix(a) != temp_prefix(b)
    assert not temp_prefix(a).startswith(temp_prefix(b)) and not temp_prefix(b).startswith(temp_prefix(a))


# ---------------------------------------------------------------- outputs against inputs and runs (pure)


def in_run_message(out: str, run: str) -> str:
    return (
        f"{out}: in the run folder {run}, where later runs would take it for a checkpoint; "
        f"choose an --out outside it, or deeper (e.g. {Path(run) / 'avg'})"
    )


@pytest.mark.parametrize(
    "out", ["runs/x/step3000", "runs/x/soup", "runs/x/step99/step3000", "runs/x/checkpoint-7/a/step3000"]
)
def test_an_output_where_a_run_looks_for_checkpoints_is_refused(out: str):
    assert refused(check_outputs, [Path(out)], run_source="runs/x") == in_run_message(out, "runs/x")
    assert refused(check_outputs, [Path(out)], run_source="runs/x/") == in_run_message(out, "runs/x/")


def test_an_output_deeper_in_a_run_folder_is_not_refused():
    check_outputs([Path("runs/x/avg/step3000"), Path("runs/x/a/b/step3000")], run_source="runs/x")
    check_outputs([Path("runs/lawa/step3000"), Path("runs/x2/step3000")], run_source="runs/x")
    check_outputs([Path("runs/x/step3000")], run_source=None)  # a Hub run: no folder of ours
    with pytest.raises(OutputError):  # made the same after normalising
        check_outputs([Path("runs/x/sub/../step3000")], run_source="runs/./x")


def test_an_output_above_a_run_folder_is_refused():
    msg = refused(check_outputs, [Path("runs")], run_source="runs/x")
    assert msg == "runs: would replace the run folder runs/x; choose another --out"


@pytest.mark.parametrize(
    ("pattern", "out", "found"),
    [
        ("runs/*/ckpt.pt", "runs/soup", True),  # runs/soup/ckpt.pt would match
        ("runs/*/ckpt.pt", "runs/lawa/step4000", False),  # one level too deep
        ("runs/*/ckpt.pt", "lawa/step4000", False),
        ("runs/*/ckpt.pt", "runs/.hidden", False),  # glob skips hidden names
        ("*.pt", "lawa/step4000", False),
        ("*.pt", "soup.pt", True),  # a folder the pattern lists itself
        ("*.pt", "soup", False),  # soup/ckpt.pt is one level deeper than *.pt looks
        ("nrun/*/*.pt", "nrun/soup", True),
        ("nrun/*/ckpt_*.pt", "nrun/soup", True),  # ckpt.pt would not match, but a file in it could be any name
        ("nrun/ckpt_*.pt", "nrun/soup", False),
        ("nrun/ckpt_*.pt", "out/step4000", False),
    ],
)
def test_a_glob_refuses_what_it_would_find(pattern: str, out: str, found: bool):
    if found:
        msg = refused(check_outputs, [Path(out)], run_source=pattern)
        assert msg == f"{out}: {pattern} would find it as a checkpoint of the run; choose an --out it does not match"
    else:
        check_outputs([Path(out)], run_source=pattern)


def test_outputs_never_replace_contain_or_enter_an_input():
    inputs = [Path("runs/x/step1000"), Path("runs/x/step2000"), Path("n/ckpt.pt")]
    here = Path.cwd()
    assert refused(check_outputs, [Path("runs/x/step1000")], inputs=inputs) == (
        f"runs/x/step1000: would replace input {here}/runs/x/step1000; choose another --out"
    )
    assert refused(check_outputs, [Path("runs")], inputs=inputs) == (
        f"runs: would replace input {here}/runs/x/step1000; choose another --out"
    )
    assert refused(check_outputs, [Path("runs/x/step1000/soup")], inputs=inputs) == (
        f"runs/x/step1000/soup: would be written inside input {here}/runs/x/step1000; choose another --out"
    )
    assert refused(check_outputs, [Path("n/ckpt.pt/soup")], inputs=inputs) == (
        f"n/ckpt.pt/soup: would be written inside input {here}/n/ckpt.pt; choose another --out"
    )
    check_outputs([Path("runs/x/soup"), Path("n/soup")], inputs=inputs)


# ---------------------------------------------------------------- helpers for the CLI


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{TMP_MARK}*"))


@pytest.fixture
def st_run(make_st_run, tmp_path: Path) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    make_st_run(STEPS)
    run = tmp_path / "run"
    before = tree_digest(run)
    yield run
    assert tree_digest(run) == before, "an input changed"
    assert leftovers(tmp_path) == []


def avg(run: Path, out: Path, *extra: object) -> Result:
    return invoke("avg", run / "step1000", run / "step2000", "--out", out, *extra)


# ---------------------------------------------------------------- --overwrite onto a file or a symlink


def test_overwrite_replaces_a_file(st_run: Path, tmp_path: Path):
    out = tmp_path / "soup"
    out.write_text("precious")
    msg = error_line(avg(st_run, out))
    assert msg == f"{out}: already exists and was not made by this plan; pass --overwrite to replace it"
    assert out.read_text() == "precious"

    result = avg(st_run, out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file() and not out.is_symlink()


def test_overwrite_replaces_a_symlink_never_what_it_points_to(st_run: Path, tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "mine.txt").write_text("precious")
    out = tmp_path / "soup"
    out.symlink_to(target)
    result = avg(st_run, out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    assert (target / "mine.txt").read_text() == "precious"


def test_overwrite_replaces_a_symlink_to_a_file(st_run: Path, tmp_path: Path):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    out = tmp_path / "soup"
    out.symlink_to(target)
    assert avg(st_run, out, "--overwrite").exit_code == 0
    assert not out.is_symlink() and out.is_dir()
    assert target.read_text() == "precious"


def test_a_dangling_symlink_is_an_existing_output(st_run: Path, tmp_path: Path):
    out = tmp_path / "soup"
    out.symlink_to(tmp_path / "nowhere")
    msg = error_line(avg(st_run, out))
    assert msg.startswith(f"{out}: already exists") and msg.endswith("pass --overwrite to replace it"), msg
    assert out.is_symlink() and os.readlink(out) == str(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()

    assert avg(st_run, out, "--overwrite").exit_code == 0
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "nowhere").exists()  # nothing written through the link


def test_a_failed_commit_puts_back_what_was_there(st_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The last rename fails (the disk went away, say): the file that was there is back under its own
    name, and no temporary name is left, neither the new folder's nor the old file's."""
    out = tmp_path / "soup"
    out.write_text("precious")
    rename = os.rename

    def failing(src: object, dst: object) -> None:
        if Path(str(dst)) == out and Path(str(src)).name.startswith(f".soup{TMP_MARK}") and "old-" not in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", failing)
    msg = error_line(avg(st_run, out, "--overwrite"))
    assert msg == f"{out}: {os.strerror(errno.EIO)}"
    assert out.read_text() == "precious"


# ---------------------------------------------------------------- long names


@pytest.mark.parametrize("name", [LONG_ASCII, LONG_UTF8, LONG_EMOJI])
def test_an_output_name_of_255_bytes_is_written(st_run: Path, tmp_path: Path, name: str):
    out = tmp_path / name
    result = avg(st_run, out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "run"])


def test_an_output_name_over_255_bytes_is_one_line(st_run: Path, tmp_path: Path):
    name = "é" * 128
    msg = error_line(avg(st_run, tmp_path / name))
    assert msg == (
        f"{name[:40]}...: the output name is 256 bytes, more than the 255 a file name can hold; choose a shorter --out"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("name", ["step3000", LONG_UTF8, "soup[1]"])
def test_temp_paths_finds_the_temporary_folder_and_only_it(tmp_path: Path, name: str):
    """A killed run's folder is found again by its prefix (``output_states`` says ``partial``), and the
    folder of a name that a glob of this one would match (``soup1`` for ``soup[1]``) is not."""
    final = tmp_path / name
    (tmp_path / f".soup1{TMP_MARK}0123456789abcdef").mkdir()
    info = TensorInfo((4,), torch.float32)
    w = FolderWriter(
        final,
        [("a", info)],
        aliases={},
        provenance={"plan_id": "0123456789abcdef"},
        extra_files=[],
        max_shard_size=1 << 30,
        overwrite=False,
    )
    w.open()
    try:
        assert temp_paths(final) == [w.tmp]
        assert len(os.fsencode(w.tmp.name)) <= NAME_MAX
    finally:
        w.abort()
    assert temp_paths(final) == []


# ---------------------------------------------------------------- where no folder can be made


def test_a_parent_that_is_a_file(st_run: Path, tmp_path: Path):
    (tmp_path / "notes").write_text("x")
    out = tmp_path / "notes" / "soup"
    msg = error_line(avg(st_run, out))
    assert msg == f"{out}: {tmp_path / 'notes'} is a file, so no folder can be made under it; choose another --out"
    assert (tmp_path / "notes").read_text() == "x"


def test_a_read_only_folder(st_run: Path, tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        why = os.strerror(errno.EACCES)
    else:  # root writes through permission bits: a read-only mount it is
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mount -o ro is not permitted here: {r.stderr.decode().strip()}")
        why = os.strerror(errno.EROFS)
    try:
        out = ro / "soup"
        msg = error_line(avg(st_run, out))
        assert msg == f"{out}: cannot write in {ro} ({why}); choose another --out"
        assert list(ro.iterdir()) == []
    finally:
        if os.geteuid() != 0:
            ro.chmod(0o755)
        elif subprocess.run(["umount", str(ro)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)


@pytest.mark.parametrize("out", ["a\nb", "soup\n"])
def test_a_line_break_in_out(st_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str):
    monkeypatch.chdir(tmp_path)
    msg = error_line(avg(st_run, Path(out)))
    assert msg == f"{out!r}: an output path may not hold a line break or NUL; choose another --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("out", [".", ".."])
def test_dot_and_dot_dot_as_out(st_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str):
    work = tmp_path / "w" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    msg = error_line(avg(st_run, Path(out), "--overwrite"))
    assert msg == f"{Path(out)}: not a folder name an output can take; give --out a name (e.g. --out soup/)"
    assert work.is_dir() and list(work.iterdir()) == [] and [p.name for p in work.parent.iterdir()] == ["here"]


# ---------------------------------------------------------------- outputs inside the run (wired in api.py)


@pytest.fixture
def nano_run(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "nrun"
    for s in STEPS:
        write_nanogpt_ckpt(run / f"ckpt_{s}.pt", s)
    before = tree_digest(run)
    yield run
    assert tree_digest(run) == before, "the run changed"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("out", ["", "step99"])
def test_a_nanogpt_run_never_gets_outputs_inside_it(nano_run: Path, out: str):
    args = ["lawa", nano_run, "--steps", "3000:3000", "--k", "2", "--format", "ckpt"]
    msg = error_line(invoke(*args, "--out", nano_run / out))
    assert msg == in_run_message(str(nano_run / out / "step3000"), str(nano_run))


def test_a_glob_run_never_gets_outputs_it_would_find(nano_run: Path, tmp_path: Path):
    pattern = f"{tmp_path}/*/*.pt"
    msg = error_line(invoke("lawa", pattern, "--steps", "3000:3000", "--k", "2", "--format", "ckpt", "--out", tmp_path))
    assert msg == (
        f"{tmp_path / 'step3000'}: {pattern} would find it as a checkpoint of the run; "
        "choose an --out it does not match"
    )


def test_a_run_of_step_folders_never_gets_a_step_folder_of_outputs(st_run: Path):
    out = st_run / "step99999"
    msg = error_line(invoke("lawa", st_run, "--steps", "3000:3000", "--k", "2", "--out", out))
    assert msg == in_run_message(str(out / "step3000"), str(st_run))


@pytest.mark.parametrize("kind", ["hf", "nanogpt"])
@pytest.mark.parametrize(
    "rel", ["step5000", "step99/step5000", "checkpoint-9/step5000", "avg/step5000", "avg/x/step5000", "soup"]
)
def test_the_rule_refuses_exactly_what_discovery_finds(tmp_path: Path, kind: str, rel: str):
    """The oracle is ``open_run`` itself: lay out what an output would leave (its folder with ckpt.pt
    and model.safetensors, and a temporary folder beside it) and see whether the run changes."""
    root = tmp_path / "run"
    if kind == "hf":
        for s in STEPS:
            (root / f"step{s}").mkdir(parents=True)
            save_file({"a": torch.zeros(2)}, root / f"step{s}" / "model.safetensors")
    else:
        for s in STEPS:
            write_nanogpt_ckpt(root / f"ckpt_{s}.pt", s)
    before = open_run(str(root)).paths
    out = root / rel
    try:
        check_outputs([out], run_source=str(root))
        refuses = False
    except OutputError:
        refuses = True
    for folder in (out, out.parent / f"{temp_prefix(out)}0123456789abcdef"):
        write_nanogpt_ckpt(folder / "ckpt.pt", 9999)
        save_file({"a": torch.zeros(2)}, folder / "model.safetensors")
    try:
        finds = open_run(str(root)).paths != before
    except CkptavgError:
        finds = True
    stricter = kind == "hf" and rel == "soup"  # refused though not found: the rule is not told the run's kind
    assert refuses == (finds or stricter)
