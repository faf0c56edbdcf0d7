"""Held-out loss against training step, one line per method, in the manner of the paper's Figure 4.

Also the savings view of its Figure 6: the first step at which each method reaches the loss the original
run has at its last evaluated step. matplotlib is an optional extra (``pip install 'ckptavg[plot]'``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from ckptavg.errors import MissingExtraError, OutputError, ResultsFileError
from ckptavg.outputs import check_file_output
from ckptavg.results import PLOT_KEYS, read_results

STYLE = {"original": ("black", "o"), "lawa": ("tab:red", "s"), "ema": ("tab:blue", "^"), "swa": ("tab:green", "v")}


# What matplotlib writes without anything more than its own dependencies (pgf needs LaTeX).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def load_rows(results: Path) -> list[dict[str, Any]]:
    """The rows with a training step; every row must be what eval writes (method, step, finite loss)."""
    _, rows = read_results(results, PLOT_KEYS)
    rows = [r for r in rows if r["step"] is not None]
    if not rows:
        raise ResultsFileError(results, "no rows with a training step to plot (interpolate's rows have none)")
    return rows


def check_target(out: Path, option: str) -> None:
    """Before any work: the image ``option`` names has a suffix matplotlib writes, and a folder we may
    write in; and matplotlib is installed. OutputError (or MissingExtraError) naming the option."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        what = f"a {out.suffix} file" if out.suffix else "a name without an image suffix"
        raise OutputError(f"{option} {out}: {what} is not an image format matplotlib writes; use .png, .pdf or .svg")
    check_file_output(out, option)
    _pyplot()  # an old image there is replaced by a rename, which needs only the folder


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
    """Whole or not at all: a temporary file beside ``out`` (its suffix picks the format), then a rename."""
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp)
        tmp.replace(out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{out}: cannot write the image ({e.strerror or e})") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def plot_interpolation(points: list[tuple[float, float]], out: Path, title: str) -> None:
    """Loss against alpha in alpha*A + (1-alpha)*B: a bump between the ends is a barrier (Figure 13).

    Callers check ``out`` with :func:`check_target` before evaluating anything."""
    if not points or not all(math.isfinite(v) for _, v in points):
        raise OutputError(f"{out}: no finite losses to plot")
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


def plot(results: Path, out: Path, title: str | None = None, option: str = "-o") -> dict[str, int | None]:
    """Draw ``results`` into ``out``; returns the savings view. ``option`` is how messages name ``out``."""
    check_target(out, option)
    lines = curves(load_rows(results))
    plt = _pyplot()
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
