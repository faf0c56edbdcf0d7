"""Held-out loss against training step, one line per method, in the manner of the paper's Figure 4.

Also the savings view of its Figure 6: the first step at which each method reaches the loss the original
run has at its last evaluated step. matplotlib is an optional extra (``pip install 'ckptavg[plot]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptavg.errors import MissingExtraError, ResultsFileError

STYLE = {"original": ("black", "o"), "lawa": ("tab:red", "s"), "ema": ("tab:blue", "^"), "swa": ("tab:green", "v")}


def load_rows(results: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(results.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResultsFileError(results, f"not a ckptavg results file ({e!r})") from e
    rows = [r for r in rows if r.get("step") is not None]
    if not rows:
        raise ResultsFileError(results, "no rows with a training step to plot")
    return rows


def curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    by: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append((int(r["step"]), float(r["loss"])))
    return {m: sorted(points) for m, points in sorted(by.items())}


def savings(lines: dict[str, list[tuple[int, float]]]) -> dict[str, int | None]:
    """First step at which each method's loss is at or below the original run's final loss."""
    original = lines.get("original")
    if not original:
        return {}
    target = original[-1][1]
    return {m: next((s for s, loss in pts if loss <= target), None) for m, pts in lines.items()}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingExtraError("plotting", "matplotlib", "plot") from e
    return plt


def _save(fig: Any, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp)
    tmp.replace(out)


def plot_interpolation(points: list[tuple[float, float]], out: Path, title: str) -> None:
    """Loss against alpha in alpha*A + (1-alpha)*B: a bump between the ends is a barrier (Figure 13)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    ax.plot([a for a, _ in points], [v for _, v in points], marker="o", color="tab:red")
    ax.set_xlabel("alpha  (alpha * A + (1 - alpha) * B)")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def plot(results: Path, out: Path, title: str | None = None) -> dict[str, int | None]:
    plt = _pyplot()
    lines = curves(load_rows(results))
    reached = savings(lines)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, pts in lines.items():
        color, marker = STYLE.get(method, ("tab:purple", "d"))
        label = method if method == "original" else method.upper()
        if reached.get(method) is not None and method != "original":
            label += f" (reaches final original loss at step {reached[method]})"
        ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, marker=marker, markersize=4, label=label)
    if "original" in lines:
        ax.axhline(lines["original"][-1][1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (mean token cross-entropy)")
    ax.set_title(title or f"held-out loss: {results.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return reached
