"""The library's entry points: plan an averaging (pure, headers only), then carry it out.

    from ckptavg import api
    plan = api.plan_lawa("runs/pythia-70m", StepRange(21000, 141000), k=5, interval=3000, out=Path("lawa"))
    api.average(plan)

A plan names every output, its member steps and their weights; planning opens only checkpoint headers and
checks that every member agrees on tensor names, shapes and dtypes, so bad input fails before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckptavg import __version__, engine, runner, schedule
from ckptavg.errors import CkptavgError, InvalidArgumentError, MismatchError, OptionError, OutputError
from ckptavg.outputs import check_outputs, check_writable, working_dir
from ckptavg.progress import Reporter, one_line
from ckptavg.slurm import check_cpus
from ckptavg.sources import Checkpoint, Source, open_checkpoint, open_run
from ckptavg.sources.extras import Tokenizer, has_tokenizer, sha256_file
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
    plan_windows: int = 0  # windows of the whole plan
    additions: int = 0  # engine.group_additions of the whole plan's windows
    origin: dict[str, Any] = field(default_factory=dict)  # Source.origin of a run's plan (provenance only)

    def __post_init__(self) -> None:
        if not self.plan_members:
            self.overlapping = engine.windows_overlap(self.windows)
            self.plan_members = len({m for w in self.windows for m in w.steps})
            self.plan_windows = len(self.windows)
            self.additions = engine.group_additions(self.windows)

    def bytes_to_read(self) -> int:
        ids = {m for w in self.windows for m in w.steps}
        return sum(self.members[m].nbytes for m in ids)


@dataclass
class Options:
    accumulate: str = "float64"
    dtype: str | None = None  # output dtype of averaged tensors; None keeps the input's
    device: str = "cpu"
    overwrite: bool = False
    max_shard_size: int = 5 * 10**9
    allow_nonfinite: bool = False
    write_ckpt: bool = False  # nanoGPT sources: also write ckpt.pt
    optimizer: str = "newest"  # with write_ckpt: the newest member's optimizer state in ckpt.pt, or "none"
    chunk: int | None = None  # elements per chunk (tests use small ones); default: engine.CHUNK_BYTES
    disk_budget: int | None = None  # Hub runs: bytes of downloads held at once; default: one window's files
    tokenizer: Tokenizer | None = None  # replaces every output's tokenizer files (extras.resolve_tokenizer)
    hash_inputs: bool = False  # record the sha256 of every local input file (one more read of each)
    gpu_memory: int | None = None  # --device cuda: most bytes of GPU memory to take; default: what is free
    threads: int | None = None  # cores to use (readers, torch's intra-op threads); default: the process's cores


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
        # A hidden name (".x") could be taken for another output's temporary folder, which starts with a dot.
        if not c.name or c.name.startswith(".") or "/" in c.name or not c.name.isprintable():
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
            same = _finished_plan_id(out) == plan_record(plan, j, opts)["plan_id"]
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


def plan_record(plan: Plan, j: int, opts: Options) -> dict[str, Any]:
    """What decides the bytes of output ``j``, and its ``plan_id`` (a hash of the rest): the record each
    weight file's metadata carries, the same for the same plan whichever run made it (a task, a resumed
    run), so that a rerun recognises the output and a resumed file keeps its header's size."""
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
    if opts.tokenizer is not None:  # other tokenizer files make another output (none given: as before)
        record["tokenizer"] = opts.tokenizer.digests
    record["plan_id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


def provenance(plan: Plan, j: int, opts: Options, digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Output ``j``'s ckptavg.json: ``plan_record``, and what does not decide its bytes (outside the
    plan_id, so resuming and skipping never depend on it): when and where the run was made (``created``,
    UTC; ``cwd``, against which relative member paths resolve), where the run is (``origin``: its
    folder, or a Hub repo, endpoint and revision pattern), where a ``--tokenizer`` came from, and with
    ``digests`` (path -> sha256, ``--hash``) each local file's content hash."""
    record = copy.deepcopy(plan_record(plan, j, opts))
    for member in record["members"]:
        for f in member["files"]:
            if digests and f.get("path") in digests:
                f["sha256"] = digests[f["path"]]
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["cwd"] = working_dir()
    record["origin"] = dict(plan.origin)
    if opts.tokenizer is not None:
        record["tokenizer_origin"] = dict(opts.tokenizer.origin)
    return record


def input_digests(plan: Plan, outputs: Sequence[int]) -> dict[str, str]:
    """sha256 of every local weight file that the ``outputs`` read (Hub members are pinned by commit)."""
    files = sorted({str(f) for j in outputs for m in plan.windows[j].steps for f in _local_files(plan.members[m])})
    return {f: sha256_file(Path(f)) for f in files}


def _local_files(c: Checkpoint) -> list[Path]:
    return [] if "hub" in c.meta else list(c.files)


def _finished_record(path: Path) -> dict[str, Any] | None:
    """The ckptavg.json of a folder an averaging made, or None (absent, unreadable, someone else's, or
    a ``convert``ed copy, which carries the plan id of the weights it came from)."""
    try:
        record = json.loads((path / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tool") != "ckptavg" or "converted" in record:
        return None
    return record if isinstance(record.get("plan_id"), str) else None


def _finished_plan_id(path: Path) -> str | None:
    record = _finished_record(path)
    return None if record is None else record["plan_id"]


def plan_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why an output made by another plan (``old``, its ckptavg.json) is not this plan's (``new``), as a
    phrase for one line: ``made from other inputs (step 2000: model.safetensors changed size)``. Pure."""
    for key in ("method", "source"):
        if old.get(key) != new.get(key):
            return f"made by another plan ({key} was {_shown(old.get(key))}, now {_shown(new.get(key))})"
    old_params, new_params = old.get("params") or {}, new.get("params") or {}
    for key in sorted(set(old_params) | set(new_params)):
        was, now = old_params.get(key), new_params.get(key)
        if was != now:
            return f"made with other parameters ({key} was {_shown(was)}, now {_shown(now)})"
    inputs = _member_changes(old.get("members") or [], new["members"], by_step=new.get("step") is not None)
    if inputs:
        return f"made from other inputs ({inputs})"
    for key, what in (("accumulate", "--accumulate"), ("dtype", "--dtype"), ("model_args", "model_args")):
        if old.get(key) != new.get(key):
            return f"made with other options ({what} was {_shown(old.get(key))}, now {_shown(new.get(key))})"
    if old.get("ckpt") != new.get("ckpt"):
        return f"made with other options ({_ckpt_options(old.get('ckpt'))}, now {_ckpt_options(new.get('ckpt'))})"
    if old.get("tokenizer") != new.get("tokenizer"):
        changed = sorted(
            n for n in set(old.get("tokenizer") or {}) | set(new.get("tokenizer") or {})
            if (old.get("tokenizer") or {}).get(n) != (new.get("tokenizer") or {}).get(n)
        )  # fmt: skip
        if not new.get("tokenizer"):
            return "made with --tokenizer (none given now)"
        if not old.get("tokenizer"):
            return "made with the run's own tokenizer (--tokenizer given now)"
        return f"made with another tokenizer ({', '.join(changed)} differ)"
    if old.get("version") != new.get("version"):
        return f"made by ckptavg {old.get('version')} (this is {new.get('version')})"
    return "made by another plan"


def _ckpt_options(ckpt: object) -> str:
    if isinstance(ckpt, dict):
        return f"--format ckpt --optimizer {ckpt.get('optimizer')}"
    return "--format safetensors"


def _member_changes(old: list[dict[str, Any]], new: list[dict[str, Any]], *, by_step: bool) -> str:
    """The first member whose inputs differ, said for one line; '' when the members are the same. Members
    are named by step, or by path where they have none (``avg``: the step field is a position)."""

    def who(m: dict[str, Any]) -> str:
        return f"step {m.get('step')}" if by_step else str(m.get("path"))

    old_steps, new_steps = [m.get("step") for m in old], [m.get("step") for m in new]
    if old_steps != new_steps:
        return f"members were {_span(old, who)}, now {_span(new, who)}"
    for o, n in zip(old, new, strict=True):
        if o.get("path") != n.get("path"):
            return f"{who(n)}: read from {n.get('path')}, was {o.get('path')}"
        o_files, n_files = o.get("files") or [], n.get("files") or []
        o_by, n_by = {_file_key(f): f for f in o_files}, {_file_key(f): f for f in n_files}
        if o_by.keys() != n_by.keys():
            return f"{who(n)}: files were {', '.join(sorted(o_by))}, now {', '.join(sorted(n_by))}"
        for key in sorted(n_by):
            a, b = o_by[key], n_by[key]
            if "commit" in b and a.get("commit") != b.get("commit"):
                return f"{who(n)}: {key} is now commit {str(b['commit'])[:12]}, was {str(a.get('commit'))[:12]}"
            changed = [k for k in ("size", "mtime_ns") if a.get(k) != b.get(k)]
            if changed:
                what = "size/mtime" if len(changed) == 2 else "size" if changed[0] == "size" else "mtime"
                return f"{who(n)}: {Path(key).name} changed {what}"
    if [m.get("weight") for m in old] != [m.get("weight") for m in new]:
        return "members' weights differ"
    return ""


def _file_key(f: dict[str, Any]) -> str:
    return str(f.get("path") or f"{f.get('repo')}@{f.get('revision')}")


def _span(members: list[dict[str, Any]], who: Any) -> str:
    if not members:
        return "none"
    if len(members) <= 2:
        return " and ".join(who(m) for m in members)
    return f"{who(members[0])} .. {who(members[-1])} ({len(members)})"


def _shown(value: object) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


# ---------------------------------------------------------------- execution


def decide_outputs(plan: Plan, opts: Options, states: Sequence[str], changes: Sequence[str | None] = ()) -> list[int]:
    """Which outputs a run makes, from their ``output_states``: the complete ones are skipped (unless
    ``overwrite``), and a folder that another plan made is refused (unless ``overwrite``), saying what
    differs where ``changes`` (by output: ``output_changes``) knows. Pure."""
    todo = []
    for j, state in enumerate(states):
        if state == "complete" and not opts.overwrite:
            continue
        if state == "other" and not opts.overwrite:
            why = changes[j] if j < len(changes) else None
            if why is None:
                raise OutputError(
                    f"{plan.outputs[j]}: already exists and was not made by this plan; pass --overwrite to replace it"
                )
            raise OutputError(f"{plan.outputs[j]}: {why}; pass --overwrite to replace it")
        todo.append(j)
    return todo


def output_changes(plan: Plan, opts: Options, states: Sequence[str]) -> list[str | None]:
    """For each output in state ``other`` that an averaging made (its ckptavg.json is ours): what differs
    from this plan (``plan_changes``); None for the rest, and for folders ckptavg did not make."""
    found: list[str | None] = []
    for j, state in enumerate(states):
        old = _finished_record(plan.outputs[j]) if state == "other" else None
        found.append(None if old is None or not _comparable(old) else plan_changes(old, plan_record(plan, j, opts)))
    return found


def _comparable(record: dict[str, Any]) -> bool:
    """Whether a ckptavg.json read from disk has the shape ``plan_changes`` compares (an edited, damaged or
    foreign one may not: it gets the plain 'not made by this plan' line, never a traceback)."""
    params, members = record.get("params", {}), record.get("members", [])
    if not isinstance(params, dict) or not isinstance(members, list):
        return False
    if not isinstance(record.get("tokenizer") or {}, dict):
        return False
    for m in members:
        if not isinstance(m, dict) or not isinstance(m.get("files", []), list):
            return False
        if not all(isinstance(f, dict) for f in m.get("files", [])):
            return False
    return True


def touch_output(out: Path) -> None:
    """Mark a complete output as up to date (its folder and ckptavg.json get the current time), so that
    make, which compares modification times, sees it newer than its inputs. Only a real folder that an
    averaging made: never through a symlink, never someone else's folder."""
    if out.is_symlink() or not out.is_dir() or _finished_record(out) is None:
        return
    try:
        os.utime(out / PROVENANCE_FILE, follow_symlinks=False)
        os.utime(out, follow_symlinks=False)
    except OSError:  # a read-only copy of a finished output is still finished: make will say the rest
        pass


def tokenless_warning(plan: Plan, outputs: Sequence[int], opts: Options) -> str | None:
    """The warning for outputs that will have no tokenizer file (none among the files their newest
    member brings, and no --tokenizer), or None."""
    if opts.tokenizer is not None:
        return None
    newest = {j: plan.members[plan.windows[j].steps[-1]] for j in outputs}
    bare = [plan.outputs[j] for j in outputs if not has_tokenizer(_extra_names(newest[j]))]
    if not bare:
        return None
    more = f" and {len(bare) - 1} more output{'s' * (len(bare) > 2)}" if len(bare) > 1 else ""
    whose = "its last checkpoint has none" if plan.by_position else "the run has none"
    return (
        f"{bare[0]}{more} will have no tokenizer ({whose}); pass --tokenizer DIR|REPO so that transformers "
        f"and lm-eval can use it"
    )


def _extra_names(c: Checkpoint) -> set[str]:
    """The extra files (config, tokenizer) an output takes from ``c``: on disk, or still on the Hub."""
    return set(c.extra_files) | set(c.remote.extras if c.remote is not None else ())


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
    if opts.gpu_memory is not None and device.type != "cuda":
        raise OptionError("--gpu-memory", f"applies to --device cuda only, not --device {opts.device}")
    if opts.threads is not None:
        check_cpus(opts.threads, "--threads")
    _raise_open_file_limit()
    if opts.write_ckpt and opts.max_shard_size != Options.max_shard_size:
        reporter.log(
            "warning: --max-shard-size is ignored with --format ckpt: nanoGPT loads one ckpt.pt, so each output "
            "is one ckpt.pt and one model.safetensors"
        )
    check_inputs_untouched(plan)
    states = output_states(plan, opts)
    todo = decide_outputs(plan, opts, states, output_changes(plan, opts, states))
    check_writable([plan.outputs[j] for j in todo])
    for j, state in enumerate(states):
        if state == "complete" and j not in todo:
            touch_output(plan.outputs[j])
            reporter.log(f"{plan.outputs[j]} is complete (same plan); skipped")
    if todo:
        warning = tokenless_warning(plan, todo, opts)
        if warning is not None:
            reporter.log(f"warning: {warning}")
        digests = input_digests(plan, todo) if opts.hash_inputs else None
        records = {j: provenance(plan, j, opts, digests) for j in todo}
        headers = {j: plan_record(plan, j, opts) for j in todo}
        runner.execute(plan, todo, records, headers, opts, device, reporter)
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
