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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg import __version__, engine, schedule
from ckptavg.errors import CheckpointFormatError, CkptavgError, InvalidArgumentError, MismatchError, OutputError
from ckptavg.progress import Reporter, human_bytes
from ckptavg.sources import Checkpoint, Run, TensorInfo, close_files, open_checkpoint, open_run
from ckptavg.sources.checkpoint import Remote
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
from ckptavg.writers import FolderWriter, write_nanogpt_ckpt
from ckptavg.writers.safetensors_folder import TMP_MARK

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Plan:
    method: str  # lawa | ema | swa | avg
    params: dict[str, Any]
    source: str
    windows: list[Window]
    members: dict[int, Checkpoint]  # member id (step; position for avg) -> checkpoint
    outputs: list[Path]
    by_position: bool = False  # avg: member ids are positions in the command line, not steps

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
    chunk: int | None = None  # elements per chunk (tests use small ones); default: engine.CHUNK_BYTES
    disk_budget: int | None = None  # Hub runs: bytes of downloads held at once; default: one window's files


# ---------------------------------------------------------------- planning


def _plan_from_run(run: Run, method: str, params: dict[str, Any], windows: list[Window], out: Path) -> Plan:
    steps = sorted({s for w in windows for s in w.steps})
    if run.opener is None:
        members = {s: run.checkpoint(s) for s in steps}
    else:  # a Hub: each header is a few round trips, so read several at once
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {s: pool.submit(run.checkpoint, s) for s in steps}
        failed = [e for f in futures.values() if (e := f.exception()) is not None]
        if len(failed) > 1 and all(isinstance(e, CheckpointFormatError) for e in failed):
            listed = "; ".join(str(e) for e in failed[:5]) + (
                f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
            )
            raise CheckpointFormatError(f"{len(failed)} revisions cannot be used: {listed}")
        if failed:
            raise failed[0]
        members = {s: f.result() for s, f in futures.items()}
    plan = Plan(method, params, run.label, windows, members, [out / f"step{w.end}" for w in windows])
    check_members(plan)
    return plan


def plan_lawa(
    source: str | Run,
    steps: StepRange,
    *,
    k: int,
    out: Path,
    interval: int | None = None,
    k_stepsize: int | None = None,
    allow_legacy: bool = False,
) -> Plan:
    run = source if isinstance(source, Run) else open_run(source, allow_legacy=allow_legacy)
    spacing = checkpoint_spacing(run.steps)
    nu = k_stepsize or spacing
    every = interval or steps.every or spacing
    windows = lawa_windows(run.steps, steps, k=k, interval=every, nu=nu, source=run.label)
    return _plan_from_run(run, "lawa", {"k": k, "k_stepsize": nu, "interval": every, "steps": str(steps)}, windows, out)


def plan_ema(
    source: str | Run,
    steps: StepRange,
    *,
    out: Path,
    decay: float = 0.9,
    interval: int | None = None,
    every: int | None = None,
    allow_legacy: bool = False,
) -> Plan:
    run = source if isinstance(source, Run) else open_run(source, allow_legacy=allow_legacy)
    ends = interval or steps.every or checkpoint_spacing(run.steps)
    windows = ema_windows(run.steps, steps, decay=decay, interval=ends, every=every, source=run.label)
    params = {"decay": decay, "interval": ends, "every": every, "steps": str(steps)}
    return _plan_from_run(run, "ema", params, windows, out)


def plan_swa(
    source: str | Run,
    steps: StepRange,
    *,
    out: Path,
    start: int | None = None,
    every: int | None = None,
    interval: int | None = None,
    allow_legacy: bool = False,
) -> Plan:
    run = source if isinstance(source, Run) else open_run(source, allow_legacy=allow_legacy)
    first = steps.start if start is None else start
    stride = every or checkpoint_spacing(run.steps)
    ends = interval or steps.every or stride
    windows = swa_windows(run.steps, steps, start=first, every=stride, interval=ends, source=run.label)
    params = {"start": first, "every": stride, "interval": ends, "steps": str(steps)}
    return _plan_from_run(run, "swa", params, windows, out)


def plan_avg(
    paths: list[str],
    *,
    out: Path,
    weights: list[float] | None = None,
    allow_legacy: bool = False,
    run: Run | None = None,
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
        members = {i: run.checkpoint(int(p)) for i, p in enumerate(paths)}
        source = f"{run.label} steps {', '.join(paths)}"
    params = {"weights": list(window.weights)}
    plan = Plan("avg", params, source, [window], members, [out], by_position=True)
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
    return Plan(plan.method, plan.params, plan.source, windows, members, outputs, plan.by_position)


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
        if out.exists():
            same = _finished_plan_id(out) == provenance(plan, j, opts)["plan_id"]
            states.append("complete" if same else "other")
        elif any(out.parent.glob(f".{out.name}{TMP_MARK}*")):
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
    record["plan_id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


def _finished_plan_id(path: Path) -> str | None:
    try:
        return json.loads((path / PROVENANCE_FILE).read_text()).get("plan_id")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- execution


def average(plan: Plan, opts: Options | None = None, reporter: Reporter | None = None) -> list[Path]:
    """Produce every output of ``plan``; outputs already made by the same plan are skipped.

    A local run is one pass over its files. A Hub run goes in units (see ``schedule.py``): files are
    downloaded shard by shard, a unit ahead of the averaging, and deleted when no longer needed, so the
    run's downloads never hold more than ``opts.disk_budget`` bytes in the cache.
    """
    opts = opts or Options()
    reporter = reporter or Reporter(quiet=True)
    if opts.accumulate not in ("float32", "float64"):
        raise InvalidArgumentError(f"accumulate must be float32 or float64, got {opts.accumulate}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {opts.dtype}")
    device = _device(opts.device)
    _raise_open_file_limit()
    records = [provenance(plan, j, opts) for j in range(len(plan.windows))]
    inputs = {f.resolve() for c in plan.members.values() if c.remote is None for f in (Path(c.label), *c.files)}
    todo = []
    for j, out in enumerate(plan.outputs):
        target = out.resolve()
        clash = next((i for i in sorted(inputs) if i == target or target in i.parents), None)
        if clash is not None:
            raise OutputError(f"{out}: would replace input {clash}; choose another --out")
        if out.exists():
            if _finished_plan_id(out) == records[j]["plan_id"] and not opts.overwrite:
                reporter.log(f"{out} is complete (same plan); skipped")
                continue
            if not opts.overwrite:
                raise OutputError(
                    f"{out}: already exists and was not made by this plan; pass --overwrite to replace it"
                )
        todo.append(j)
    if not todo:
        return list(plan.outputs)

    windows = [plan.windows[j] for j in todo]
    ref = plan.members[max(m for w in windows for m in w.steps)]
    groups = schedule.tensor_groups(ref)
    names = [n for g in groups for n in g]
    infos = {n: ref.entries[n].info for n in names}
    newest = {w.steps[-1] for w in windows}
    # Held to the end, outside the units: configs and tokenizers of the outputs.
    remotes = [(m, c.remote) for m, c in plan.members.items() if c.remote is not None]
    reserved = sum(n for m, r in remotes if m in newest for n in r.extras.values())
    units, budget = schedule.plan_units(windows, plan.members, groups, opts.disk_budget, reserved)
    out_dtype = DTYPES[opts.dtype] if opts.dtype else None

    def dtype_of(name: str, info: TensorInfo) -> torch.dtype:
        return out_dtype if out_dtype is not None and engine.is_averaged(name, info) else info.dtype

    layout = [(n, TensorInfo(infos[n].shape, dtype_of(n, infos[n]))) for n in names]
    created = [p for p in {o.parent for o in plan.outputs} if not p.exists()]
    writers: list[FolderWriter] = []
    downloader: schedule.Downloader | None = None
    extras: list[tuple[Remote, str]] = []  # in use until the outputs are committed
    t0 = time.perf_counter()
    try:
        for m in sorted(newest):  # config and tokenizer of each output's newest member
            c = plan.members[m]
            if c.remote is not None:
                c.extra_files = []
                for f in sorted(c.remote.extras):
                    c.extra_files.append(c.remote.download(f)[0])
                    extras.append((c.remote, f))
        for j in todo:
            writers.append(
                FolderWriter(
                    plan.outputs[j],
                    layout,
                    aliases=ref.aliases,
                    provenance=records[j],
                    extra_files=plan.members[plan.windows[j].steps[-1]].extra_files,
                    config_dtype=opts.dtype,
                    max_shard_size=opts.max_shard_size if not opts.write_ckpt else 1 << 62,
                    overwrite=opts.overwrite,
                )
            )
        done = [w.open() for w in writers]
        if max(done):
            reporter.log(f"resuming an interrupted run after {min(done)} of {len(names)} tensors")
        # A unit whose outputs all have its tensors from an interrupted run is skipped, downloads and all.
        skips = [max(0, min(done[u.lo : u.hi]) - u.offset) for u in units]
        todo_units = [(u, skip) for u, skip in zip(units, skips, strict=True) if skip < len(u.names)]
        downloader = schedule.Downloader([u for u, _ in todo_units], plan.members, budget, held=reserved)
        total = sum(
            plan.members[m].entries[n].info.nbytes
            for u, skip in todo_units
            for m in {m for w in windows[u.lo : u.hi] for m in w.steps}
            for n in u.names[skip:]
        )
        reporter.start(total, len(windows))
        for i, (unit, skip) in enumerate(todo_units):
            if len(todo_units) > 1:
                reporter.log(
                    f"part {i + 1} of {len(todo_units)}: {len(unit.names)} tensors of outputs "
                    f"{plan.outputs[todo[unit.lo]].name}..{plan.outputs[todo[unit.hi - 1]].name}, "
                    f"{len(unit.files)} files ({human_bytes(schedule.files_bytes(plan.members, unit.files))})"
                )
            downloader.ready(i)
            part = writers[unit.lo : unit.hi]
            _average_unit(plan, unit, skip, windows, part, infos, dtype_of, opts, device, reporter)
            downloader.release(i)
        reporter.stop()
        for j, w in zip(todo, writers, strict=True):
            if opts.write_ckpt:
                write_nanogpt_ckpt(w.tmp, iter_num=plan.windows[j].end, meta=ref.meta, aliases=ref.aliases)
            w.commit()
            members = plan.windows[j].steps
            span = f"{len(members)} member{'s' * (len(members) != 1)}"
            if not plan.by_position:
                span += f", steps {members[0]}..{members[-1]}"
            reporter.output_done(
                str(plan.outputs[j]), f"{plan.method}, {span}", sum(plan.members[m].nbytes for m in members)
            )
    except BaseException:
        reporter.stop()
        for w in writers:
            w.abort()
        for p in created:
            _remove_if_empty(p)
        raise
    finally:
        if downloader is not None:
            downloader.close()
        for remote, f in extras:
            remote.done_with(f)
        close_files()
    reporter.log(f"done in {time.perf_counter() - t0:.1f} s")
    return list(plan.outputs)


def _average_unit(
    plan: Plan,
    unit: schedule.Unit,
    skip: int,
    windows: list[Window],
    writers: list[FolderWriter],
    infos: dict[str, TensorInfo],
    dtype_of: Any,
    opts: Options,
    device: torch.device,
    reporter: Reporter,
) -> None:
    """One pass of the engine over a unit's tensors and windows, into those windows' writers."""
    part = windows[unit.lo : unit.hi]
    job = engine.Job(
        windows=part,
        members=plan.members,
        names=list(unit.names),
        infos=infos,
        reducer=_reducer(plan, part, opts, device),
        out_dtype=dtype_of,
        sink=lambda j, name, start, data: writers[j].write(name, start, data),
        allow_nonfinite=opts.allow_nonfinite,
        chunk=opts.chunk,
        skip=skip,
    )

    def tensor_done(count: int, nbytes: int) -> None:
        for w in writers:
            w.tensor_done(unit.offset + count)
        reporter.advance(nbytes)

    job.on_tensor_done = tensor_done
    engine.run(job)


def _reducer(plan: Plan, windows: list[Window], opts: Options, device: torch.device) -> engine.Reducer:
    acc = DTYPES[opts.accumulate]
    if plan.method in ("lawa", "swa"):
        stride = int(plan.params["k_stepsize" if plan.method == "lawa" else "every"])
        uniform = engine.UniformReducer(windows, stride, acc, device)
        # With NaN/Inf let through, a subtracted running sum would carry an Inf into windows that never
        # held it (inf - inf = nan): sum each window on its own instead, at k additions per checkpoint.
        if not (opts.allow_nonfinite and uniform.overlapping):
            return uniform
    if plan.method == "ema":
        return engine.EmaReducer(windows, float(plan.params["decay"]), acc, device)
    return engine.WeightedReducer(windows, acc, device)


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


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------- listing


def list_checkpoints(source: str | Run, *, allow_legacy: bool = False) -> list[dict[str, Any]]:
    """Steps of a run with their format, size on disk and path (headers only)."""
    run = source if isinstance(source, Run) else open_run(source, allow_legacy=allow_legacy)
    rows = []
    for s in run.steps:
        try:
            if run.summary is not None:  # a Hub run: from file lists, without reading any header
                fmt, n_files, size = run.summary(s)
                label = f"{run.label}@{run.paths[s]}"
            else:
                c = run.checkpoint(s)
                fmt, n_files, size, label = c.format, len(c.files), sum(f.stat().st_size for f in c.files), c.label
        except CkptavgError as e:
            rows.append({"step": s, "format": "unreadable", "bytes": None, "path": str(run.paths[s]), "error": str(e)})
            continue
        rows.append(
            {"step": s, "format": fmt + (f" ({n_files} shards)" if n_files > 1 else ""), "bytes": size, "path": label}
        )
    close_files()
    return rows
