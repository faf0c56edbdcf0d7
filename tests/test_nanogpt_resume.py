"""An averaged nanoGPT ``ckpt.pt`` resumes training in nanoGPT's train.py (``--format ckpt``, ``--optimizer``).

The run is real: a few AdamW steps of nanoGPT's GPT (reproduced in nanogpt_reference.py), checkpoints
kept as train.py saves them (one from a torch.compile'd model, its keys prefixed ``_orig_mod.``). The
output goes through train.py's resume steps and one more training step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import error_line
from nanogpt_reference import GPT, GPTConfig, checkpoint, load_for_sampling, resume, train_step

from ckptavg import api
from ckptavg.cli import cli
from ckptavg.errors import OptionError
from ckptavg.steps import StepRange

MODEL_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8, "bias": True, "vocab_size": 32, "dropout": 0.0}
KEPT = (4, 6, 8)  # the iterations whose ckpt.pt the user kept a copy of (eval_interval 2)
COMPILED = 6  # this one was saved by a torch.compile'd model
CONFIG = {"learning_rate": 1e-2, "weight_decay": 0.1, "always_save_checkpoint": True, "dataset": "random"}


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(MODEL_ARGS["vocab_size"], (4, MODEL_ARGS["block_size"] + 1), generator=g)  # type: ignore[call-overload]
    return data[:, :-1], data[:, 1:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.py's loop: at an eval iteration, the val loss becomes best_val_loss (always_save_checkpoint)
    and the checkpoint is saved before that iteration's step, so ckpt_{N}.pt has had N optimizer steps."""
    root = tmp_path_factory.mktemp("nanogpt") / "run"
    root.mkdir()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))  # type: ignore[arg-type]
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    for iter_num in range(max(KEPT) + 1):
        if iter_num in KEPT:
            with torch.no_grad():
                val = model(*batch(torch.Generator().manual_seed(99))).detach()
            ckpt = checkpoint(model, optimizer, iter_num, val, CONFIG, compiled=iter_num == COMPILED)
            torch.save(ckpt, root / f"ckpt_{iter_num}.pt")
        train_step(model, optimizer, *batch(g))
    return root


def member(run: Path, step: int) -> dict:  # type: ignore[type-arg]
    return torch.load(run / f"ckpt_{step}.pt", weights_only=True)


def model_of(ckpt: dict) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}


def lawa(run: Path, out: Path, *extra: object) -> Result:
    # float64 accumulation: the mean rounded once to fp32, so it equals the float64 reference exactly
    args = ["lawa", run, "--steps", "8:8", "--k", "3", "--out", out, "--format", "ckpt", "--accumulate", "float64"]
    return CliRunner().invoke(cli, [str(a) for a in [*args, *extra]])


def assert_optimizer_states_equal(got: dict, want: dict) -> None:  # type: ignore[type-arg]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for i, s in want["state"].items():
        assert got["state"][i].keys() == s.keys()
        for k, t in s.items():
            assert torch.equal(got["state"][i][k], t), (i, k)


def test_lawa_output_resumes_in_train_py(run: Path, tmp_path: Path):
    result = lawa(run, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out" / "step8"
    members = [member(run, s) for s in KEPT]
    newest = members[-1]

    resumed = resume(out, learning_rate=1e-2)

    weights = resumed.model.state_dict()
    for name, got in weights.items():
        mean = torch.stack([model_of(m)[name].double() for m in members]).mean(0)
        assert torch.equal(got, mean.float()), name
    assert resumed.model.lm_head.weight is resumed.model.transformer["wte"].weight
    assert resumed.iter_num == 8  # the window's end
    assert torch.equal(resumed.best_val_loss, newest["best_val_loss"])  # type: ignore[arg-type]
    assert_optimizer_states_equal(resumed.optimizer.state_dict(), newest["optimizer"])
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.1, 0.0]  # configure_optimizers' groups

    before = {n: t.clone() for n, t in weights.items()}
    loss = train_step(resumed.model, resumed.optimizer, *batch(torch.Generator().manual_seed(8)))
    assert torch.isfinite(torch.tensor(loss))
    steps = {float(s["step"]) for s in resumed.optimizer.state.values()}
    assert steps == {9.0}  # the newest member's 8 steps, and this one
    after = resumed.model.state_dict()
    assert all(not torch.equal(after[n], before[n]) for n in after if n.endswith("c_attn.weight"))

    raw = torch.load(out / "ckpt.pt", weights_only=True)
    assert list(raw) == ["model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"]  # train.py's
    assert raw["model_args"] == MODEL_ARGS and raw["config"] == CONFIG


def test_optimizer_none_leaves_it_out_and_train_py_stops_at_it(run: Path, tmp_path: Path):
    result = lawa(run, tmp_path / "out", "--optimizer", "none")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out" / "step8"
    raw = torch.load(out / "ckpt.pt", weights_only=True)
    assert "optimizer" not in raw
    assert torch.equal(raw["best_val_loss"], member(run, 8)["best_val_loss"])
    with pytest.raises(KeyError, match="optimizer"):
        resume(out)
    model = load_for_sampling(out)  # sample.py is unaffected
    assert torch.equal(model.lm_head.weight, raw["model"]["transformer.wte.weight"])


def test_a_newest_member_without_optimizer_is_refused_naming_it(run: Path, tmp_path: Path):
    """ckptavg's own --optimizer none output as the newest member of another average: the default
    --optimizer newest has nothing to take, and says how to go on; --optimizer none goes on."""
    assert lawa(run, tmp_path / "first", "--optimizer", "none").exit_code == 0
    again = tmp_path / "again"
    again.mkdir()
    for s in (4, 6):
        shutil.copy(run / f"ckpt_{s}.pt", again)
    shutil.copy(tmp_path / "first" / "step8" / "ckpt.pt", again / "ckpt_8.pt")

    msg = error_line(lawa(again, tmp_path / "out"))
    assert msg == (
        f"{again / 'ckpt_8.pt'}: has no 'optimizer', which nanoGPT's train.py --init_from=resume reads; "
        "pass --optimizer none to write a ckpt.pt without the optimizer state (sample.py needs none)"
    )
    assert not (tmp_path / "out").exists()

    assert lawa(again, tmp_path / "out", "--optimizer", "none").exit_code == 0
    assert "optimizer" not in torch.load(tmp_path / "out" / "step8" / "ckpt.pt", weights_only=True)


def test_an_average_with_its_optimizer_is_a_member_again(run: Path, tmp_path: Path):
    """The default output carries everything train.py saves, so it averages again like any checkpoint."""
    assert lawa(run, tmp_path / "first").exit_code == 0
    again = tmp_path / "again"
    again.mkdir()
    for s in (4, 6):
        shutil.copy(run / f"ckpt_{s}.pt", again)
    shutil.copy(tmp_path / "first" / "step8" / "ckpt.pt", again / "ckpt_8.pt")
    assert lawa(again, tmp_path / "out").exit_code == 0
    resumed = resume(tmp_path / "out" / "step8")
    assert_optimizer_states_equal(resumed.optimizer.state_dict(), member(run, 8)["optimizer"])


@pytest.mark.parametrize(
    ("entry", "value", "detail"),
    [
        ("best_val_loss", "n/a", "its 'best_val_loss' is 'n/a', not a loss (a number)"),
        ("best_val_loss", torch.zeros(3), "its 'best_val_loss' is a tensor of shape (3,), not a loss (a number)"),
        (
            "optimizer",
            [1, 2],
            "its 'optimizer' is not a torch optimizer state dict ('state' and 'param_groups'); pass "
            "--optimizer none to write a ckpt.pt without the optimizer state (sample.py needs none)",
        ),
        (
            "best_val_loss",
            None,  # no such entry
            "has no 'best_val_loss', which nanoGPT's train.py --init_from=resume reads; pass --optimizer none "
            "to write a ckpt.pt without the optimizer state (sample.py needs none)",
        ),
    ],
)
def test_a_newest_member_with_a_bad_entry_is_refused_naming_it(
    run: Path, tmp_path: Path, entry: str, value: object, detail: str
):
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    ckpt = member(run, 8)
    if value is None:
        del ckpt[entry]
    else:
        ckpt[entry] = value
    torch.save(ckpt, bad / "ckpt_8.pt")
    assert error_line(lawa(bad, tmp_path / "out")) == f"{bad / 'ckpt_8.pt'}: {detail}"
    assert not (tmp_path / "out").exists()


def test_optimizer_without_format_ckpt_is_a_usage_error(run: Path, tmp_path: Path):
    args = ["lawa", run, "--steps", "8:8", "--k", "3", "--out", tmp_path / "out", "--optimizer", "none"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert error_line(result, 2) == (
        "--optimizer: applies to --format ckpt only (a safetensors output holds the weights alone)"
    )
    assert not (tmp_path / "out").exists()


def test_another_optimizer_choice_is_another_plan(run: Path, tmp_path: Path):
    """An output made with --optimizer none is not skipped as complete by a run that wants the optimizer."""
    assert lawa(run, tmp_path / "out", "--optimizer", "none").exit_code == 0
    again = lawa(run, tmp_path / "out", "--optimizer", "none")
    assert again.exit_code == 0 and "skipped" in again.stderr
    msg = error_line(lawa(run, tmp_path / "out"))
    assert msg == f"{tmp_path / 'out' / 'step8'}: made with other options (--format ckpt --optimizer none, " + (
        "now --format ckpt --optimizer newest); pass --overwrite to replace it"
    )
    assert lawa(run, tmp_path / "out", "--overwrite").exit_code == 0
    assert "optimizer" in torch.load(tmp_path / "out" / "step8" / "ckpt.pt", weights_only=True)


def test_the_library_refuses_an_unknown_optimizer_choice(run: Path, tmp_path: Path):
    plan = api.plan_lawa(str(run), StepRange(8, 8), k=3, out=tmp_path / "out")
    with pytest.raises(OptionError, match=r"--optimizer: must be one of newest, none, got 'latest'"):
        api.average(plan, api.Options(write_ckpt=True, optimizer="latest"))
    assert not (tmp_path / "out").exists()
