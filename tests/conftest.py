from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import save_file

# huggingface_hub reads these when imported: set before any test imports it (shared/notes/hub-protocol.md).
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ.pop("HF_TOKEN", None)

ROOT = Path(__file__).resolve().parents[1]
_ROOT_BEFORE: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _ROOT_BEFORE.update(p.name for p in ROOT.iterdir())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves the checkout as it found it: a test that writes into the repository root (a
    slurm-*.out log, an output folder made relative to the wrong directory) fails the run."""
    caches = {".pytest_cache", ".hypothesis"}  # pytest's and hypothesis' own databases (git-ignored)
    left = sorted(p.name for p in ROOT.iterdir() if p.name not in _ROOT_BEFORE | caches)
    if left:
        print(f"\ntests left files in the repository root: {', '.join(left)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SHAPES = {"embed.weight": (37, 41), "layer.w": (5000,), "layer.b": (3,), "head.weight": (41, 37), "scalar": ()}


def random_state(step: int, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        n: (torch.randn(s, generator=g, dtype=torch.float64) * (1 + step / 1000)).to(dtype) for n, s in shapes.items()
    }


@pytest.fixture
def make_st_run(tmp_path: Path) -> Callable[..., dict[int, dict[str, torch.Tensor]]]:
    """A run of step folders holding model.safetensors of random tensors (sizes straddle chunk borders)."""

    def make(
        steps: list[int],
        dtype: torch.dtype = torch.float16,
        root: Path | None = None,
        shapes: dict[str, tuple[int, ...]] = SHAPES,
    ) -> dict[int, dict[str, torch.Tensor]]:
        root = root or tmp_path / "run"
        out = {}
        for s in steps:
            (root / f"step{s}").mkdir(parents=True, exist_ok=True)
            state = random_state(s, dtype, shapes)
            save_file(state, root / f"step{s}" / "model.safetensors", metadata={"format": "pt"})
            (root / f"step{s}" / "config.json").write_text(json.dumps({"model_type": "toy", "step": s}) + "\n")
            out[s] = state
        return out

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- what a failed command must look like


def error_line(result: Result, code: int = 1) -> str:
    """The one reason on stderr (without ``Error: ``), after checking the exit code and that nothing else went
    wrong: no traceback, nothing on stdout; exit 1 prints only that line, exit 2 adds Click's usage lines."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # Warnings said before the failure (an output that would have no tokenizer) are not the reason.
    err = "\n".join(ln for ln in result.stderr.strip().splitlines() if not ln.startswith("ckptavg: warning: "))
    if code == 1:
        assert "\n" not in err and err.startswith("Error: "), err
        return err.removeprefix("Error: ")
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("Error:").strip()


def tree_digest(root: Path) -> str:
    """Every name, symlink target and byte under ``root``: equal before and after = untouched."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_symlink():
            h.update(b"->" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def weight_bytes(folder: Path) -> dict[str, bytes]:
    """Every weight file under ``folder`` by its relative path: what two runs must make alike (ckptavg.json
    records when its run began, so it differs)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*.safetensors"))}
