"""Write one output model folder by streaming tensor chunks into safetensors files, atomically.

Shapes and dtypes are known before any byte is computed, so every shard's header is written first and
chunks land at their final offsets with ``pwrite`` as the engine produces them; no shard is ever held in
memory. Space for every file is reserved up front (a full disk fails before the work, not after). The
folder is built under a hidden temporary name beside the target and renamed into place only when
complete, so a folder with the target's name is always whole; ``ckptavg.json`` inside it says which plan
made it, which is how a rerun recognises finished outputs and skips them.

The temporary name carries the plan's id (``temp_prefix`` says how it starts, and stays within NAME_MAX
whenever the output's own name does), and a small ``progress.json`` in it counts the tensors fully
written. A run killed outright (SIGKILL, out of memory, a lost node) leaves that folder behind, and the
same command later resumes after the last finished tensor instead of starting over.

Crash consistency is an ordering: the record holds two counts, and neither claims bytes a rerun could
miss. ``durable`` only advances at a durable point (every ``sync_bytes`` written, or ``sync_seconds``,
on a thread of its own): the data files are fsynced first, then the record is written and fsynced.
``tensors_done`` advances with every finished tensor, unsynced, and is tagged with the kernel's boot id:
a rerun trusts it only under the same boot, where the page cache that holds those bytes is still the
one every reader sees (the process was killed, the node was not). After a power loss or on another node
the boot id differs and the rerun resumes from ``durable``. Any version of the record that reaches the
disk is safe, since ``durable`` is written only after the data it counts; a torn record fails its
checksum and means "start over". All file operations go through ``FolderWriter.ops``, a seam the tests
replace with a model of the page cache that forgets what was not fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ckptavg.errors import OutputError
from ckptavg.outputs import NAME_MAX, check_name, check_writable
from ckptavg.sources import TensorInfo
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.sources.safetensors_file import DTYPE_NAMES

TMP_MARK = ".ckptavg-tmp-"
_SUFFIX_MAX = 24  # what follows temp_prefix: a plan id (16 hex digits), "old-" and a pid, or a pid
_PROGRESS = "progress.json"  # inside the temporary folder only; never in a finished output
_PROGRESS_WIDTH = 256  # one sector; the record is written whole, at offset 0


def temp_prefix(out: Path) -> str:
    """How every temporary name of ``out`` starts: ``.{name}.ckptavg-tmp-``, then a suffix of at most
    ``_SUFFIX_MAX`` characters (the plan id). A name too long to take these additions within NAME_MAX
    keeps its first bytes and gains a hash of the whole name, so the prefix stays one per output name:
    ``.{start of name}~{hash}.ckptavg-tmp-``."""
    name = out.name
    room = NAME_MAX - _SUFFIX_MAX - len(TMP_MARK) - 1
    raw = os.fsencode(name)
    if len(raw) > room:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        while len(os.fsencode(name)) > room - 1 - len(digest):  # whole characters: the name stays UTF-8
            name = name[:-1]
        name = f"{name}~{digest}"
    return f".{name}{TMP_MARK}"


def temp_paths(out: Path) -> list[Path]:
    """What sits beside ``out`` under one of its temporary names: a run's folder (killed, or in progress)
    or the previous output that a commit with ``overwrite`` set aside. Listed by prefix, not by glob,
    since an output name may hold glob characters (``soup[1]``)."""
    prefix = temp_prefix(out)
    try:
        return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
    except OSError:  # no folder there (yet), or not a folder
        return []


def _temp_name(out: Path, suffix: object) -> Path:
    text = str(suffix)
    if len(text) > _SUFFIX_MAX or "/" in text:
        text = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out.parent / f"{temp_prefix(out)}{text}"


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a folder with what it holds; absent is fine."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class FileOps(Protocol):
    """The file operations whose durability matters; ``os`` by default, a page-cache model in tests."""

    def open(self, path: Path, flags: int, mode: int) -> int: ...
    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int: ...
    def fallocate(self, fd: int, offset: int, length: int) -> None: ...
    def fsync(self, fd: int) -> None: ...
    def close(self, fd: int) -> None: ...
    def boot_id(self) -> str | None:
        """Changes when the machine restarts (and its page cache is gone); None where unknown."""
        ...


class OsFileOps:
    def open(self, path: Path, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def boot_id(self) -> str | None:
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        except OSError:
            return None


@dataclass(frozen=True)
class _Slot:
    fd_index: int
    offset: int  # of the tensor's first byte in its file
    itemsize: int


def shard_layout(tensors: list[tuple[str, TensorInfo]], max_shard_size: int) -> list[list[tuple[str, TensorInfo]]]:
    """Greedy split in tensor order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in tensors:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class FolderWriter:
    """One output folder; ``write`` chunks in any order, then ``commit`` or ``abort``.

    ``write``, ``tensor_done`` and ``sync`` are called from one thread (the engine's writer thread);
    a durable point runs on a thread of its own, joined by the next one, ``commit`` and ``abort``.
    """

    ops: FileOps = OsFileOps()
    # A durable point (fsync of the data, then of the record) once this many bytes were written since the
    # last one, or this long ago, whichever comes first: what a rerun after a power loss must redo, traded
    # against fsyncs, which wait for the disk (benchmarks/results/durability.md has the measurements).
    # 64 MiB rather than 1 GiB: the disk then writes back while the arithmetic runs, instead of in commit's
    # fsync after it (1b window 0.24-0.60 s faster, 160m trajectory 0.2-1.0 s; issue12-cpu.md).
    sync_bytes = 64 << 20
    sync_seconds = 60.0

    def __init__(
        self,
        final: Path,
        tensors: list[tuple[str, TensorInfo]],
        *,
        aliases: dict[str, str],
        provenance: dict[str, object],
        metadata: dict[str, object] | None = None,
        extra_files: dict[str, Path],
        config_dtype: str | None = None,
        max_shard_size: int,
        overwrite: bool,
    ) -> None:
        self.final = final
        self.overwrite = overwrite
        self.extra_files = extra_files
        self.config_dtype = config_dtype  # --dtype: config.json should announce the dtype we wrote
        self.provenance = provenance  # ckptavg.json
        # Each shard's __metadata__: the part of the provenance that a resumed run repeats exactly (the
        # header's size fixes where the tensors are), or the whole of it when the caller has no such split.
        self.metadata = provenance if metadata is None else metadata
        self.tmp = _temp_name(final, provenance.get("plan_id", os.getpid()))
        self._lock_fd = -1
        self._progress = -1
        self._done = 0  # tensors whose bytes were all passed to write (maybe only in the page cache)
        self._durable = 0  # tensors whose bytes were fsynced
        self._boot: str | None = None
        self._unsynced = 0  # bytes written since the last durable point
        self._synced_at = 0.0
        self._dirs_synced = False
        self._syncer: threading.Thread | None = None  # the durable point in progress, off the writer thread
        self._sync_error: BaseException | None = None
        self._record_lock = threading.Lock()  # the writer thread and the syncer both write the record
        with_aliases = list(tensors) + [(a, dict(tensors)[c]) for a, c in aliases.items()]
        self.aliases_of: dict[str, list[str]] = {}
        for a, c in aliases.items():
            self.aliases_of.setdefault(c, []).append(a)
        self.shards = shard_layout(with_aliases, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.slots: dict[str, _Slot] = {}
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.total_size = sum(i.nbytes for _, i in with_aliases)
        # What a resumed folder must match besides the plan: the same tensors in the same shards.
        layout = [[[n, list(i.shape), str(i.dtype)] for n, i in shard] for shard in self.shards]
        self.layout_id = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

    @property
    def tensors_done(self) -> int:
        """Tensors (in layout order) fully written so far, by this run or the one it resumed."""
        return self._done

    def open(self) -> int:
        """Create the temporary folder, or take up the one a killed run of the same plan left behind.

        Returns how many tensors (in layout order) that earlier run had written where this run can read
        them back (on disk, or in this boot's page cache): the engine starts after them. The folder is
        locked (flock) so that two processes never write one output.
        """
        meta = {"format": "pt", "ckptavg": json.dumps(self.metadata, sort_keys=True)}
        ops = self.ops
        check_name(self.final)
        check_writable([self.final])
        if not self.overwrite and os.path.lexists(self.final):  # a dangling symlink too
            raise OutputError(f"{self.final}: already exists; pass --overwrite to replace it")
        made = False  # the temporary folder, by this call
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            if self.tmp.is_symlink() or (os.path.lexists(self.tmp) and not self.tmp.is_dir()):
                self.tmp.unlink()  # our name, not our folder: never write through a link
            try:
                self.tmp.mkdir()
            except FileExistsError:  # a killed run's: resumed below if it is this plan's
                pass
            else:
                made = True
            self._lock()  # before touching anything in it
            self._boot = self.ops.boot_id()
            resumed = self._resumable()
            if resumed is None:
                old = list(self.tmp.iterdir())
                for p in old:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                if old:  # the old record must not come back after a power loss to vouch for new files
                    self._fsync_path(self.tmp)
                resumed = (0, 0)
            done, self._durable = resumed
            flags = os.O_RDWR | os.O_CREAT | (0 if done else os.O_TRUNC)
            for i, shard in enumerate(self.shards):
                header: dict[str, object] = {"__metadata__": meta}
                begin = 0
                for name, info in shard:
                    header[name] = {
                        "dtype": DTYPE_NAMES[info.dtype],
                        "shape": list(info.shape),
                        "data_offsets": [begin, begin + info.nbytes],
                    }
                    begin += info.nbytes
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
                data_start = 8 + len(raw)
                fd = ops.open(self.tmp / self.names[i], flags, 0o644)
                self.fds.append(fd)
                size = data_start + begin
                if size:
                    ops.fallocate(fd, 0, size)
                _pwrite_all(ops, fd, len(raw).to_bytes(8, "little") + raw, 0)
                begin = 0
                for name, info in shard:
                    self.slots[name] = _Slot(i, data_start + begin, info.dtype.itemsize)
                    begin += info.nbytes
            self._progress = ops.open(self.tmp / _PROGRESS, os.O_RDWR | os.O_CREAT, 0o644)
            self._done = done
            self._synced_at = time.monotonic()
            self._write_record()  # this boot's: a rerun after a kill need not look at the durable count
        except OSError as e:
            locked = self._lock_fd >= 0
            self.abort()  # removes the folder if we hold it
            if made and not locked:  # made by us but never locked (the lock itself failed): ours all the same
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise _os_error(e, self.final, self.total_size) from e
        return done

    def tensor_done(self, count: int) -> None:
        """Record that the first ``count`` tensors were fully passed to ``write``: what a rerun after a
        kill may skip at once, and after a power loss once it is durable (every ``sync_bytes`` or
        ``sync_seconds`` a durable point starts, on a thread of its own so that the fsync, which waits
        for the disk, does not stall the writes behind it).

        Never goes back: a Hub run's unit may rewrite tensors this output already has, for a
        neighbouring output that had fewer (with the same bytes, so a claim made stays true)."""
        self._done = max(count, self._done)
        try:
            self._write_record()
            if self._unsynced >= self.sync_bytes or time.monotonic() - self._synced_at >= self.sync_seconds:
                self._join_syncer()  # one at a time: a disk slower than the writes holds them back
                self._unsynced = 0
                self._synced_at = time.monotonic()
                self._syncer = threading.Thread(
                    target=self._durable_point, args=(self._done,), name="ckptavg-sync", daemon=True
                )
                self._syncer.start()
        except OSError as e:
            raise _os_error(e, self.final, self.total_size) from e

    def sync(self) -> None:
        """A durable point now, on the caller's thread: every tensor reported done is on disk, and so is
        the record that says so. Call it from the writer thread, or once the writes are over."""
        try:
            self._join_syncer()
            self._durable_point(self._done)
            self._join_syncer()  # raises what the durable point raised
        except OSError as e:
            raise _os_error(e, self.final, self.total_size) from e
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def _durable_point(self, count: int) -> None:
        """fsync the data, then write and fsync a record whose durable count is ``count``: the tensors
        whose bytes had all been written before this began."""
        try:
            for fd in self.fds:
                self.ops.fsync(fd)
            if not self._dirs_synced:  # the shards' and the record's names, and the folder's own
                self._fsync_path(self.tmp)
                self._fsync_path(self.tmp.parent)
                self._dirs_synced = True
            self._durable = max(self._durable, count)
            self._write_record()
            self.ops.fsync(self._progress)
        except BaseException as e:  # raised again on the writer thread, by the next _join_syncer
            self._sync_error = e

    def _join_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._sync_error is not None:
            e, self._sync_error = self._sync_error, None
            raise e

    def _write_record(self) -> None:
        with self._record_lock:  # the newest counts, so the file never goes back to an older pair
            record = _record(self.provenance.get("plan_id"), self.layout_id, self._done, self._durable, self._boot)
            _pwrite_all(self.ops, self._progress, record, 0)

    def _resumable(self) -> tuple[int, int] | None:
        """(tensors a rerun may skip, of which durable) from a record of this plan and layout, else None."""
        try:
            record = _parse_record((self.tmp / _PROGRESS).read_bytes())
        except OSError:
            return None
        if record is None or record.get("plan_id") != self.provenance.get("plan_id"):
            return None
        if record.get("layout") != self.layout_id:  # e.g. another --max-shard-size
            return None
        if not all((self.tmp / n).is_file() for n in self.names):
            return None
        done, durable, boot = record.get("tensors_done"), record.get("durable"), record.get("boot")
        if not isinstance(done, int) or not isinstance(durable, int) or not 0 <= durable <= done:
            return None
        if boot is None or boot != self._boot:  # restarted since (or another node): the page cache is gone
            done = durable
        return (done, durable) if done > 0 else None

    def _lock(self) -> None:
        self._lock_fd = os.open(self.tmp, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutputError(f"{self.final}: another ckptavg process is writing this output") from e

    def _remove_stale(self) -> None:
        """Temporary folders of other plans for this output: left by killed runs, useless now (and what a
        killed commit set aside: a file or a symlink under a temporary name)."""
        for p in temp_paths(self.final):
            if p == self.tmp:
                continue
            if p.is_symlink() or not p.is_dir():
                _remove(p)
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive: another process works on it
            finally:
                os.close(fd)
            shutil.rmtree(p, ignore_errors=True)

    def write(self, name: str, start: int, data: torch.Tensor) -> None:
        raw = memoryview(data.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
        try:
            for target in (name, *self.aliases_of.get(name, ())):
                slot = self.slots[target]
                _pwrite_all(self.ops, self.fds[slot.fd_index], raw, slot.offset + start * slot.itemsize)
                self._unsynced += len(raw)
        except OSError as e:
            raise _os_error(e, self.final, self.total_size) from e

    def commit(self) -> Path:
        """Make every file in the folder durable, then rename it into place (and make that durable)."""
        ops = self.ops
        try:
            self._join_syncer()
            if len(self.shards) > 1:
                weight_map = {n: self.names[i] for i, s in enumerate(self.shards) for n, _ in s}
                index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
                (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for name, f in self.extra_files.items():  # the names of sources/extras.py: plain file names
                if name == "config.json" and self.config_dtype:
                    _write_config_dtype(f, self.tmp / name, self.config_dtype)
                else:
                    shutil.copy2(f, self.tmp / name)
            (self.tmp / PROVENANCE_FILE).write_text(json.dumps(self.provenance, indent=2, sort_keys=True) + "\n")
            for p in sorted(self.tmp.iterdir()):  # what we wrote here, and what the caller added (ckpt.pt)
                if p.name not in self.names and p.name != _PROGRESS and p.is_file():
                    self._fsync_path(p)
            for fd in self.fds:
                ops.fsync(fd)
                ops.close(fd)
            self.fds = []
            ops.close(self._progress)
            self._progress = -1
            (self.tmp / _PROGRESS).unlink()
            self._fsync_path(self.tmp)  # every name in it, before the folder can appear under its own
            old = None
            if os.path.lexists(self.final):  # a folder, a file, or a symlink (dangling or not)
                if not self.overwrite:
                    raise OutputError(f"{self.final}: appeared while we were writing it; not replaced")
                old = _temp_name(self.final, f"old-{os.getpid()}")
                _remove(old)  # a killed commit's, if the pid came round again
                os.rename(self.final, old)  # a symlink is renamed itself: what it points to is never touched
            try:
                os.rename(self.tmp, self.final)
            except OSError:
                if old is not None:  # put back what was there
                    try:
                        os.rename(old, self.final)
                    except OSError:
                        pass
                raise
            try:
                self._fsync_path(self.final.parent)
            finally:  # the output is in place: what it replaced goes, whatever the fsync said
                if old is not None:
                    _remove(old)
            self._unlock()
        except OSError as e:
            self.abort()
            raise _os_error(e, self.final, self.total_size) from e
        return self.final

    def abort(self, keep: bool = False) -> None:
        """Close everything; remove the temporary folder unless ``keep`` (to resume it later, from what
        is durable: a best-effort ``sync`` first)."""
        try:
            if keep and self._progress >= 0:
                self.sync()
            else:
                self._join_syncer()  # it uses the files closed below
        except (OSError, OutputError):
            pass
        for fd in [*self.fds, self._progress]:
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass
        self.fds = []
        self._progress = -1
        if not keep and self._lock_fd >= 0:  # only a folder we hold: never another process's
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _fsync_path(self, path: Path) -> None:
        fd = self.ops.open(path, os.O_RDONLY, 0)
        try:
            self.ops.fsync(fd)
        finally:
            self.ops.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _record(plan_id: object, layout: str, done: int, durable: int, boot: str | None) -> bytes:
    """progress.json: both counts, what they count, the boot they were made in, and a checksum."""
    body = {"plan_id": plan_id, "layout": layout, "tensors_done": done, "durable": durable, "boot": boot}
    check = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    raw = json.dumps({**body, "check": check}, separators=(",", ":")).encode()
    if len(raw) > _PROGRESS_WIDTH:
        raise ValueError(f"progress record longer than {_PROGRESS_WIDTH} bytes: {raw!r}")
    return raw.ljust(_PROGRESS_WIDTH)


def _parse_record(raw: bytes) -> dict[str, object] | None:
    """The record's fields, or None for anything else: empty, torn, garbage or an old format."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    check = record.pop("check", None)
    body = json.dumps(record, sort_keys=True).encode()
    if not isinstance(check, str) or hashlib.sha256(body).hexdigest()[:16] != check:
        return None
    return record


def _pwrite_all(ops: FileOps, fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += ops.pwrite(fd, view[done:], offset + done)


def _write_config_dtype(src: Path, dst: Path, dtype: str) -> None:
    """Copy a transformers config.json, setting its dtype (``torch_dtype`` before transformers 5)."""
    try:
        config = json.loads(src.read_text())
    except ValueError:
        shutil.copy2(src, dst)  # not ours to judge: copied as it is
        return
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "dtype":
            config[key] = dtype
    dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _os_error(e: OSError, target: Path, nbytes: int) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{target}: no space left on device (this output needs {nbytes / 1e9:.2f} GB)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{target}: cannot write there ({e.strerror})")
    return OutputError(f"{target}: {e.strerror or e}")
