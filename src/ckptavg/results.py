"""The results file of ``ckptavg eval --results``: the data slice it holds losses on, and one row per model.

It also holds the downstream scores of ``eval --tasks`` (lm-evaluation-harness): one row per model and
task, carrying method and step as a loss row does, the task's metrics, how many examples were scored,
and a hash of the task as scored (config, documents, limit), so that a task that changed is scored
again. A file of task rows only has no slice (``"slice": null``) until a held-out loss is added.

Several writers may share one file (the tasks of a SLURM job array evaluating parts of one trajectory),
so a row is added by a read-merge-write under a lock, never by rewriting the file from one process's
memory:

1. take an exclusive ``fcntl.flock`` on a sidecar lock file, ``.NAME.lock`` beside the results file;
2. read the file again under the lock, check that it still holds the same slice, and merge: every row
   already there stays as it is (the first writer of a model wins), and this process's rows are added;
3. write JSON and CSV each to a temporary file in the same folder, fsync it, ``os.replace`` it over the
   old one, fsync the folder; then remove the lock file and release the lock.

Readers never lock: ``os.replace`` swaps whole files, so a reader sees the old file or the new one, never
half of one. Removing the lock file leaves nothing behind; a waiter that then wakes up holding the lock
of a removed file sees that the lock file at that path is not the one it locked, and tries again.

Why a lock and one file rather than one file per writer merged on read: ``plot``, the CSV and anyone's
own scripts keep reading one ordinary file, and a resumed run sees every writer's rows by reading it.

Where ``flock`` is not honoured: on NFS (Linux clients emulate flock with POSIX locks, held across
clients) and on Lustre mounted with ``-o flock`` it works across nodes. Lustre's default ``noflock``
refuses it with an error: ckptavg then writes unlocked and says so on stderr once. ``-o localflock``
(and some FUSE file systems) grants locks that hold only within one node, which no process can notice.
Unlocked, what still holds: every write is atomic, so the file is never corrupt and every row is whole;
a row can go missing only when two writers replace the file within the few milliseconds between one's
read and its rename; after an unlocked write each writer reads the file back and writes again if its
rows are gone; and a row that is still missing is only missing, so the next run evaluates it again.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptavg.errors import ResultsFileError
from ckptavg.outputs import check_file_output


@dataclass(frozen=True)
class Slice:
    """What makes two losses comparable: the data file's bytes and how much of it is scored."""

    data: str
    sha256: str
    max_tokens: int
    seq_len: int


# What eval writes in each row, and the types a row must have to be read back. plot needs only some.
ROW_KEYS = ("model", "method", "step", "loss", "ppl", "tokens")
PLOT_KEYS = ("method", "step", "loss")
# A downstream row (eval --tasks) is told apart by its "task"; ROW_KEYS and PLOT_KEYS are for loss rows.
TASK_ROW_KEYS = ("model", "method", "step", "task", "task_hash", "n", "metrics")
_NO_LOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock not offered by this file system


def check_row(path: Path, index: int, row: object, keys: tuple[str, ...] = ROW_KEYS) -> dict[str, Any]:
    """The row, if it is what eval writes (for ``keys``); else ResultsFileError naming the file and row."""

    def bad(detail: str) -> ResultsFileError:
        return ResultsFileError(path, f"row {index}: {detail}; not a row that ckptavg eval writes")

    if not isinstance(row, dict):
        raise bad(f"is a JSON {_json_type(type(row).__name__)}, not an object")
    if "task" in row:
        keys = TASK_ROW_KEYS
    missing = [k for k in keys if k not in row]
    if missing:
        raise bad(f"has no {', '.join(repr(k) for k in missing)}")
    for k in ("model", "method", "task", "task_hash"):
        if k in keys and not (isinstance(row[k], str) and row[k]):
            raise bad(f"{k!r} is {_shown(row[k])}, not a non-empty string")
    for k in ("method", "task", "task_hash"):  # printed as columns of a tab-separated table
        if k in keys and not row[k].isprintable():
            raise bad(f"{k!r} is {_shown(row[k])}, which holds a tab, line break or other control character")
    step = row["step"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise bad(f"'step' is {_shown(step)}, not a step number or null")
    for k in ("loss", "ppl"):
        if k not in keys:
            continue
        v = row[k]
        if k == "ppl" and v is None:  # a loss above ~709 has a perplexity beyond float range
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise bad(f"{k!r} is {_shown(v)}, not a finite number")
    for k in ("tokens", "n"):
        v = row.get(k)
        if k in keys and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(f"{k!r} is {_shown(v)}, not a positive count")
    if "metrics" in keys:
        metrics = row["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            raise bad(f"'metrics' is {_shown(metrics)}, not an object of metric values")
        for name, v in metrics.items():  # null: a perplexity beyond float range, as 'ppl'
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise bad(f"metric {name!r} is {_shown(v)}, not a finite number or null")
    return row


def row_key(row: dict[str, Any]) -> str:
    """What identifies a row in a results file: its model folder, and for a downstream row its task."""
    return row["model"] if "task" not in row else f"{row['model']}\0{row['task']}"


def task_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "task" in r]


def loss_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "task" not in r]


def _json_type(name: str) -> str:
    return {"list": "array", "str": "string", "int": "number", "float": "number", "NoneType": "null"}.get(name, name)


def _shown(v: object) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def read_results(path: Path, keys: tuple[str, ...] = ROW_KEYS) -> tuple[Any, list[dict[str, Any]]]:
    """The slice (as saved) and the rows of a results file, every row checked."""
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise ResultsFileError(path, f"cannot read ({e.strerror})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ResultsFileError(path, f"not a ckptavg results file (not JSON: {e})") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("rows"), list) or "slice" not in saved:
        raise ResultsFileError(path, "not a ckptavg results file (no 'slice' and 'rows')")
    return saved["slice"], [check_row(path, i, r, keys) for i, r in enumerate(saved["rows"])]


def _no_constant(name: str) -> float:
    return float(name)  # NaN and Infinity parse, so that check_row can name the row that holds one


class Results:
    """A results file: the slice it was made on and one row per model, keyed by the model's folder (and
    one per model and task, keyed by both).

    ``path`` None keeps rows in memory only. ``sl`` None (downstream tasks only) takes the file's slice,
    if it has one. ``warn`` is told, once, when the file system refuses locks.
    """

    def __init__(self, path: Path | None, sl: Slice | None, warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.slice = sl
        self.warn = warn
        self.rows: dict[str, dict[str, Any]] = {}
        self._mine: set[str] = set()  # the models this process evaluated: what a merge must keep
        self._warned = False
        if path is None:
            return
        if path.suffix.lower() == ".csv":
            raise ResultsFileError(path, "--results names the JSON file, and the CSV goes beside it; use a .json name")
        check_file_output(path, "--results")
        self.refresh()

    def refresh(self) -> None:
        """Take in the rows other writers have added since (readers need no lock: writes are renames)."""
        if self.path is None:
            return
        for key, row in self._read().items():
            self.rows.setdefault(key, row)

    def _read(self) -> dict[str, dict[str, Any]]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        saved, rows = read_results(self.path)
        if saved is None:  # downstream rows only: any slice fits
            return {row_key(r): r for r in rows}
        try:
            old = Slice(**saved)
        except TypeError as e:
            raise ResultsFileError(self.path, f"not a ckptavg results file (its 'slice' is {_shown(saved)})") from e
        if self.slice is None:
            self.slice = old
        if old != self.slice:
            diff = ", ".join(
                f"{k} {getattr(old, k)!r} there, {getattr(self.slice, k)!r} here"
                for k in asdict(self.slice)
                if getattr(old, k) != getattr(self.slice, k)
            )
            raise ResultsFileError(self.path, f"holds losses on another data slice ({diff}); use another --results")
        return {row_key(r): r for r in rows}

    def key(self, folder: Path) -> str:
        return str(folder.resolve())

    def has(self, folder: Path) -> bool:
        self.refresh()
        return self.key(folder) in self.rows

    def has_task(self, folder: Path, task: str, task_hash: str) -> bool:
        """Whether this model's score on this task, as the task is now (its hash), is in the file."""
        self.refresh()
        row = self.rows.get(row_key({"model": self.key(folder), "task": task}))
        return row is not None and row["task_hash"] == task_hash

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "model": self.key(Path(row["model"]))}
        key = row_key(row)
        self.rows[key] = row
        self._mine.add(key)
        self.save()

    def sorted_rows(self) -> list[dict[str, Any]]:
        return sorted(
            self.rows.values(),
            key=lambda r: (r["method"] != "original", r["method"], r["step"] or 0, r.get("task", "")),
        )

    def save(self) -> None:
        """Merge with what the file holds now and write both files, under the lock where there is one."""
        if self.path is None:
            return
        for _ in range(5):
            with self._locked() as locked:
                on_disk = self._read()
                for key in self._mine:
                    there = on_disk.get(key)
                    # the first writer of a row wins, unless it scored a task as it was before a change
                    if there is None or there.get("task_hash") != self.rows[key].get("task_hash"):
                        on_disk[key] = self.rows[key]
                self.rows = on_disk
                self._write()
            if locked or self._mine <= set(self._read()):
                return

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold an exclusive flock on ``.NAME.lock``; yield False where the file system offers none."""
        assert self.path is not None
        lock = self.path.with_name(f".{self.path.name}.lock")
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ResultsFileError(self.path, f"cannot make its lock file {lock.name} ({e.strerror})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                if e.errno not in _NO_LOCK:
                    raise ResultsFileError(self.path, f"cannot lock {lock.name} ({e.strerror})") from e
                if self.warn is not None and not self._warned:
                    self.warn(f"{self.path}: this file system refuses file locks; writing it unlocked (re-checked)")
                    self._warned = True
                yield False
                return
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
            os.close(fd)  # the holder before us removed it: lock the file now at that path
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # before unlocking: a waiter then sees the path changed and retries
            os.close(fd)

    def _write(self) -> None:
        assert self.path is not None
        rows = self.sorted_rows()
        sl = None if self.slice is None else asdict(self.slice)
        text = json.dumps({"slice": sl, "rows": rows}, indent=2, allow_nan=False) + "\n"
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["method", "step", "loss", "ppl", "tokens", "model"])
        for r in loss_rows(rows):
            step = "" if r["step"] is None else r["step"]
            ppl = "inf" if r["ppl"] is None else f"{r['ppl']:.4f}"
            out.writerow([r["method"], step, f"{r['loss']:.6f}", ppl, r["tokens"], r["model"]])
        _replace(self.path, text)
        if self.slice is not None:  # a file of downstream rows only has no losses to list
            _replace(self.path.with_suffix(".csv"), buf.getvalue())
        if task_rows(rows):  # long format: one line per model, task and metric
            buf = io.StringIO()
            out = csv.writer(buf, lineterminator="\n")
            out.writerow(["method", "step", "task", "metric", "value", "n", "model"])
            for r in task_rows(rows):
                step = "" if r["step"] is None else r["step"]
                for name, v in r["metrics"].items():
                    out.writerow([r["method"], step, r["task"], name, "inf" if v is None else v, r["n"], r["model"]])
            _replace(self.path.with_suffix(".tasks.csv"), buf.getvalue())


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsFileError(path, f"cannot write ({e.strerror})") from e
    dir_fd = os.open(path.absolute().parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(dir_fd)
