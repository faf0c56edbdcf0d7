"""Where outputs may go: the pure checks of ``ckptavg.outputs`` (no files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptavg.errors import OutputError
from ckptavg.outputs import NAME_MAX, check_name, check_outputs

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
def test_a_name_of_255_bytes_is_legal(name: str):
    assert len(name.encode()) == NAME_MAX
    check_name(Path("out") / name)


@pytest.mark.parametrize("name", ["a" * 256, "é" * 128])
def test_a_name_over_255_bytes_is_refused(name: str):
    msg = refused(check_name, Path("out") / name)
    assert msg == (
        f"{name[:40]}...: the output name is 256 bytes, more than the 255 a file name can hold; choose a shorter --out"
    )


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
