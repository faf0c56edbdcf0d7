"""Where an output may go: checks on output paths, made before any tensor is read.

``check_outputs`` is pure path arithmetic (nothing is created; relative paths are made absolute, and
symlinks in existing folders resolved): names that cannot be an output folder, outputs that would
replace or sit inside an input, and outputs a later run would take for one of its own checkpoints.
``check_writable`` looks at the disk: the folder an output goes in must be a folder we may write in.
Both raise :class:`~ckptavg.errors.OutputError` with one line naming the output and what to do.
"""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from ckptavg.errors import OutputError
from ckptavg.steps import STEP_DIR  # the step folders open_run lists

NAME_MAX = 255  # bytes in one file name, on every file system ckptavg is used on (ext4, xfs, Lustre, GPFS)


def check_outputs(outputs: Sequence[Path], *, run_source: str | None = None, inputs: Iterable[Path] = ()) -> None:
    """Refuse outputs that must not be written, whatever ``--overwrite`` says.

    ``run_source``: a local run as the user named it (``Run.label``: its folder, or a glob of nanoGPT
    files); None for a Hub run or explicit checkpoints. ``inputs``: the local checkpoints read (their
    folders and files).

    An output may not be, contain or lie inside an input. In a run folder, an output may not go where
    ``sources.open_run`` looks for checkpoints, which is its direct children (step folders) and two
    levels deep (``.pt`` files): refused are an output directly in it (``run/step1000/``, or
    ``run/soup/`` whose ``ckpt.pt`` is two levels deep) and any output under a folder with a step
    name (``run/step99/step1000/`` makes ``run/step99`` a step folder). What lies deeper under another
    name is never found, and is where people keep averages (``run/lawa/step1000/``); refusing the whole
    run folder would be simpler, but breaks that. The rule holds for the hidden temporary folders too,
    which lie beside their output. It is not told the run's kind, so an output directly in a run of
    step folders is refused whatever its name, though only a step name would be found there (a run's
    outputs always have one). A glob names its files exactly, so there only outputs that it, or a file
    in them, would match are refused (``*.pt`` in the working folder leaves ``--out lawa/`` free).
    """
    for out in outputs:
        check_name(out)
    ins = sorted({form for i in inputs for form in (_location(i), i.resolve())})
    for out in outputs:
        forms = {_location(out), out.resolve()}  # the link itself, and what it points to: both stay unreplaced
        for i in ins:
            if any(f == i or f in i.parents for f in forms):
                raise OutputError(f"{out}: would replace input {i}; choose another --out")
            if any(i in f.parents for f in forms):
                raise OutputError(f"{out}: would be written inside input {i}; choose another --out")
    if run_source is None:
        return
    if glob.has_magic(run_source):
        pattern = _absolute_pattern(run_source)
        for out in outputs:
            if _glob_finds(pattern, _location(out)):
                raise OutputError(
                    f"{out}: {run_source} would find it as a checkpoint of the run; choose an --out it does not match"
                )
        return
    root = Path(run_source).resolve()
    for out in outputs:
        forms = {_location(out), out.resolve()}
        if any(_run_finds(root, f) for f in forms):
            raise OutputError(
                f"{out}: in the run folder {run_source}, where later runs would take it for a checkpoint; "
                f"choose an --out outside it, or deeper (e.g. {Path(run_source) / 'avg'})"
            )
        if any(f in root.parents for f in forms):
            raise OutputError(f"{out}: would replace the run folder {run_source}; choose another --out")


def check_name(out: Path) -> None:
    """An output's path must name a folder (not ``.``, ``..`` or ``/``), fit in one file name, and hold
    no line break: stdout lists outputs one per line for ``xargs`` and scripts."""
    text = str(out)
    if "\0" in text or text.splitlines() != [text]:
        raise OutputError(f"{text!r}: an output path may not hold a line break or NUL; choose another --out")
    if out.name in ("", ".", ".."):
        raise OutputError(f"{out}: not a folder name an output can take; give --out a name (e.g. --out soup/)")
    size = len(os.fsencode(out.name))
    if size > NAME_MAX:
        raise OutputError(
            f"{out.name[:40]}...: the output name is {size} bytes, more than the {NAME_MAX} a file name can hold; "
            f"choose a shorter --out"
        )


def check_writable(outputs: Sequence[Path]) -> None:
    """The nearest existing folder above each output must be a folder that this process may write in."""
    for out in outputs:
        above = _nearest_existing(out.parent)
        if not above.is_dir():
            what = "a file" if above.is_file() else "not a folder"
            raise OutputError(f"{out}: {above} is {what}, so no folder can be made under it; choose another --out")
        if not os.access(above, os.W_OK | os.X_OK):
            why = os.strerror(errno.EROFS) if _read_only(above) else os.strerror(errno.EACCES)
            raise OutputError(f"{out}: cannot write in {above} ({why}); choose another --out")


def check_file_output(path: Path, option: str) -> None:
    """Before any work: the file ``option`` names (``--results``, ``--plot``, ``-o``) can be written there,
    as a new file or by a rename over the old one (which needs only the folder)."""
    if os.path.lexists(path) and not path.is_file():
        raise OutputError(f"{option} {path}: not a file; choose another {option}")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: folder {folder} does not exist; create it or choose another {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        why = os.strerror(errno.EROFS) if _read_only(folder) else os.strerror(errno.EACCES)
        raise OutputError(f"{option} {path}: cannot write in {folder} ({why}); choose another {option}")


def _run_finds(root: Path, out: Path) -> bool:
    """Whether discovery in the run folder ``root`` would find ``out``: at the root, directly in it, or
    under a folder there with a step name."""
    if out == root:
        return True
    if root not in out.parents:
        return False
    below = out.relative_to(root).parts
    return len(below) == 1 or STEP_DIR.match(below[0]) is not None


def _location(path: Path) -> Path:
    """Absolute, with the folders above resolved but not the name itself: what a rename would replace."""
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _absolute_pattern(pattern: str) -> tuple[str, ...]:
    """The glob's parts, its fixed folder part made absolute (symlinks resolved, as outputs are)."""
    parts = Path(pattern).parts
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return Path(*parts[:first]).resolve().parts + parts[first:]


def _glob_finds(pattern: tuple[str, ...], out: Path) -> bool:
    """Whether ``glob.glob`` with ``pattern`` (not recursive: ``**`` is ``*``) would list ``out``, or a
    file directly in it (whatever its name: ``ckpt.pt`` today, any file in an output tomorrow)."""
    parts = out.parts
    if len(parts) not in (len(pattern) - 1, len(pattern)):
        return False
    return all(_component_matches(name, pat) for name, pat in zip(parts, pattern, strict=False))


def _component_matches(name: str, pat: str) -> bool:
    if not glob.has_magic(pat):
        return name == pat
    if name.startswith(".") and not pat.startswith("."):  # glob skips hidden names unless asked
        return False
    return fnmatchcase(name, pat)


def working_dir() -> str | None:
    """The current directory, as provenance records it (relative paths resolve against it), or None where
    it cannot be told: a shell left in a folder that was removed since, where absolute paths still work."""
    try:
        return os.getcwd()
    except OSError:
        return None
