"""Loss curves and the savings view from a results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli
from ckptavg.plot import curves, savings

ROWS = (
    [
        {"method": "original", "step": s, "loss": loss, "model": f"o{s}"}
        for s, loss in [(1000, 3.0), (2000, 2.8), (3000, 2.7)]
    ]
    + [
        {"method": "lawa", "step": s, "loss": loss, "model": f"l{s}"}
        for s, loss in [(1000, 2.9), (2000, 2.65), (3000, 2.6)]
    ]
    + [{"method": "ema", "step": 3000, "loss": 2.75, "model": "e"}]
)


def test_savings_is_the_first_step_at_the_final_original_loss():
    assert savings(curves(ROWS)) == {"ema": None, "lawa": 2000, "original": 3000}


def test_plot_writes_an_image(tmp_path: Path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"slice": {}, "rows": ROWS}))
    out = tmp_path / "curves.png"
    r = CliRunner().invoke(cli, ["plot", str(results), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [str(out), "ema\t-", "lawa\t2000", "original\t3000"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"slice": {}, "rows": ROWS}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the extra looks like
    r = CliRunner().invoke(cli, ["plot", str(results), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 1 and "pip install 'ckptavg[plot]'" in r.stderr
