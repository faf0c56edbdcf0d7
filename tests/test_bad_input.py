"""Bad input and hostile environments, through the real CLI: each fails with one line naming the file, step
or tensor, exit code 1 (2 for usage errors), and leaves nothing behind under --out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import SHAPES, error_line, random_state
from factories import write_nanogpt_ckpt, write_pythia_run
from safetensors.torch import load_file, save_file

from ckptavg.cli import cli

TMP_MARK = ".ckptavg-tmp-"
STEPS = [1000, 2000, 3000]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)


# ---------------------------------------------------------------- helpers


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_nothing_left(out: Path) -> None:
    """Neither the target folders nor any hidden temp folder: --out is absent or empty."""
    if out.exists():
        left = sorted(p.name for p in out.iterdir())
        assert left == [], f"left behind under {out}: {left}"


def without(msg: str, *paths: Path) -> str:
    """The message with the given paths removed, so digits inside paths do not count as naming a step."""
    for p in sorted((str(p) for p in paths), key=len, reverse=True):
        msg = msg.replace(p, "<path>")
    return msg


def has_number(msg: str, n: int) -> bool:
    return re.search(rf"(?<![\d.]){n}(?![\d])", msg) is not None


def write_st(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})


def lawa(run: Path, out: Path, *extra: object, steps: str = "3000:3000", k: int = 3) -> Result:
    return invoke("lawa", run, "--steps", steps, "--k", k, "--out", out, *extra)


# ---------------------------------------------------------------- steps and parameters


def test_missing_step_inside_window_names_step_and_nearest(make_st_run, tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    make_st_run([1000, 2000, 4000, 5000])
    msg = error_line(lawa(run, out, steps="5000:5000", k=5))
    rest = without(msg, run)
    assert has_number(rest, 3000), msg
    nearest = rest[rest.find("nearest") :]
    assert "nearest" in rest and (has_number(nearest, 2000) or has_number(nearest, 4000)), msg
    assert_nothing_left(out)


def test_window_past_the_end_of_the_run(make_st_run, tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    make_st_run([1000, 2000, 3000])
    msg = error_line(lawa(run, out, steps="3000:5000", k=1))
    rest = without(msg, run)
    assert has_number(rest, 4000) and has_number(rest, 5000), msg
    assert "nearest" in rest and has_number(rest[rest.find("nearest") :], 3000), msg
    assert_nothing_left(out)


@pytest.mark.parametrize("steps", ["9000:1000", "", ":", "1000:", "1000:2000:0", "abc", "-1000:2000"])
def test_bad_step_range_is_a_usage_error(make_st_run, tmp_path: Path, steps: str):
    make_st_run(STEPS)
    out = tmp_path / "out"
    msg = error_line(lawa(tmp_path / "run", out, steps=steps, k=1), code=2)
    assert "--steps" in msg
    if steps == "9000:1000":
        assert "inverted" in msg and "9000" in msg and "1000" in msg
    assert_nothing_left(out)


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one(make_st_run, tmp_path: Path, k: int):
    make_st_run(STEPS)
    out = tmp_path / "out"
    msg = error_line(lawa(tmp_path / "run", out, k=k), code=2)  # a usage error
    assert "--k" in msg and has_number(msg, k), msg
    assert_nothing_left(out)


@pytest.mark.parametrize(("k", "nu"), [(4, None), (2, 3000), (3, 2000)])
def test_window_wider_than_the_run(make_st_run, tmp_path: Path, k: int, nu: int | None):
    make_st_run(STEPS)  # spans 2000 steps
    out = tmp_path / "out"
    extra = [] if nu is None else ["--k-stepsize", nu]
    msg = error_line(lawa(tmp_path / "run", out, *extra, k=k))
    rest = without(msg, tmp_path / "run")
    assert f"k={k}" in rest or re.search(rf"\bk\b\D*{k}", rest), msg
    assert has_number(rest, 2000), msg  # the run's span
    assert_nothing_left(out)


@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1"])
def test_ema_decay_outside_open_unit_interval(make_st_run, tmp_path: Path, decay: str):
    make_st_run(STEPS)
    out = tmp_path / "out"
    result = invoke("ema", tmp_path / "run", "--steps", "1000:3000", f"--decay={decay}", "--out", out)
    msg = error_line(result, code=2)  # a usage error
    assert "--decay" in msg, msg
    assert_nothing_left(out)


# ---------------------------------------------------------------- members that disagree


def _mismatch(make_st_run, tmp_path: Path, odd: dict[str, torch.Tensor], odd_step: int = 2000) -> tuple[str, str]:
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    write_st(run / f"step{odd_step}" / "model.safetensors", odd)
    msg = error_line(lawa(run, out))
    assert_nothing_left(out)
    return msg, without(msg, *(run / f"step{s}" for s in STEPS), run)


def test_member_missing_a_tensor(make_st_run, tmp_path: Path):
    state = random_state(2000, torch.float16)
    del state["layer.b"]
    msg, rest = _mismatch(make_st_run, tmp_path, state)
    assert "layer.b" in msg and has_number(rest, 2000) and has_number(rest, 3000), msg


def test_member_with_an_extra_tensor(make_st_run, tmp_path: Path):
    state = random_state(2000, torch.float16)
    state["stray.weight"] = torch.zeros(4, dtype=torch.float16)
    msg, rest = _mismatch(make_st_run, tmp_path, state)
    assert "stray.weight" in msg and has_number(rest, 2000) and has_number(rest, 3000), msg


def test_newest_member_with_an_extra_tensor(make_st_run, tmp_path: Path):
    state = random_state(3000, torch.float16)
    state["stray.weight"] = torch.zeros(4, dtype=torch.float16)
    msg, rest = _mismatch(make_st_run, tmp_path, state, odd_step=3000)
    assert "stray.weight" in msg and has_number(rest, 3000), msg
    assert has_number(rest, 1000) or has_number(rest, 2000), msg


def test_member_with_another_shape(make_st_run, tmp_path: Path):
    state = random_state(2000, torch.float16, {**SHAPES, "layer.w": (4999,)})
    msg, rest = _mismatch(make_st_run, tmp_path, state)
    assert "layer.w" in msg and has_number(rest, 2000) and has_number(rest, 3000), msg
    assert "4999" in rest and "5000" in rest, msg


def test_member_with_another_dtype(make_st_run, tmp_path: Path):
    state = random_state(2000, torch.float16)
    state["head.weight"] = state["head.weight"].float()
    msg, rest = _mismatch(make_st_run, tmp_path, state)
    assert "head.weight" in msg and has_number(rest, 2000) and has_number(rest, 3000), msg
    assert "float32" in msg and "float16" in msg, msg


# ---------------------------------------------------------------- damaged files


@pytest.mark.parametrize("where", ["data", "header", "length"])
def test_truncated_safetensors(make_st_run, tmp_path: Path, where: str):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    f = run / "step2000" / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = {"data": 8 + n + (len(raw) - 8 - n) // 2, "header": 8 + n // 2, "length": 5}[where]
    f.write_bytes(raw[:cut])
    msg = error_line(lawa(run, out))
    assert str(f) in msg and re.search(r"truncated|corrupt", msg), msg
    assert_nothing_left(out)


def test_truncated_bin(make_st_run, tmp_path: Path):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "step2000" / "model.safetensors").unlink()
    f = run / "step2000" / "pytorch_model.bin"
    torch.save(random_state(2000, torch.float16), f)
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    msg = error_line(lawa(run, out))
    assert str(f) in msg and re.search(r"truncated|corrupt", msg), msg
    assert_nothing_left(out)


def test_truncated_nanogpt_ckpt(tmp_path: Path):
    run, out = tmp_path / "nano", tmp_path / "out"
    for s in STEPS:
        write_nanogpt_ckpt(run / f"ckpt_{s}.pt", s)
    f = run / "ckpt_2000.pt"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    msg = error_line(lawa(run, out))
    assert str(f) in msg and re.search(r"truncated|corrupt", msg), msg
    assert_nothing_left(out)


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.mark.parametrize("lie", ["shifted", "too_short", "overlapping", "past_the_end"])
def test_safetensors_header_lies_about_offsets(make_st_run, tmp_path: Path, lie: str):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    f = run / "step2000" / "model.safetensors"
    victim = "scalar" if lie == "past_the_end" else "layer.w"  # scalar is stored last

    def edit(h: dict) -> None:
        begin, end = h[victim]["data_offsets"]
        if lie == "shifted":  # same length, 4 bytes later: a gap before it, an overlap after it
            h[victim]["data_offsets"] = [begin + 4, end + 4]
        elif lie == "too_short":
            h[victim]["data_offsets"] = [begin, end - 2]
        elif lie == "overlapping":  # same length, starting inside the tensor stored before it
            h[victim]["data_offsets"] = [begin - 2, end - 2]
        else:
            size = max(e for k, v in h.items() if k != "__metadata__" for e in v["data_offsets"])
            h[victim]["data_offsets"] = [size, size + (end - begin)]

    _rewrite_header(f, edit)
    msg = error_line(lawa(run, out))
    assert str(f) in msg and victim in without(msg, f), msg
    assert_nothing_left(out)


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("target", ["../../x", "../step1000/model.safetensors", "/etc/hostname"])
def test_index_pointing_outside_the_checkpoint(make_st_run, tmp_path: Path, index: str, target: str):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    step = run / "step2000"
    (step / "model.safetensors").unlink()
    write_st(tmp_path / "x", random_state(2000, torch.float16))  # ../../x exists and is valid: still refused
    (step / index).write_text(json.dumps({"metadata": {}, "weight_map": {n: target for n in SHAPES}}))
    msg = error_line(lawa(run, out))
    assert str(step / index) in msg and "outside the checkpoint folder" in msg and target in msg, msg
    assert_nothing_left(out)


# ---------------------------------------------------------------- unsafe and legacy pickles

MARKER_ENV = "CKPTAVG_TEST_MARKER"


def _plant_marker(path: str) -> dict:
    Path(path).write_text("code from the checkpoint ran")
    return {}


@dataclass
class Sneaky:
    """Writes a marker file when unpickled: __setstate__ runs only if the loader accepts the class."""

    marker: str

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("code from the checkpoint ran")
        self.__dict__.update(state)


@dataclass
class Reduces:
    marker: str

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_plant_marker, (self.marker,))


@pytest.mark.parametrize("cls", [Sneaky, Reduces])
def test_pickle_with_a_foreign_class_is_refused_without_running_it(make_st_run, tmp_path: Path, cls):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "step2000" / "model.safetensors").unlink()
    f = run / "step2000" / "pytorch_model.bin"
    marker = tmp_path / "marker"
    torch.save({**random_state(2000, torch.float16), "extra": cls(str(marker))}, f)
    assert not marker.exists()
    msg = error_line(lawa(run, out))
    assert str(f) in msg and "weights_only" in msg, msg
    assert not marker.exists(), "the checkpoint's code ran during ckptavg's load"
    assert_nothing_left(out)
    # The control: an unsafe load does run it, so the check above means something.
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_legacy_pickle_needs_the_flag_then_averages(tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    states = {s: random_state(s, torch.float32) for s in STEPS}
    for s, sd in states.items():
        (run / f"step{s}").mkdir(parents=True)
        torch.save(sd, run / f"step{s}" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    msg = error_line(lawa(run, out))
    assert "--allow-legacy-pickle" in msg and "pytorch_model.bin" in msg and str(run) in msg, msg
    assert_nothing_left(out)

    result = lawa(run, out, "--allow-legacy-pickle")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out / "step3000")
    got = load_file(out / "step3000" / "model.safetensors")
    assert got.keys() == states[3000].keys()
    for n, t in got.items():
        ref = sum(states[s][n].double() for s in STEPS) / 3
        assert t.dtype == torch.float32 and t.shape == ref.shape
        torch.testing.assert_close(t.double(), ref, rtol=1e-6, atol=1e-6)
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


# ---------------------------------------------------------------- torch files safetensors cannot hold


def bin_run(root: Path, states: dict[int, dict[str, torch.Tensor]]) -> Path:
    for step, state in states.items():
        (root / f"step{step}").mkdir(parents=True)
        torch.save(state, root / f"step{step}" / "pytorch_model.bin")
    return root


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: torch.randn(3, dtype=torch.complex64), "complex64, which a safetensors file cannot hold"),
        (lambda: torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), "float4_e2m1fn_x2, which"),
        (lambda: torch.randn(3, 3).to_sparse(), "sparse_coo, not a dense tensor"),
    ],
)
def test_a_bin_tensor_that_safetensors_cannot_hold_is_named_at_planning(tmp_path: Path, make, what: str):
    """Was a KeyError traceback from the writer (complex, packed float4) or from finding offsets (sparse)."""
    run = bin_run(tmp_path / "run", {s: {"w": torch.randn(4), "odd": make()} for s in (1, 2)})
    msg = error_line(lawa(run, tmp_path / "out", steps="2:2", k=2))
    assert msg.startswith(f"{run / 'step1' / 'pytorch_model.bin'}: tensor 'odd' is {what}"), msg
    assert not (tmp_path / "out").exists()


def test_a_bin_tensor_named_metadata_is_refused_not_written_over_the_safetensors_header(tmp_path: Path):
    run = bin_run(tmp_path / "run", {s: {"w": torch.randn(4), "__metadata__": torch.randn(3)} for s in (1, 2)})
    msg = error_line(lawa(run, tmp_path / "out", steps="2:2", k=2))
    assert "tensor is named '__metadata__', which a safetensors file cannot hold" in msg, msg
    assert not (tmp_path / "out").exists()


def test_tied_weights_saved_in_another_key_order_average_as_the_same_tie(tmp_path: Path):
    """{a: t, b: t} in one file, {b: t, a: t} in the other: was "tensor 'a' is in step 1 but not in step 2"."""
    states = {}
    for step, order in ((1, ("a", "b")), (2, ("b", "a"))):
        t = torch.randn(4, generator=torch.Generator().manual_seed(step))
        states[step] = {order[0]: t, order[1]: t, "c": torch.randn(2)}
    run = bin_run(tmp_path / "run", states)
    result = lawa(run, tmp_path / "out", steps="2:2", k=2)
    assert result.exit_code == 0, result.stderr
    got = load_file(tmp_path / "out" / "step2" / "model.safetensors")
    want = (states[1]["a"].double() + states[2]["a"].double()) / 2
    assert torch.equal(got["a"], want.float()) and torch.equal(got["b"], want.float())


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_refused_then_allowed(make_st_run, tmp_path: Path, bad: float):
    states = make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    poisoned = dict(states[2000])
    poisoned["layer.w"] = poisoned["layer.w"].clone()
    poisoned["layer.w"][4321] = bad
    write_st(run / "step2000" / "model.safetensors", poisoned)
    msg = error_line(lawa(run, out))
    rest = without(msg, *(run / f"step{s}" for s in STEPS), run)
    assert "layer.w" in msg and has_number(rest, 2000), msg
    assert "--allow-nonfinite" in msg
    assert_nothing_left(out)

    result = lawa(run, out, "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    got = load_file(out / "step3000" / "model.safetensors")
    w = got["layer.w"]
    if bad != bad:
        assert torch.isnan(w[4321])
    else:
        assert w[4321].item() == bad
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[4321] = False
    assert bool(torch.isfinite(w[mask]).all())
    for n in SHAPES:
        if n != "layer.w":
            assert bool(torch.isfinite(got[n]).all()), n


def test_allow_nonfinite_does_not_poison_later_windows(make_st_run, tmp_path: Path):
    """Overlapping LAWA windows: an Inf at step 1000 belongs only to the window ending at 2000."""
    states = make_st_run([1000, 2000, 3000, 4000, 5000])
    run, out = tmp_path / "run", tmp_path / "out"
    poisoned = dict(states[1000])
    poisoned["layer.w"] = poisoned["layer.w"].clone()
    poisoned["layer.w"][7] = float("inf")
    write_st(run / "step1000" / "model.safetensors", poisoned)
    result = lawa(run, out, "--allow-nonfinite", "--chunk", 1024, steps="2000:5000", k=2)
    assert result.exit_code == 0, result.stderr
    assert load_file(out / "step2000" / "model.safetensors")["layer.w"][7].item() == float("inf")
    for end in (3000, 4000, 5000):
        got = load_file(out / f"step{end}" / "model.safetensors")["layer.w"]
        ref = ((states[end - 1000]["layer.w"].double() + states[end]["layer.w"].double()) / 2).half()
        assert bool(torch.isfinite(got).all()), f"step{end}: no member holds Inf, yet the output does"
        assert torch.equal(got, ref), end


@pytest.mark.parametrize(
    ("dtype", "narrow", "big"),
    [
        (torch.float32, "float16", 1e6),
        (torch.float32, "bfloat16", 3.4e38),  # bf16's largest is 3.39e38: fp32's top values round to Inf
        (torch.bfloat16, "float16", 1e5),
    ],
)
def test_a_mean_too_large_for_a_narrower_dtype_is_refused_not_written_as_inf(
    make_st_run, tmp_path: Path, dtype: torch.dtype, narrow: str, big: float
):
    """Finite members whose mean the --dtype cannot hold: the cheap check (a finite sum means finite means)
    let Inf through to the output."""
    states = make_st_run(STEPS, dtype)
    run, out = tmp_path / "run", tmp_path / "out"
    for s in STEPS:
        states[s]["layer.w"][4321] = big
        write_st(run / f"step{s}" / "model.safetensors", states[s])
    msg = error_line(lawa(run, out, "--dtype", narrow))
    assert f"tensor 'layer.w' for step 3000 ({run / 'step3000'}) overflows {narrow} to Inf" in msg, msg
    assert "pass a wider --dtype or --allow-nonfinite" in msg
    assert_nothing_left(out)
    result = lawa(run, out, "--dtype", narrow, "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    assert load_file(out / "step3000" / "model.safetensors")["layer.w"][4321].item() == float("inf")


def test_a_float32_sum_that_overflows_names_accumulate_float64_which_averages_it(make_st_run, tmp_path: Path):
    states = make_st_run(STEPS, torch.float32)
    run, out = tmp_path / "run", tmp_path / "out"
    for s in STEPS:
        states[s]["layer.w"][7] = 3e38  # three of them overflow a float32 sum; their mean is float32's
        write_st(run / f"step{s}" / "model.safetensors", states[s])
    msg = error_line(lawa(run, out, "--accumulate", "float32"))
    assert "tensor 'layer.w' for step 3000" in msg and "overflows float32 to Inf" in msg, msg
    assert "pass --accumulate float64 or --allow-nonfinite" in msg
    assert_nothing_left(out)
    result = lawa(run, out)  # float64 sums: the default
    assert result.exit_code == 0, result.stderr
    assert load_file(out / "step3000" / "model.safetensors")["layer.w"][7].item() == torch.tensor(3e38).item()


def test_avg_names_the_file_not_a_step_it_does_not_have(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_st(a / "model.safetensors", {"w": torch.tensor([1.0, 2.0])})
    write_st(b / "model.safetensors", {"w": torch.tensor([float("nan"), 2.0])})
    msg = error_line(invoke("avg", a, b, "--out", tmp_path / "soup"))
    assert msg == f"tensor 'w' holds NaN or Inf in {b}; pass --allow-nonfinite to average it anyway"
    write_st(b / "model.safetensors", {"w": torch.tensor([1e6, 2.0])})
    msg = error_line(invoke("avg", a, b, "--out", tmp_path / "soup", "--dtype", "float16"))
    assert msg == "the average of tensor 'w' overflows float16 to Inf; pass a wider --dtype or --allow-nonfinite"


def test_a_failed_run_removes_every_folder_it_made_above_out(make_st_run, tmp_path: Path):
    states = make_st_run(STEPS)
    states[2000]["layer.w"][0] = float("nan")
    write_st(tmp_path / "run" / "step2000" / "model.safetensors", states[2000])
    error_line(lawa(tmp_path / "run", tmp_path / "new" / "x" / "y"))
    assert not (tmp_path / "new").exists()


def test_pythia_bin_buffers_are_copied_not_averaged(tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    states = write_pythia_run(run, STEPS, tokenizer=False)
    masked = [n for n in states[3000] if n.endswith("masked_bias")]
    assert masked and all(torch.isinf(states[3000][n]).all() for n in masked)
    result = lawa(run, out)  # no --allow-nonfinite
    assert result.exit_code == 0, result.stderr
    got = load_file(out / "step3000" / "model.safetensors")
    for n in masked:
        assert got[n].dtype == states[3000][n].dtype and torch.equal(got[n], states[3000][n]), n
    masks = [n for n, t in states[3000].items() if t.dtype == torch.bool]
    assert masks
    for n in masks:
        assert got[n].dtype == torch.bool and torch.equal(got[n], states[3000][n]), n
    w = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    ref = (sum(states[s][w].double() for s in STEPS) / 3).half()
    torch.testing.assert_close(got[w], ref, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- the output side


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """Mount a tmpfs with the given options; unmounted at teardown. Skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"cannot run mount: {e}")
        if r.returncode != 0:
            pytest.skip(f"mount -t tmpfs -o {options} is not permitted here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_read_only_output(make_st_run, tmp_path: Path, mount_tmpfs):
    make_st_run(STEPS)
    ro = mount_tmpfs("ro", "ro,size=1m")
    msg = error_line(lawa(tmp_path / "run", ro))
    assert str(ro) in msg and re.search(r"read-only|cannot write", msg, re.I), msg
    assert_nothing_left(ro)


@pytest.mark.parametrize(("steps", "numel"), [("3000:3000", 40_000), ("2000:3000", 10_000)])
def test_full_disk(make_st_run, tmp_path: Path, mount_tmpfs, steps: str, numel: int):
    """One output of 160 KB; or two of 40 KB, of which the first alone would fit in 64 KB."""
    make_st_run(STEPS, torch.float32, shapes={"big": (numel,), "small": (3,)})
    small = mount_tmpfs("small", "size=64k")
    msg = error_line(lawa(tmp_path / "run", small, steps=steps, k=2))
    assert re.search(r"no space left", msg, re.I), msg
    assert any(str(small / f"step{s}") in msg for s in (2000, 3000)), msg
    assert_nothing_left(small)


def test_existing_output_not_from_this_plan(make_st_run, tmp_path: Path):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    target = out / "step3000"
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("precious")
    msg = error_line(lawa(run, out))
    assert str(target) in msg and "--overwrite" in msg, msg
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]
    assert (target / "mine.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["step3000"]

    result = lawa(run, out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (target / "mine.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["step3000"]


def test_output_from_another_plan_is_refused(make_st_run, tmp_path: Path):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    assert lawa(run, out, k=2).exit_code == 0
    before = (out / "step3000" / "model.safetensors").read_bytes()
    msg = error_line(lawa(run, out, k=3))
    assert str(out / "step3000") in msg and "--overwrite" in msg, msg
    assert (out / "step3000" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["step3000"]


def test_rerun_skips_finished_outputs(make_st_run, tmp_path: Path):
    make_st_run(STEPS)
    run, out = tmp_path / "run", tmp_path / "out"
    first = lawa(run, out)
    assert first.exit_code == 0, first.stderr
    f = out / "step3000" / "model.safetensors"
    stat = f.stat()
    time.sleep(0.01)
    second = lawa(run, out)
    assert second.exit_code == 0, second.stderr
    assert "skipped" in second.stderr
    assert f.stat().st_mtime_ns == stat.st_mtime_ns and f.stat().st_ino == stat.st_ino
    assert sorted(p.name for p in out.iterdir()) == ["step3000"]


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_mid_run_leaves_nothing(make_st_run, tmp_path: Path):
    make_st_run(list(range(1000, 7001, 1000)), torch.float32, shapes={"a": (2_000_000,), "b": (1_000_000,)})
    run, out = tmp_path / "run", tmp_path / "out"
    cmd = [sys.executable, "-m", "ckptavg", "lawa", str(run), "--steps", "3000:7000", "--k", "3"]
    cmd += ["--out", str(out), "--chunk", "1024"]
    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DEBUG"}
    # As a terminal's Ctrl-C finds it: SIGINT at its default. A test run started in the background by a
    # non-interactive shell (`make test &`) has SIGINT ignored, the child would inherit that, and Python
    # (rightly) leaves an ignored SIGINT ignored.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(TMP_MARK in p.name for p in out.iterdir()):
                seen = True
                break
            time.sleep(0.005)
        assert seen, f"no temp folder appeared (exit {proc.poll()}); make the run bigger"
        time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted; make it bigger"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    err = "\n".join(ln for ln in stderr.strip().splitlines() if ln and not ln.startswith("ckptavg: warning: "))
    assert "\n" not in err and "interrupted" in err, repr(stderr)
    assert stdout == ""
    assert_nothing_left(out)
