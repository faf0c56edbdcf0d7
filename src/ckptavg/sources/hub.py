"""Runs on the Hugging Face Hub: one revision per step (Pythia: branches step1000, step2000, ...).

Planning reads the revision list, file lists, the small index files of sharded checkpoints and each
weight file's header (by HTTP range): every tensor's name, shape and dtype is checked before any
weight is downloaded. Averaging then downloads weight files with ``huggingface_hub`` into its usual
cache, shard by shard (see ``schedule.py``), and reads them like local files. Provenance names the
repository, each revision and its commit hash, never a token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from ckptavg.errors import CheckpointFormatError, CkptavgError
from ckptavg.sources.checkpoint import Checkpoint, TensorEntry, TensorInfo
from ckptavg.sources.hf_folder import WEIGHT_FILES, open_weight_file
from ckptavg.sources.http_range import RangeReader
from ckptavg.sources.safetensors_file import read_safetensors_header
from ckptavg.sources.torch_file import read_torch_structure, state_dict_entries

_EXTRA = re.compile(
    r"^(config\.json|generation_config\.json|special_tokens_map\.json|tokenizer.*|vocab\..*|merges\.txt)$"
)


def _template_regex(template: str) -> re.Pattern[str]:
    if "{step}" not in template:
        raise CkptavgError(f"--revision-template {template!r} needs a {{step}} placeholder")
    head, _, tail = template.partition("{step}")
    return re.compile(f"^{re.escape(head)}(\\d+){re.escape(tail)}$")


class HubSource:
    """One repository: its step revisions, and how to plan and fetch each."""

    def __init__(
        self,
        repo: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        template: str = "step{step}",
        allow_legacy: bool = False,
    ):
        from huggingface_hub import HfApi

        self.repo = repo
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = cache_dir
        self.allow_legacy = allow_legacy
        self.api = HfApi(endpoint=endpoint, token=token)
        self._held: dict[tuple[str, str], list[int]] = {}  # (commit, file) -> its locks, held while in use
        from huggingface_hub import constants

        pattern = _template_regex(template)
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.repo_cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        if self.offline:  # HF_HUB_OFFLINE=1: the revisions this cache has seen, as the client recorded them
            refs_dir = self.repo_cache / "refs"
            names = {p.name: p.read_text().strip() for p in refs_dir.iterdir()} if refs_dir.is_dir() else {}
        else:
            refs = self._call(lambda: self.api.list_repo_refs(repo), what="list its revisions")
            names = {b.name: b.target_commit for b in [*refs.branches, *refs.tags]}
        self.revisions: dict[int, tuple[str, str]] = {}
        for name, commit in names.items():
            m = pattern.match(name)
            if m:
                self.revisions[int(m.group(1))] = (name, commit)
        if not self.revisions and self.offline:
            raise CkptavgError(f"{repo}: HF_HUB_OFFLINE is set and {self.repo_cache} holds no revision of it")
        if not self.revisions:
            raise CkptavgError(f"{repo}: no revision matches {template!r} (use --revision-template)")

    def _call(self, fn: Any, *, what: str) -> Any:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.repo} on {self.endpoint or 'the Hugging Face Hub'}"
        try:
            return fn()
        except (GatedRepoError, RepositoryNotFoundError) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 403:
                raise CkptavgError(
                    f"{where}: access refused (HTTP 403); this token cannot read it (gated: accept its terms "
                    "on the Hub with the token's account)"
                ) from e
            if status == 401 or isinstance(e, GatedRepoError):
                raise CkptavgError(f"{where}: access refused; a token is needed (--token or HF_TOKEN)") from e
            raise CkptavgError(f"{where}: repository not found (or private: pass --token)") from e
        except RevisionNotFoundError as e:
            raise CkptavgError(f"{where}: revision not found while trying to {what}") from e
        except EntryNotFoundError as e:
            raise CkptavgError(f"{where}: file not found while trying to {what}") from e
        except LocalEntryNotFoundError as e:
            raise CkptavgError(f"{where}: not in the local cache and the Hub cannot be reached ({what})") from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise CkptavgError(f"{where}: the server answered HTTP {status} while trying to {what}") from e
        except Exception as e:
            # The client's transport errors (connection refused, dropped mid-file after its retries,
            # timeouts) come from its HTTP library, whose name changes between versions: match on that.
            if isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith(("httpx", "httpcore")):
                first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
                raise CkptavgError(f"{where}: cannot {what} ({e.__class__.__name__}: {first})") from e
            raise

    def _download(self, step: int, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        name, commit = self.revisions[step]
        path = Path(
            self._call(
                lambda: hf_hub_download(
                    self.repo,
                    filename,
                    revision=name,  # by name, so the cache records the branch for HF_HUB_OFFLINE
                    cache_dir=self.cache_dir,
                    endpoint=self.endpoint,
                    token=self.token,
                ),
                what=f"download {filename} of {name}",
            )
        )
        if commit not in path.parts:
            raise CkptavgError(f"{self.repo}@{name} moved to another commit while this run used it; run it again")
        return path

    def _download_resumable(self, step: int, filename: str, size: int) -> Path:
        """A weight file into the cache as ``hf_hub_download`` lays it out, but through a partial file
        that outlives the process: huggingface_hub 2.x resumes a dropped connection within one call,
        yet deletes its partial file when the call fails, so a killed 10 GB download would start over.
        Here ``blobs/<etag>.incomplete`` stays, and the next run continues it by HTTP range."""

        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        name, commit = self.revisions[step]
        url = hf_hub_url(self.repo, filename, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if meta.size != size:
            raise CkptavgError(
                f"{self.repo}@{name}/{filename}: the server announces {meta.size} bytes but listed {size}"
            )
        if meta.etag is None or meta.location is None:
            raise CkptavgError(f"{self.repo}@{name}/{filename}: the server sent no ETag; cannot cache it")
        blobs = self.repo_cache / "blobs"
        blob = blobs / meta.etag
        link = self.repo_cache / "snapshots" / commit / filename
        blobs.mkdir(parents=True, exist_ok=True)
        partial = blobs / f"{meta.etag}.incomplete"
        while True:
            self._fetch_blob(blob, partial, meta.location, filename, size)
            with self._repo_lock(exclusive=False):
                if not blob.exists():  # deleted by another process in between: fetch it again
                    continue
                link.parent.mkdir(parents=True, exist_ok=True)
                try:
                    link.symlink_to(os.path.relpath(blob, link.parent))
                except FileExistsError:  # another process sharing the cache linked it first
                    pass
                break
        ref = self.repo_cache / "refs" / name
        if not ref.exists():
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
        return link

    def _fetch_blob(self, blob: Path, partial: Path, url: str, filename: str, size: int) -> None:
        """Download into ``blob`` through ``partial``, unless it is there; one process at a time."""
        import fcntl

        while not blob.exists():
            with open(partial, "a+b") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # another process may be fetching the same file: wait for it
                try:
                    current = os.stat(partial).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    current = False
                if blob.exists():  # it finished while we waited; drop the empty file we may have made
                    if current and os.fstat(f.fileno()).st_size == 0:
                        partial.unlink()
                    break
                if not current:  # renamed or removed by the holder before us: open the new one
                    continue
                self._fetch_into(f, url, filename, size, partial)
                os.replace(partial, blob)

    def use(self, step: int, filename: str, size: int | None = None) -> tuple[Path, bool]:
        """One file of a revision in the cache, held in use until ``done_with``; and whether this call
        downloaded it. Another ckptavg process sharing the cache (a SLURM array's tasks share members at
        their boundaries) never deletes a file while this one holds it: users hold a shared flock on the
        file's lock, and only the last one out, taking it exclusively, deletes."""
        import fcntl

        name, commit = self.revisions[step]
        lock = self._lock_dir(commit) / f"{filename}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process deletes the file
            link = self.repo_cache / "snapshots" / commit / filename
            fetched = not link.exists()
            if fetched:
                (self._lock_dir(commit) / f"{filename}.ours").touch()  # ckptavg brings it in: ours to delete
                if size is not None and not self.offline:
                    what = f"download {filename} of {name}"
                    link = self._call(lambda: self._download_resumable(step, filename, size), what=what)
                else:  # small files, and offline mode; the client links a blob that may be shared
                    with self._repo_lock(exclusive=False):
                        link = self._download(step, filename)
        except BaseException:
            os.close(fd)
            raise
        self._held.setdefault((commit, filename), []).append(fd)
        return link, fetched

    def done_with(self, step: int, filename: str, *, keep: bool = False) -> None:
        """Release a file from ``use``; delete it if ckptavg downloaded it and no other process uses it,
        unless ``keep`` (a run that failed on a transient fault keeps its downloads for the next run)."""
        import fcntl

        _, commit = self.revisions[step]
        fds = self._held.get((commit, filename))
        if not fds:
            return
        fd = fds.pop()
        if keep:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # still in use elsewhere: the last user deletes it
            return
        try:
            ours = self._lock_dir(commit) / f"{filename}.ours"
            if ours.exists():
                with self._repo_lock(exclusive=True):
                    _evict(self.repo_cache / "snapshots" / commit / filename)
                ours.unlink()
        finally:
            os.close(fd)

    @contextmanager
    def _repo_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Revisions share blobs (the same tokenizer, config or index in every revision). Linking a blob
        holds this lock shared, and deleting a blob that no link uses any more holds it exclusively, so
        another process never links a blob in the instant it is deleted."""
        import fcntl

        path = self._lock_dir("") / "repo.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _lock_dir(self, commit: str) -> Path:
        # Under the cache's .locks, which huggingface_hub's cache scanning skips.
        return self.repo_cache.parent / ".locks" / "ckptavg" / self.repo_cache.name / commit

    def _fetch_into(self, f: BinaryIO, url: str, filename: str, size: int, partial: Path) -> None:
        """Continue a partial download held open (and locked) as ``f``, by HTTP range."""
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        resume = f.seek(0, os.SEEK_END)
        if resume > size:  # not a prefix of this file: start again
            f.truncate(0)
            resume = f.seek(0)
        try:
            http_get(
                url,
                f,
                resume_size=resume,
                headers=build_hf_headers(token=self.token),
                expected_size=size,
                displayed_filename=filename,
            )
        except BaseException:
            if f.seek(0, os.SEEK_END) == 0:
                partial.unlink(missing_ok=True)
            raise
        f.flush()

    def files(self, step: int) -> dict[str, int]:
        """The files of a step's revision and their sizes, as the server lists them (or the cache holds)."""
        name, commit = self.revisions[step]
        if self.offline:
            snapshot = self.repo_cache / "snapshots" / commit
            files = [p for p in snapshot.rglob("*") if p.is_file()] if snapshot.is_dir() else []
            return {str(p.relative_to(snapshot)): p.stat().st_size for p in files}
        listing = self._call(lambda: list(self.api.list_repo_tree(self.repo, revision=commit)), what=f"list {name}")
        return {f.path: f.size for f in listing if getattr(f, "size", None) is not None}

    def weight_files(self, step: int, sizes: dict[str, int]) -> tuple[str, list[str]]:
        """The format of a revision's weights and their files (the shards an index names)."""
        name, _ = self.revisions[step]
        found = next(((n, fmt) for n, fmt in WEIGHT_FILES if n in sizes), None)
        if found is None:
            raise CheckpointFormatError(
                f"{self.repo}@{name}: no weights in a supported format (has {', '.join(sorted(sizes)) or 'nothing'})"
            )
        weight, fmt = found
        if not weight.endswith(".index.json"):
            return fmt, [weight]
        path, _ = self.use(step, weight, sizes[weight])
        try:
            index = json.loads(path.read_text())
            shards = list(dict.fromkeys(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointFormatError(f"{self.repo}@{name}: {weight} is not a valid index ({e!r})") from e
        finally:
            self.done_with(step, weight)
        for shard in shards:
            if not isinstance(shard, str) or shard not in sizes:
                raise CheckpointFormatError(f"{self.repo}@{name}: {weight} names {shard}, which is not there")
        return fmt, shards

    def _stream(self, step: int, filename: str, size: int) -> BinaryIO:
        """A weight file to read headers from: the cached copy if there is one, else HTTP ranges."""
        _, commit = self.revisions[step]
        cached = self.repo_cache / "snapshots" / commit / filename
        if cached.is_file():
            return open(cached, "rb")
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo, filename, revision=commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        return cast(BinaryIO, RangeReader(url, size, headers))

    def summary(self, step: int) -> tuple[str, int, int]:
        """Format, number of weight files and bytes to download (weights, config, tokenizer), for ``ls``."""
        sizes = self.files(step)
        fmt, weights = self.weight_files(step, sizes)
        return fmt, len(weights), sum(n for f, n in sizes.items() if f in weights or _EXTRA.match(f))

    def plan_checkpoint(self, step: int) -> Checkpoint:
        """The checkpoint of ``step`` from its files' headers: every tensor's name, shape and dtype, so a
        plan is checked in full before any weight is downloaded. Reading needs ``remote`` downloads."""
        name, commit = self.revisions[step]
        sizes = self.files(step)
        fmt, weights = self.weight_files(step, sizes)
        label = f"{self.repo}@{name}"
        entries: dict[str, TensorEntry] = {}
        aliases: dict[str, str] = {}
        file_of: dict[str, str] = {}
        for f in weights:
            where = f"{label}/{f}"

            def read(f: str = f, where: str = where) -> tuple[dict[str, TensorEntry], dict[str, str]]:
                with self._stream(step, f, sizes[f]) as stream:
                    if isinstance(stream, RangeReader):
                        stream.warm(tail=fmt != "safetensors")
                    if fmt == "safetensors":
                        part = read_safetensors_header(stream, sizes[f], Path(f), where=where)[0]
                        return {n: TensorEntry(e.info, Path(f)) for n, e in part.items()}, {}
                    return state_dict_entries(Path(f), read_torch_structure(stream, where), None)

            part, part_aliases = self._call(read, what=f"read the header of {f} of {name}")
            dup = sorted(set(part) & set(entries))
            if dup:
                raise CheckpointFormatError(f"{label}: tensor '{dup[0]}' appears in more than one shard")
            entries.update(part)
            aliases.update(part_aliases)
            file_of.update(dict.fromkeys(part, f))
        planned: dict[str, dict[str, TensorInfo]] = {f: {} for f in weights}
        for n, f in file_of.items():
            planned[f][n] = entries[n].info
        remote = HubFiles(
            self,
            step,
            {f: sizes[f] for f in weights},
            file_of,
            {f: n for f, n in sizes.items() if _EXTRA.match(f)},
            label=label,
            format=fmt,
            planned=planned,
        )
        meta: dict[str, object] = {"hub": {"repo": self.repo, "revision": name, "commit": commit}}
        return Checkpoint(step, label, fmt, entries, aliases, meta=meta, remote=remote)


class HubFiles:
    """The files of one revision, downloaded into the huggingface_hub cache one at a time."""

    def __init__(
        self,
        hub: HubSource,
        step: int,
        sizes: dict[str, int],
        file_of: dict[str, str],
        extras: dict[str, int],
        *,
        label: str,
        format: str,
        planned: dict[str, dict[str, TensorInfo]],
    ) -> None:
        self.hub = hub
        self.step = step
        self.sizes = sizes
        self.file_of = file_of
        self.extras = extras
        self.label = label
        self.format = format
        self.planned = planned  # weight file -> its tensors as its header said when planning

    def download(self, filename: str) -> tuple[Path, bool]:
        path, fetched = self.hub.use(self.step, filename, self.sizes.get(filename))
        expected = self.sizes.get(filename, self.extras.get(filename))
        got = path.stat().st_size
        if expected is not None and got != expected:
            self.hub.done_with(self.step, filename)
            name, _ = self.hub.revisions[self.step]
            raise CkptavgError(
                f"{self.hub.repo}@{name}/{filename}: the cache holds {got} bytes but the server lists {expected}"
            )
        return path, fetched

    def done_with(self, filename: str, *, keep: bool = False) -> None:
        self.hub.done_with(self.step, filename, keep=keep)

    def local_entries(self, filename: str, local: Path) -> dict[str, TensorEntry]:
        """Where the tensors of ``filename`` are in its downloaded copy, checked against the plan's header."""
        part, _ = open_weight_file(local, self.format, allow_legacy=self.hub.allow_legacy)
        if {n: e.info for n, e in part.items()} != self.planned[filename]:
            raise CheckpointFormatError(
                f"{self.label}/{filename}: the downloaded file's tensors differ from its header as read when planning"
            )
        return part


def _evict(link: Path) -> None:
    """Delete a file from the huggingface_hub cache: its snapshot link, and the blob it points to unless
    another snapshot still links to it (revisions share blobs, e.g. an unchanged tokenizer)."""
    blob = link.resolve()
    link.unlink(missing_ok=True)
    if blob == link:  # a cache without symlinks holds copies
        return
    snapshots = blob.parent.parent / "snapshots"
    if not any(p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*")):
        blob.unlink(missing_ok=True)
