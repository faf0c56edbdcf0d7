"""Carry out the outputs ``api.decide_outputs`` chose: the pipeline's stages, held in one ExitStack.

A local run is one pass of the engine over its files. A Hub run goes in units (see ``schedule.py``):
files are downloaded shard by shard, a unit ahead of the averaging, and deleted when no longer needed,
so the run's downloads never hold more than the disk budget in the cache.

How a run ends decides what it leaves (README, "Safety"):
- success: every output renamed into place, every download this run brought in deleted;
- a fault that outlived the retries (``HubUnavailableError``) or a kill: finished work stays (temporary
  output folders with their progress, and the complete downloads), and the same command resumes it;
- bad input, an error of ours, or Ctrl-C: unfinished outputs and downloads are removed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckptavg import engine, schedule
from ckptavg.cores import available_cores
from ckptavg.errors import HubUnavailableError
from ckptavg.pipeline import ByteBudget
from ckptavg.progress import Reporter, human_bytes
from ckptavg.sources import FileTable, TensorInfo
from ckptavg.sources.checkpoint import Remote
from ckptavg.sources.extras import TOKENIZER_FILES
from ckptavg.windows import Window
from ckptavg.writers import FolderWriter, ckpt_training_state, write_nanogpt_ckpt

if TYPE_CHECKING:
    from ckptavg.api import Options, Plan

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def keeps_progress(error: BaseException) -> bool:
    """Whether a run that failed with ``error`` keeps its finished work for the next run to resume:
    only when nothing was wrong with the input (a Hub that stayed unavailable through the retries)."""
    return isinstance(error, HubUnavailableError)


def execute(
    plan: Plan,
    todo: list[int],
    records: dict[int, dict[str, Any]],
    headers: dict[int, dict[str, Any]],
    opts: Options,
    device: torch.device,
    rep: Reporter,
) -> None:
    """Make outputs ``todo`` of ``plan``. By output index: ``records``, the provenance each ckptavg.json
    holds; ``headers``, the part of it that decides the bytes, which every weight file's metadata holds
    (``api.plan_record``: the same in a resumed run, so the header keeps its size)."""
    windows = [plan.windows[j] for j in todo]
    ref = plan.members[max(m for w in windows for m in w.steps)]
    groups = schedule.tensor_groups(ref)
    names = [n for g in groups for n in g]
    infos = {n: ref.entries[n].info for n in names}
    newest = sorted({w.steps[-1] for w in windows})
    # Held to the end, outside the units: configs and tokenizers of the outputs.
    remotes: list[tuple[int, Remote]] = [(m, r) for m in newest if (r := plan.members[m].remote) is not None]
    replaced = TOKENIZER_FILES if opts.tokenizer is not None else frozenset()  # --tokenizer: not the run's
    reserved = sum(n for _, r in remotes for f, n in r.extras.items() if f not in replaced)
    units, limit = schedule.plan_units(windows, plan.members, groups, opts.disk_budget, reserved)
    out_dtype = DTYPES[opts.dtype] if opts.dtype else None

    def dtype_of(name: str, info: TensorInfo) -> torch.dtype:
        return out_dtype if out_dtype is not None and engine.is_averaged(name, info) else info.dtype

    layout = [(n, TensorInfo(infos[n].shape, dtype_of(n, infos[n]))) for n in names]
    # Folders a failed run must not leave behind: each output's parent and every missing folder above it
    # (FolderWriter makes them all), deepest first.
    created = sorted({p for j in todo for p in _missing_folders(plan.outputs[j].parent)}, key=lambda p: -len(p.parts))
    # nanoGPT's ckpt.pt: each output's newest member's training state, checked before anything is written.
    ckpt_states = {
        j: ckpt_training_state(plan.members[plan.windows[j].steps[-1]], opts.optimizer)
        for j in (todo if opts.write_ckpt else [])
    }
    failure: list[BaseException] = []  # what ended the run, for the clean-up callbacks
    t0 = time.perf_counter()

    with contextlib.ExitStack() as stack:
        stack.callback(rep.stop)
        files = stack.enter_context(FileTable())
        threads = opts.threads or available_cores()
        stack.enter_context(engine.compute_threads(threads))

        def keep() -> bool:
            return bool(failure) and keeps_progress(failure[0])

        # Config and tokenizer files of each output's newest member (downloaded first for a Hub run); with
        # --tokenizer, its files instead of the run's tokenizer files (which are then not even downloaded).
        extra_files: dict[int, dict[str, Path]] = {}
        for m in newest:
            c = plan.members[m]
            extra_files[m] = {n: p for n, p in c.extra_files.items() if n not in replaced}
            remote = c.remote
            if remote is not None:
                extra_files[m] = {}
                for f in sorted(set(remote.extras) - replaced):
                    path, _ = remote.download(f)
                    stack.callback(lambda r=remote, f=f: r.done_with(f, keep=keep()))  # type: ignore[misc]
                    extra_files[m][f] = path
            if opts.tokenizer is not None:
                extra_files[m].update(opts.tokenizer.files)

        writers: list[FolderWriter] = []

        def remove_created() -> None:
            if failure:  # only those left empty: a kept temporary folder keeps its parent
                for p in created:
                    _remove_if_empty(p)

        def abort_writers() -> None:
            if failure:
                for w in writers:  # a folder with nothing finished in it is no progress to keep
                    w.abort(keep=keep() and w.tensors_done > 0)

        # Callbacks run last-registered first: folders are removed after the writers' temporary folders.
        stack.callback(remove_created)
        stack.callback(abort_writers)
        try:
            for j in todo:
                writers.append(
                    FolderWriter(
                        plan.outputs[j],
                        layout,
                        aliases=ref.aliases,
                        provenance=records[j],
                        metadata=headers[j],
                        extra_files=extra_files[plan.windows[j].steps[-1]],
                        config_dtype=opts.dtype,
                        max_shard_size=opts.max_shard_size if not opts.write_ckpt else 1 << 62,
                        overwrite=opts.overwrite,
                    )
                )
            done = [w.open() for w in writers]
            if max(done):
                rep.log(f"resuming an interrupted run after {min(done)} of {len(names)} tensors")
            # A unit whose outputs all have its tensors from an interrupted run is skipped, downloads and all.
            skips = [max(0, min(done[u.lo : u.hi]) - u.offset) for u in units]
            todo_units = [(u, skip) for u, skip in zip(units, skips, strict=True) if skip < len(u.names)]
            downloads = schedule.Downloads(
                [u for u, _ in todo_units], plan.members, ByteBudget(limit, held=reserved), files
            )
            stack.callback(lambda: downloads.close(keep=keep()))
            total = sum(
                plan.members[m].entries[n].info.nbytes
                for u, skip in todo_units
                for m in {m for w in windows[u.lo : u.hi] for m in w.steps}
                for n in u.names[skip:]
            )
            rep.start(total, len(windows))
            reducers = _reducers(plan, opts, device)

            def unit_members(unit: schedule.Unit) -> list[int]:
                return sorted({m for w in windows[unit.lo : unit.hi] for m in w.steps})

            for i, (unit, skip) in enumerate(todo_units):
                if len(todo_units) > 1:
                    rep.log(
                        f"part {i + 1} of {len(todo_units)}: {len(unit.names)} tensors of outputs "
                        f"{plan.outputs[todo[unit.lo]].name}..{plan.outputs[todo[unit.hi - 1]].name}, "
                        f"{len(unit.files)} files ({human_bytes(schedule.files_bytes(plan.members, unit.files))})"
                    )
                fetched = downloads.ready(i)  # a Hub revision is read from its downloads, local files directly
                readers = {m: fetched.get(m) or plan.members[m].open(files) for m in unit_members(unit)}
                part = writers[unit.lo : unit.hi]
                job = engine.Job(
                    windows=windows[unit.lo : unit.hi],
                    members=plan.members,
                    names=list(unit.names),
                    infos=infos,
                    reducer_for=functools.partial(reducers, windows[unit.lo : unit.hi]),
                    out_dtype=dtype_of,
                    sink=lambda j, name, start, data, part=part: part[j].write(name, start, data),  # type: ignore[misc]
                    readers=readers,
                    allow_nonfinite=opts.allow_nonfinite,
                    chunk=opts.chunk,
                    skip=skip,
                    on_tensor_done=functools.partial(_tensor_done, part, unit.offset, rep),
                    device=device,
                    gpu_memory=opts.gpu_memory,
                    threads=threads,
                    by_position=plan.by_position,
                )
                engine.run(job)
                if i + 1 < len(todo_units):  # on disk before its files go: a power loss never re-downloads them
                    for w in part:
                        w.sync()
                downloads.release(i)
            rep.stop()
            for j, w in zip(todo, writers, strict=True):
                if opts.write_ckpt:
                    write_nanogpt_ckpt(
                        w.tmp, iter_num=plan.windows[j].end, state=ckpt_states.pop(j), aliases=ref.aliases
                    )
                w.commit()
                members = plan.windows[j].steps
                span = f"{len(members)} member{'s' * (len(members) != 1)}"
                if not plan.by_position:
                    span += f", steps {members[0]}..{members[-1]}"
                rep.output_done(
                    str(plan.outputs[j]), f"{plan.method}, {span}", sum(plan.members[m].nbytes for m in members)
                )
        except BaseException as e:
            failure.append(e)  # its message says what to do (a HubUnavailableError: run it again to resume)
            raise
    rep.log(f"done in {time.perf_counter() - t0:.1f} s")


def _tensor_done(writers: list[FolderWriter], offset: int, rep: Reporter, count: int, nbytes: int) -> None:
    for w in writers:
        w.tensor_done(offset + count)
    rep.advance(nbytes)


def _reducers(plan: Plan, opts: Options, device: torch.device) -> Callable[[list[Window], torch.dtype], engine.Reducer]:
    """One reducer per (windows, input dtype), chosen from the whole plan: the same for every subset of
    its windows that a task, a resumed run or a Hub part makes."""
    made: dict[tuple[int, int, torch.dtype], engine.Reducer] = {}
    method = "uniform" if plan.method in ("lawa", "swa") else plan.method
    stride = int(plan.params.get("k_stepsize" if plan.method == "lawa" else "every") or 1)

    def reducer(windows: list[Window], dtype: torch.dtype) -> engine.Reducer:
        key = (id(windows[0]), len(windows), dtype)
        if key not in made:
            made[key] = engine.choose_reducer(
                method,
                windows,
                dtype,
                overlapping=plan.overlapping,
                members=plan.plan_members,
                plan_windows=plan.plan_windows,
                additions=plan.additions,
                stride=stride,
                decay=float(plan.params.get("decay") or 0.0),
                accumulate=DTYPES[opts.accumulate],
                allow_nonfinite=opts.allow_nonfinite,
                device=device,
            )
        return made[key]

    return reducer


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and the folders above it that do not exist yet."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
