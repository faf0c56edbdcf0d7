"""Held-out loss against training step, one line per method, in the manner of the paper's Figure 4.

A results file with downstream scores (``eval --tasks``) gets one panel per task beside the loss: the
task's accuracy (or, for a perplexity task, its bits per byte) against step, one line per method.

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
from ckptavg.results import PLOT_KEYS, loss_rows, read_results, task_rows

STYLE = {"original": ("black", "o"), "lawa": ("tab:red", "s"), "ema": ("tab:blue", "^"), "swa": ("tab:green", "v")}


# What matplotlib writes without anything more than its own dependencies (pgf needs LaTeX).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


# The metric a task's panel shows: the first of these it has (the paper reports acc, acc_norm for some).
PANEL_METRICS = ("acc", "acc_norm", "bits_per_byte", "word_perplexity", "byte_perplexity")


def load_rows(results: Path) -> list[dict[str, Any]]:
    """The rows with a training step; every row must be what eval writes (method, step, finite loss;
    or method, step, task and its metrics)."""
    _, rows = read_results(results, PLOT_KEYS)
    rows = [r for r in rows if r["step"] is not None]
    if not rows:
        raise ResultsFileError(results, "no rows with a training step to plot (interpolate's rows have none)")
    return rows


def task_curves(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """(task, metric) -> method -> (step, value) points, one panel per task; the metric is the first of
    PANEL_METRICS the task has (or its first metric), and a value beyond float range is left out."""
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        names = [m for r in mine for m in r["metrics"]]
        metric = next((m for m in PANEL_METRICS if m in names), names[0])
        by: dict[str, list[tuple[int, float]]] = {}
        for r in mine:
            v = r["metrics"].get(metric)
            if v is not None:
                by.setdefault(r["method"], []).append((int(r["step"]), float(v)))
        panels[(task, metric)] = {m: sorted(points) for m, points in sorted(by.items())}
    return panels


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


# Titles and labels are names from files (task names, methods, folder and file names): drawn as written,
# never parsed as TeX, where a '$\x$' in a name would stop the plot with a mathtext error.
_PLAIN_TEXT = {"text.parse_math": False}


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
    with plt.rc_context(_PLAIN_TEXT):
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
    rows = load_rows(results)
    lines = curves(loss_rows(rows))
    panels = task_curves(task_rows(rows))
    plt = _pyplot()
    reached = savings(lines)
    with plt.rc_context(_PLAIN_TEXT):
        _draw(plt, results, out, title, lines, panels, reached)
    return reached


def _draw(
    plt: Any,
    results: Path,
    out: Path,
    title: str | None,
    lines: dict[str, list[tuple[int, float]]],
    panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]],
    reached: dict[str, int | None],
) -> None:
    if not panels:  # a loss-only file: the one panel it always had
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        _loss_panel(ax, lines, reached)
        ax.set_title(title or f"held-out loss: {results.name}")
    else:
        n = len(panels) + bool(lines)
        cols = min(n, 3)
        rows_ = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.8 * rows_), dpi=120, squeeze=False)
        flat = list(axes.flat)
        if lines:
            _loss_panel(flat.pop(0), lines, reached)
        for ax, ((task, metric), by_method) in zip(flat, panels.items(), strict=False):
            _task_panel(ax, task, metric, by_method)
        for ax in flat[len(panels) :]:
            ax.set_visible(False)
        what = "held-out loss and downstream tasks" if lines else "downstream tasks"
        fig.suptitle(title or f"{what}: {results.name}")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def _line(ax: Any, method: str, pts: list[tuple[int, float]], label: str) -> None:
    color, marker = STYLE.get(method, ("tab:purple", "d"))
    ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, marker=marker, markersize=4, label=label)


def _loss_panel(ax: Any, lines: dict[str, list[tuple[int, float]]], reached: dict[str, int | None]) -> None:
    for method, pts in lines.items():
        label = method if method == "original" else method.upper()
        if reached.get(method) is not None and method != "original":
            label += f" (reaches final original loss at step {reached[method]})"
        _line(ax, method, pts, label)
    if "original" in lines:
        ax.axhline(lines["original"][-1][1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (mean token cross-entropy)")
    ax.set_title("held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _task_panel(ax: Any, task: str, metric: str, by_method: dict[str, list[tuple[int, float]]]) -> None:
    for method, pts in by_method.items():
        _line(ax, method, pts, method if method == "original" else method.upper())
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (zero-shot)")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
