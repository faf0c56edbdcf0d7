"""The library's entry points: plan an averaging (pure, headers only), then carry it out.

    from ckptavg import api
    plan = api.plan_lawa("runs/pythia-70m", StepRange(21000, 141000), k=5, interval=3000, out=Path("lawa"))
    api.average(plan)

A plan names every output, its member steps and their weights; planning opens only checkpoint headers and
checks that every member agrees on tensor names, shapes and dtypes, so bad input fails before any work.
"""

from __future__ import annotations

import hashlib
import json
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckptavg import __version__, engine, runner, schedule
from ckptavg.errors import CkptavgError, InvalidArgumentError, MismatchError, OptionError, OutputError
from ckptavg.outputs import check_outputs, check_writable
from ckptavg.progress import Reporter, one_line
from ckptavg.sources import Checkpoint, Source, open_checkpoint, open_run
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.steps import StepRange
from ckptavg.windows import (
    Window,
    checkpoint_spacing,
    ema_windows,
    explicit_window,
    lawa_windows,
    swa_windows,
)
from ckptavg.writers.safetensors_folder import temp_paths

DTYPES = runner.DTYPES


@dataclass
class Plan:
    method: str  # lawa | ema | swa | avg
    params: dict[str, Any]
    source: str
    windows: list[Window]
    members: dict[int, Checkpoint]  # member id (step; position for avg) -> checkpoint
    outputs: list[Path]
    by_position: bool = False  # avg: member ids are positions in the command line, not steps
    # Facts of the whole plan that decide the arithmetic, kept when a task takes its share, so that every
    # share, resumed run and Hub part computes each window the same way (see engine.choose_reducer).
    overlapping: bool = False  # some checkpoint is a member of two windows
    plan_members: int = 0  # checkpoints in the whole plan
    origin: dict[str, Any] = field(default_factory=dict)  # Source.origin of a run's plan (provenance only)

    def __post_init__(self) -> None:
        if not self.plan_members:
            self.overlapping = engine.windows_overlap(self.windows)
            self.plan_members = len({m for w in self.windows for m in w.steps})

    def bytes_to_read(self) -> int:
        ids = {m for w in self.windows for m in w.steps}
        return sum(self.members[m].nbytes for m in ids)


@dataclass
class Options:
    accumulate: str = "float32"
    dtype: str | None = None  # output dtype of averaged tensors; None keeps the input's
    device: str = "cpu"
    overwrite: bool = False
    max_shard_size: int = 5 * 10**9
    allow_nonfinite: bool = False
    write_ckpt: bool = False  # nanoGPT sources: also write ckpt.pt
    optimizer: str = "newest"  # with write_ckpt: the newest member's optimizer state in ckpt.pt, or "none"
    chunk: int | None = None  # elements per chunk (tests use small ones); default: engine.CHUNK_BYTES
    disk_budget: int | None = None  # Hub runs: bytes of downloads held at once; default: one window's files


# ---------------------------------------------------------------- planning


NAME_BY = ("step", "revision")  # how a run's outputs are named: OUT/step{N}, or as the run names its newest member


def _plan_from_run(
    run: Source, method: str, params: dict[str, Any], windows: list[Window], out: Path, name_by: str = "step"
) -> Plan:
    if name_by not in NAME_BY:
        raise InvalidArgumentError(f"name_by must be one of {', '.join(NAME_BY)}, got {name_by!r}")
    members = run.checkpoints(s for w in windows for s in w.steps)
    if name_by == "step":
        outputs = [out / f"step{w.end}" for w in windows]
    else:
        outputs = [out / name for name in _revision_names(windows, members)]
    plan = Plan(method, params, run.label, windows, members, outputs, origin=dict(run.origin))
    check_inputs_untouched(plan, run.discovered_from)
    check_members(plan)
    return plan


def _revision_names(windows: list[Window], members: dict[int, Checkpoint]) -> list[str]:
    """Each window's output name under ``--name-by revision``: what the run calls its newest member (a Hub
    revision, a folder's name, a file's stem). A name that cannot be one folder's name, or that two outputs
    would share (nanoGPT runs keep ckpt.pt in a folder per step), is refused before any weight is read."""
    names: dict[str, int] = {}
    for w in windows:
        c = members[w.steps[-1]]
        if c.name in ("", ".", "..") or "/" in c.name or not c.name.isprintable():
            raise OutputError(
                f"--name-by revision: {one_line(c.label)} is called {c.name!r}, which cannot name an output "
                "folder; use --name-by step"
            )
        if c.name in names:
            raise OutputError(
                f"--name-by revision: the outputs at steps {names[c.name]} and {w.end} would both be named "
                f"{c.name!r}; use --name-by step"
            )
        names[c.name] = w.end
    return list(names)


def _given(value: int | None, name: str) -> int | None:
    """A stride the caller gave (None: the default): a 0 is refused, not silently taken as the default."""
    if value is not None and value < 1:
        raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
    return value


def _run(source: str | Source, allow_legacy: bool) -> Source:
    return open_run(source, allow_legacy=allow_legacy) if isinstance(source, str) else source


def plan_lawa(
    source: str | Source,
    steps: StepRange,
    *,
    k: int,
    out: Path,
    interval: int | None = None,
    k_stepsize: int | None = None,
    allow_legacy: bool = False,
    name_by: str = "step",
) -> Plan:
    run = _run(source, allow_legacy)
    spacing = checkpoint_spacing(run.steps())
    nu = _given(k_stepsize, "k_stepsize") or spacing
    every = _given(interval, "interval") or steps.every or spacing
    windows = lawa_windows(run.steps(), steps, k=k, interval=every, nu=nu, source=run.label)
    params = {"k": k, "k_stepsize": nu, "interval": every, "steps": str(steps)}
    return _plan_from_run(run, "lawa", params, windows, out, name_by)


def plan_ema(
    source: str | Source,
    steps: StepRange,
    *,
    out: Path,
    decay: float = 0.9,
    interval: int | None = None,
    every: int | None = None,
    allow_legacy: bool = False,
    name_by: str = "step",
) -> Plan:
    run = _run(source, allow_legacy)
    ends = _given(interval, "interval") or steps.every or checkpoint_spacing(run.steps())
    windows = ema_windows(run.steps(), steps, decay=decay, interval=ends, every=every, source=run.label)
    params = {"decay": decay, "interval": ends, "every": every, "steps": str(steps)}
    return _plan_from_run(run, "ema", params, windows, out, name_by)


def plan_swa(
    source: str | Source,
    steps: StepRange,
    *,
    out: Path,
    start: int | None = None,
    every: int | None = None,
    interval: int | None = None,
    allow_legacy: bool = False,
    name_by: str = "step",
) -> Plan:
    run = _run(source, allow_legacy)
    first = steps.start if start is None else start
    stride = _given(every, "every") or checkpoint_spacing(run.steps())
    ends = _given(interval, "interval") or steps.every or stride
    windows = swa_windows(run.steps(), steps, start=first, every=stride, interval=ends, source=run.label)
    params = {"start": first, "every": stride, "interval": ends, "steps": str(steps)}
    return _plan_from_run(run, "swa", params, windows, out, name_by)


def plan_avg(
    paths: list[str],
    *,
    out: Path,
    weights: list[float] | None = None,
    allow_legacy: bool = False,
    run: Source | None = None,
) -> Plan:
    """Explicit checkpoints: folders or nanoGPT files, or with ``run`` (a Hub run) its step numbers."""
    window = explicit_window(len(paths), weights)
    if run is None:
        members = {i: open_checkpoint(Path(p), i, allow_legacy=allow_legacy) for i, p in enumerate(paths)}
        source = ", ".join(paths)
    else:
        bad = next((p for p in paths if not p.isdigit()), None)
        if bad is not None:
            raise InvalidArgumentError(f"with --repo, give step numbers (e.g. 143000), not {bad!r}")
        by_step = run.checkpoints(int(p) for p in paths)
        members = {i: by_step[int(p)] for i, p in enumerate(paths)}
        source = f"{run.label} steps {', '.join(paths)}"
    params = {"weights": list(window.weights)}
    origin = {"paths": list(paths)} if run is None else dict(run.origin)
    plan = Plan("avg", params, source, [window], members, [out], by_position=True, origin=origin)
    check_inputs_untouched(plan)
    check_members(plan)
    return plan


def _who(plan: Plan, member: int) -> str:
    c = plan.members[member]
    return c.label if plan.by_position else f"step {c.step} ({c.label})"


def check_members(plan: Plan, only: set[int] | None = None) -> None:
    """Every member must hold the same tensors with the same shapes and dtypes as the newest one."""
    ids = sorted(only if only is not None else plan.members)
    ref_id = ids[-1]
    ref = plan.members[ref_id]
    for m in ids[:-1]:
        c = plan.members[m]
        if c.entries.keys() != ref.entries.keys():
            extra = sorted(c.entries.keys() - ref.entries.keys())
            if extra:
                raise MismatchError(f"tensor '{extra[0]}' is in {_who(plan, m)} but not in {_who(plan, ref_id)}")
            lack = sorted(ref.entries.keys() - c.entries.keys())
            raise MismatchError(f"tensor '{lack[0]}' is in {_who(plan, ref_id)} but not in {_who(plan, m)}")
        for name, e in c.entries.items():
            r = ref.entries[name].info
            if e.info.shape != r.shape:
                raise MismatchError(
                    f"tensor '{name}' has shape {list(e.info.shape)} in {_who(plan, m)} "
                    f"but {list(r.shape)} in {_who(plan, ref_id)}"
                )
            if e.info.dtype != r.dtype:
                raise MismatchError(
                    f"tensor '{name}' is {str(e.info.dtype).removeprefix('torch.')} in {_who(plan, m)} "
                    f"but {str(r.dtype).removeprefix('torch.')} in {_who(plan, ref_id)}"
                )
        if c.aliases != ref.aliases:
            raise MismatchError(f"tied weights differ between {_who(plan, m)} and {_who(plan, ref_id)}")


def describe(plan: Plan) -> list[dict[str, Any]]:
    """One record per output: what ``plan`` and ``--dry-run`` print, and what ``--json`` emits."""
    rows = []
    for w, out in zip(plan.windows, plan.outputs, strict=True):
        read = sum(plan.members[m].nbytes for m in w.steps)
        members = [plan.members[m].label for m in w.steps] if plan.by_position else list(w.steps)
        rows.append(
            {
                "method": plan.method,
                "step": None if plan.by_position else w.end,
                "members": members,
                "weights": [round(x, 12) for x in w.weights],
                "out": str(out),
                "bytes_to_read": read,
            }
        )
    return rows


def downloads(plan: Plan, budget: int | None = None) -> dict[str, int] | None:
    """For a Hub plan: how many weight files a run downloads and their bytes in all (each once, unless
    the budget forces a file out between two uses), the budget, and the units the work is cut into."""
    if not any(c.remote for c in plan.members.values()):
        return None
    ref = plan.members[max(m for w in plan.windows for m in w.steps)]
    units, limit = schedule.plan_units(plan.windows, plan.members, schedule.tensor_groups(ref), budget)
    fetched = [k for i, u in enumerate(units) for k in u.files if i == 0 or k not in units[i - 1].files]
    return {
        "files": len(fetched),
        "bytes": schedule.files_bytes(plan.members, fetched),
        "budget": limit,
        "units": len(units),
    }


def _subplan(plan: Plan, lo: int, hi: int) -> Plan:
    windows, outputs = plan.windows[lo:hi], plan.outputs[lo:hi]
    members = {m: plan.members[m] for m in sorted({m for w in windows for m in w.steps})}
    return replace(plan, windows=windows, members=members, outputs=outputs)


def task_share(plan: Plan, task_index: int, num_tasks: int) -> Plan:
    """The outputs task ``task_index`` of ``num_tasks`` does: a contiguous range of the plan's order, so
    that overlapping windows stay together and each task still reads every input it needs once."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise InvalidArgumentError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return _subplan(plan, *task_bounds(len(plan.windows), task_index, num_tasks))


def task_bounds(n_outputs: int, task_index: int, num_tasks: int) -> tuple[int, int]:
    return task_index * n_outputs // num_tasks, (task_index + 1) * n_outputs // num_tasks


def output_states(plan: Plan, opts: Options | None = None) -> list[str]:
    """Per output: ``complete`` (made by this very plan), ``partial`` (a killed run's temporary folder is
    there), ``other`` (something else has the name) or ``missing``."""
    opts = opts or Options()
    states = []
    for j, out in enumerate(plan.outputs):
        if out.exists() or out.is_symlink():  # a dangling symlink has the name too
            same = _finished_plan_id(out) == provenance(plan, j, opts)["plan_id"]
            states.append("complete" if same else "other")
        elif temp_paths(out):
            states.append("partial")
        else:
            states.append("missing")
    return states


def array_spec(tasks: list[int]) -> str:
    """SLURM's ``--array`` syntax for task ids: 0-3,7,9-10."""
    runs: list[list[int]] = []
    for t in sorted(set(tasks)):
        if runs and runs[-1][1] == t - 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---------------------------------------------------------------- provenance


def provenance(plan: Plan, j: int, opts: Options) -> dict[str, Any]:
    w = plan.windows[j]
    members = []
    for m, weight in zip(w.steps, w.weights, strict=True):
        c = plan.members[m]
        files: list[dict[str, Any]] = []
        if "hub" in c.meta:  # the revision's commit pins every byte; local cache paths say nothing
            files.append(dict(c.meta["hub"]))  # type: ignore[call-overload]
        for f in [] if files else c.files:
            st = f.stat()
            files.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        members.append({"step": c.step, "weight": weight, "path": c.label, "files": files})
    record: dict[str, Any] = {
        "tool": "ckptavg",
        "version": __version__,
        "method": plan.method,
        "params": plan.params,
        "source": plan.source,
        "step": None if plan.by_position else w.end,
        "members": members,
        "accumulate": opts.accumulate,
        "dtype": opts.dtype,
    }
    newest = plan.members[w.steps[-1]]
    if "model_args" in newest.meta:  # nanoGPT: what `ckptavg convert` needs to rebuild the model
        record["model_args"] = newest.meta["model_args"]
    if opts.write_ckpt:  # part of the output: a run with other --format/--optimizer is another plan
        record["ckpt"] = {"optimizer": opts.optimizer}
    record["plan_id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


def _finished_plan_id(path: Path) -> str | None:
    try:
        return json.loads((path / PROVENANCE_FILE).read_text()).get("plan_id")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- execution


def decide_outputs(plan: Plan, opts: Options, states: Sequence[str]) -> list[int]:
    """Which outputs a run makes, from their ``output_states``: the complete ones are skipped (unless
    ``overwrite``), and a folder that another plan made is refused (unless ``overwrite``). Pure."""
    todo = []
    for j, state in enumerate(states):
        if state == "complete" and not opts.overwrite:
            continue
        if state == "other" and not opts.overwrite:
            raise OutputError(
                f"{plan.outputs[j]}: already exists and was not made by this plan; pass --overwrite to replace it"
            )
        todo.append(j)
    return todo


def check_inputs_untouched(plan: Plan, run_source: str | None = None) -> None:
    """No output may replace, contain or lie inside one of the plan's own local inputs, whatever the
    options; nor, given ``run_source`` (a local run's folder or glob), lie where that run finds checkpoints
    (outputs.check_outputs says exactly where)."""
    inputs = [f for c in plan.members.values() for f in ([c.path] if c.path else []) + c.files]
    check_outputs(plan.outputs, run_source=run_source, inputs=inputs)


def average(plan: Plan, opts: Options | None = None, reporter: Reporter | None = None) -> list[Path]:
    """Produce every output of ``plan``; outputs already made by the same plan are skipped.

    ``decide_outputs`` says which outputs to make; ``runner.execute`` makes them (see runner.py for
    what a failed run keeps).
    """
    opts = opts or Options()
    reporter = reporter or Reporter(quiet=True)
    if opts.accumulate not in ("float32", "float64"):
        raise InvalidArgumentError(f"accumulate must be float32 or float64, got {opts.accumulate}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {opts.dtype}")
    if opts.write_ckpt:
        other = next((c for c in plan.members.values() if c.format != "nanogpt"), None)
        if other is not None:
            raise OptionError(
                "--format ckpt",
                f"writes nanoGPT's ckpt.pt, from nanoGPT sources only ({other.label} is {other.format})",
            )
    device = _device(opts.device)
    _raise_open_file_limit()
    check_inputs_untouched(plan)
    states = output_states(plan, opts)
    todo = decide_outputs(plan, opts, states)
    check_writable([plan.outputs[j] for j in todo])
    for j, state in enumerate(states):
        if state == "complete" and j not in todo:
            reporter.log(f"{plan.outputs[j]} is complete (same plan); skipped")
    if todo:
        records = [provenance(plan, j, opts) for j in range(len(plan.windows))]
        runner.execute(plan, todo, records, opts, device, reporter)
    return list(plan.outputs)


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise InvalidArgumentError(f"--device {name}: {e}") from e


def _raise_open_file_limit() -> None:
    """A 41-window 12B trajectory holds a few hundred files open at once (input shards, output shards,
    locks); the usual soft limit of 1024 is closer than it looks, and the hard limit is ours to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------- listing


def list_checkpoints(source: str | Source, *, allow_legacy: bool = False) -> list[dict[str, Any]]:
    """Steps of a run with their format, size (on disk, or to download), where they are, and what the run calls
    them (``name``: a Hub revision, a folder's name, a nanoGPT file's stem; what ``--name-by revision`` uses)."""
    run = _run(source, allow_legacy)
    rows: list[dict[str, Any]] = []
    for s in run.steps():
        try:
            seen = run.listing(s)
        except CkptavgError as e:
            rows.append({"step": s, "format": "unreadable", "bytes": None, "path": None, "name": None, "error": str(e)})
            continue
        rows.append({"step": s, "format": seen.format, "bytes": seen.nbytes, "path": seen.where, "name": seen.name})
    return rows
