"""Write one output model folder by streaming tensor chunks into safetensors files, atomically.

Shapes and dtypes are known before any byte is computed, so every shard's header is written first and
chunks land at their final offsets with ``pwrite`` as the engine produces them; no shard is ever held in
memory. Space for every file is reserved up front (a full disk fails before the work, not after). The
folder is built under a hidden temporary name beside the target and renamed into place only when
complete, so a folder with the target's name is always whole; ``ckptavg.json`` inside it says which plan
made it, which is how a rerun recognises finished outputs and skips them.

The temporary name carries the plan's id, and a small ``progress.json`` in it counts the tensors fully
written. A run killed outright (SIGKILL, out of memory, a lost node) leaves that folder behind, and the
same command later resumes after the last finished tensor instead of starting over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptavg.errors import OutputError
from ckptavg.sources import TensorInfo
from ckptavg.sources.hf_folder import PROVENANCE_FILE
from ckptavg.sources.safetensors_file import DTYPE_NAMES

TMP_MARK = ".ckptavg-tmp-"
_PROGRESS = "progress.json"  # inside the temporary folder only; never in a finished output
_PROGRESS_WIDTH = 128


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
    """One output folder; ``write`` chunks in any order, then ``commit`` or ``abort``."""

    def __init__(
        self,
        final: Path,
        tensors: list[tuple[str, TensorInfo]],
        *,
        aliases: dict[str, str],
        provenance: dict[str, object],
        extra_files: list[Path],
        config_dtype: str | None = None,
        max_shard_size: int,
        overwrite: bool,
    ) -> None:
        self.final = final
        self.overwrite = overwrite
        self.extra_files = extra_files
        self.config_dtype = config_dtype  # --dtype: config.json should announce the dtype we wrote
        self.provenance = provenance
        self.tmp = final.parent / f".{final.name}{TMP_MARK}{provenance.get('plan_id', os.getpid())}"
        self._lock_fd = -1
        self._progress = -1
        self._done = 0
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

        Returns how many tensors (in layout order) that earlier run had finished writing: the engine
        starts after them. The folder is locked (flock) so that two processes never write one output.
        """
        meta = {"format": "pt", "ckptavg": json.dumps(self.provenance, sort_keys=True)}
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self.tmp.mkdir(exist_ok=True)
            self._lock()  # before touching anything in it
            done = self._resumable()
            if done is None:
                for p in self.tmp.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                done = 0
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
                fd = os.open(self.tmp / self.names[i], flags, 0o644)
                self.fds.append(fd)
                size = data_start + begin
                if size:
                    os.posix_fallocate(fd, 0, size)
                os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
                begin = 0
                for name, info in shard:
                    self.slots[name] = _Slot(i, data_start + begin, info.dtype.itemsize)
                    begin += info.nbytes
            self._progress = os.open(self.tmp / _PROGRESS, os.O_RDWR | os.O_CREAT, 0o644)
            self.tensor_done(done)
        except OSError as e:
            self.abort()
            raise _os_error(e, self.final, self.total_size) from e
        return done

    def tensor_done(self, count: int) -> None:
        """Record that the first ``count`` tensors are fully written (what a resumed run may skip).

        Never goes back: a Hub run's unit may rewrite tensors this output already has, for a
        neighbouring output that had fewer."""
        count = self._done = max(count, self._done)
        record = json.dumps(
            {"plan_id": self.provenance.get("plan_id"), "layout": self.layout_id, "tensors_done": count}
        ).encode()
        os.pwrite(self._progress, record.ljust(_PROGRESS_WIDTH), 0)

    def _resumable(self) -> int | None:
        try:
            record = json.loads((self.tmp / _PROGRESS).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("plan_id") != self.provenance.get("plan_id"):
            return None
        if record.get("layout") != self.layout_id:  # e.g. another --max-shard-size
            return None
        if not all((self.tmp / n).is_file() for n in self.names):
            return None
        done = record.get("tensors_done")
        return done if isinstance(done, int) and done > 0 else None

    def _lock(self) -> None:
        self._lock_fd = os.open(self.tmp, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutputError(f"{self.final}: another ckptavg process is writing this output") from e

    def _remove_stale(self) -> None:
        """Temporary folders of other plans for this output: left by killed runs, useless now."""
        for p in self.final.parent.glob(f".{self.final.name}{TMP_MARK}*"):
            if p == self.tmp or not p.is_dir():
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
                offset = slot.offset + start * slot.itemsize
                fd = self.fds[slot.fd_index]
                done = 0
                while done < len(raw):
                    done += os.pwrite(fd, raw[done:], offset + done)
        except OSError as e:
            raise _os_error(e, self.final, self.total_size) from e

    def commit(self) -> Path:
        try:
            if len(self.shards) > 1:
                weight_map = {n: self.names[i] for i, s in enumerate(self.shards) for n, _ in s}
                index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
                (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for f in self.extra_files:
                if f.name == "config.json" and self.config_dtype:
                    _write_config_dtype(f, self.tmp / f.name, self.config_dtype)
                else:
                    shutil.copy2(f, self.tmp / f.name)
            (self.tmp / PROVENANCE_FILE).write_text(json.dumps(self.provenance, indent=2, sort_keys=True) + "\n")
            for fd in self.fds:
                os.fsync(fd)
                os.close(fd)
            self.fds = []
            os.close(self._progress)
            self._progress = -1
            (self.tmp / _PROGRESS).unlink()
            old = None
            if self.final.exists():
                if not self.overwrite:
                    raise OutputError(f"{self.final}: appeared while we were writing it; not replaced")
                old = self.final.parent / f".{self.final.name}{TMP_MARK}old-{os.getpid()}"
                os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            _fsync_dir(self.final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._unlock()
        except OSError as e:
            self.abort()
            raise _os_error(e, self.final, self.total_size) from e
        return self.final

    def abort(self, keep: bool = False) -> None:
        """Close everything; remove the temporary folder unless ``keep`` (to resume it later)."""
        for fd in [*self.fds, self._progress]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = []
        self._progress = -1
        if not keep and self._lock_fd >= 0:  # only a folder we hold: never another process's
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: OSError, target: Path, nbytes: int) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{target}: no space left on device (this output needs {nbytes / 1e9:.2f} GB)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{target}: cannot write there ({e.strerror})")
    return OutputError(f"{target}: {e.strerror or e}")
