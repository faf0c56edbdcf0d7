"""Runs on the Hugging Face Hub: one revision per step (Pythia: branches step1000, step2000, ...).

Planning reads the revision list, file lists, the small index files of sharded checkpoints and each
weight file's header (by HTTP range): every tensor's name, shape and dtype is checked before any
weight is downloaded. Averaging then downloads files into huggingface_hub's cache layout
(``blobs/<etag>`` linked from ``snapshots/<commit>/<file>``), shard by shard (see ``schedule.py``), and
reads them like local files. Provenance names the repository, each revision and its commit hash, never
a token.

Every request goes through one retry policy (``retry.py``). Every value from the server that becomes
part of a path (file names, index entries, revision names, commit hashes, ETags) is checked first.
Downloads go to a file of this process's own and are published by rename, so no correctness rests on
file locks, which Lustre, GPFS and some NFS mounts do not honour (see ``_download_blob``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from threading import Event
from typing import Any, BinaryIO, cast
from urllib.parse import quote, urldefrag, urljoin, urlsplit

from ckptavg.errors import (
    CacheDirError,
    HubError,
    InvalidCheckpointError,
    RevisionMovedError,
    StepNotFoundError,
    UnsafeServerValueError,
)
from ckptavg.progress import one_line
from ckptavg.sources.checkpoint import Checkpoint, TensorEntry, TensorInfo
from ckptavg.sources.extras import is_extra_file
from ckptavg.sources.hf_folder import WEIGHT_FILES, open_weight_file
from ckptavg.sources.http_range import RangeReader
from ckptavg.sources.index import MAX_INDEX_BYTES, shard_files
from ckptavg.sources.retry import BodyCutShort, Cancelled, RetryPolicy
from ckptavg.sources.revisions import DEFAULT_PATTERN, RevisionPattern
from ckptavg.sources.safetensors_file import read_safetensors_header
from ckptavg.sources.source import Listing
from ckptavg.sources.torch_file import read_torch_structure, state_dict_entries
from ckptavg.tokens import public_url

MAX_TREE_PAGES = 1000  # a revision's file list is a page or two; this many means the pages never end


# A partial download left by another host counts as abandoned once unmodified this long. A live download
# writes every few seconds and waits at most a minute between retries (``RetryPolicy.max_delay``); half
# an hour leaves room for clocks that differ between nodes. Adopting a live one is still safe: both
# processes write the same bytes at the same offsets, and an adopted partial is checked against its
# ETag (a sha256) before it is published.
STALE_PARTIAL_SECONDS = 30 * 60
_PARTIAL = re.compile(r"^(?P<etag>[^.]+)(?:\.ckptavg-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8})?\.incomplete$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ETAG = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubSource:
    """One repository (implements ``Source``): its step revisions, and how to plan and fetch each."""

    def __init__(
        self,
        repo: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        pattern: RevisionPattern = DEFAULT_PATTERN,
        allow_legacy: bool = False,
        retry_time: float | None = None,
        retry: RetryPolicy | None = None,
    ):
        from huggingface_hub import HfApi

        self.repo = repo
        self.label = repo
        self.discovered_from: str | None = None  # nothing local is discovered as input
        # Without a user:password@ part: provenance goes wherever the outputs go.
        self.origin: dict[str, Any] = {"repo": repo, "endpoint": public_url(endpoint), "revision_pattern": pattern.text}
        self.retry = retry or RetryPolicy.with_total(retry_time)
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = cache_dir
        self.allow_legacy = allow_legacy
        self.api = HfApi(endpoint=endpoint, token=token)
        self._held: dict[tuple[str, str], list[int]] = {}  # (commit, file) -> its locks, held while in use
        from huggingface_hub import constants

        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.repo_cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        if self.offline:  # HF_HUB_OFFLINE=1: the revisions this cache has seen, as the client recorded them
            refs_dir = self.repo_cache / "refs"
            names = {p.name: p.read_text().strip() for p in refs_dir.iterdir()} if refs_dir.is_dir() else {}
            source = f"the cache's {refs_dir}"
        else:
            _check_cache_dir(Path(cache_dir or constants.HF_HUB_CACHE))
            refs = self._call(
                lambda: self.retry.call(lambda: self.api.list_repo_refs(repo), where=repo, action="listing its refs"),
                what="list its revisions",
            )
            names = {b.name: b.target_commit for b in [*refs.branches, *refs.tags]}
            source = "the refs listing"
        for name, commit in names.items():
            _check_path(name, f"{repo}: revision name", source)
            _check_commit(commit, f"{repo}@{name}", source)
        # step -> (revision name, commit): the step is read from the name (revisions.py)
        self.revisions = {s: (n, names[n]) for s, n in pattern.steps(names, repo).items()}
        if not names and self.offline:
            raise HubError(f"{repo}: HF_HUB_OFFLINE is set and {self.repo_cache} holds no revision of it", repo=repo)
        if not self.revisions:
            has = f"{'its cache holds' if self.offline else 'it has'} {_count(len(names))}"
            raise HubError(_no_match(repo, pattern, names, has), repo=repo)

    def _call(self, fn: Any, *, what: str) -> Any:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.repo} on {public_url(self.endpoint) or 'the Hugging Face Hub'}"
        try:
            return fn()
        except (GatedRepoError, RepositoryNotFoundError) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 403:
                raise HubError(
                    f"{where}: access refused (HTTP 403); this token cannot read it (gated: accept its terms "
                    "on the Hub with the token's account)",
                    repo=self.repo,
                    status=403,
                ) from e
            if status == 401 or isinstance(e, GatedRepoError):
                raise HubError(
                    f"{where}: access refused; a token is needed (--token or HF_TOKEN)", repo=self.repo, status=status
                ) from e
            raise HubError(
                f"{where}: repository not found (or private: pass --token)", repo=self.repo, status=status
            ) from e
        except RevisionNotFoundError as e:
            raise HubError(f"{where}: revision not found while trying to {what}", repo=self.repo, status=404) from e
        except EntryNotFoundError as e:
            raise HubError(f"{where}: file not found while trying to {what}", repo=self.repo, status=404) from e
        except LocalEntryNotFoundError as e:
            raise HubError(
                f"{where}: not in the local cache and the Hub cannot be reached ({what})", repo=self.repo
            ) from e
        except HfHubHTTPError as e:
            code = getattr(getattr(e, "response", None), "status_code", None)
            raise HubError(
                f"{where}: the server answered HTTP {code or '?'} while trying to {what}", repo=self.repo, status=code
            ) from e
        except Exception as e:
            # The client's transport errors (connection refused, dropped mid-file after its retries,
            # timeouts) come from its HTTP library, whose name changes between versions: match on that.
            if isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith(("httpx", "httpcore")):
                first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
                raise HubError(f"{where}: cannot {what} ({e.__class__.__name__}: {first})", repo=self.repo) from e
            raise

    def _download_cached(self, step: int, filename: str) -> Path:
        """Offline (HF_HUB_OFFLINE=1): the client finds the file in its cache without any request."""
        from huggingface_hub import hf_hub_download

        name, commit = self.revisions[step]
        path = Path(
            self._call(
                lambda: hf_hub_download(
                    self.repo,
                    filename,
                    revision=name,
                    cache_dir=self.cache_dir,
                    endpoint=self.endpoint,
                    token=self.token,
                ),
                what=f"download {filename} of {name}",
            )
        )
        if commit not in path.parts:
            raise RevisionMovedError(self.repo, name)
        return path

    def _download(self, step: int, filename: str, size: int | None, cancel: Event | None = None) -> Path:
        """A file into the cache as ``hf_hub_download`` lays it out: ``blobs/<etag>``, linked from
        ``snapshots/<commit>/<file>``, and ``refs/<revision>`` (so HF_HUB_OFFLINE finds it later).

        Not through ``hf_hub_download``: it retries on its own (a double retry under two clocks) and
        deletes its partial file when a call fails, so a killed 10 GB download would start over."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        name, commit = self.revisions[step]
        where = f"{self.repo}@{name}/{filename}"
        url = hf_hub_url(self.repo, filename, revision=commit, endpoint=self.endpoint)
        meta = self.retry.call(
            lambda: get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint),
            where=where,
            action="asking for its size and ETag (HEAD)",
        )
        if size is not None and meta.size != size:
            raise HubError(
                f"{where}: the server announces {meta.size} bytes but listed {size}",
                repo=self.repo,
                revision=name,
                filename=filename,
            )
        if meta.etag is None or meta.location is None or meta.size is None:
            raise HubError(
                f"{where}: the server sent no ETag or size; cannot cache it",
                repo=self.repo,
                revision=name,
                filename=filename,
            )
        if meta.commit_hash is not None and meta.commit_hash != commit:
            _check_commit(meta.commit_hash, where, "the X-Repo-Commit of its HEAD")
            raise RevisionMovedError(self.repo, name)
        etag = _check_etag(meta.etag, where, "the ETag of its HEAD")
        blobs = self.repo_cache / "blobs"
        blob = blobs / etag
        link = self.repo_cache / "snapshots" / commit / filename
        blobs.mkdir(parents=True, exist_ok=True)
        while True:
            with self._blob_lock(etag):  # only so that two tasks on one node download it once
                if not blob.exists():
                    self._download_blob(blob, meta.location, meta.size, where, cancel)
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

    def _download_blob(self, blob: Path, url: str, size: int, where: str, cancel: Event | None = None) -> None:
        """Download ``blob`` into a partial file named for this process (host, pid, random) with
        positional writes at the offsets received, then publish it by ``os.replace`` once its size is
        checked. Where locks are not honoured two processes may both download a file: each writes its
        own partial, and either rename leaves the same bytes. A partial of a run that was killed (its
        process is gone, or it was left untouched for ``STALE_PARTIAL_SECONDS`` on another host) is
        adopted by renaming it, and continued by HTTP range."""
        etag = blob.name
        mine = blob.parent / f"{etag}.ckptavg-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.incomplete"
        adopted = _adopt_partial(blob.parent, etag, mine)
        fd = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
        published = False
        try:
            have = os.fstat(fd).st_size
            if have > size:  # not a prefix of this file
                os.ftruncate(fd, 0)
                have = 0
            attempts = self.retry.attempts(where, "downloading it", cancel)
            while True:
                while have < size:
                    got = [have]
                    try:
                        self._get_into(url, fd, have, size, got, where, cancel)
                    except Exception as e:
                        if got[0] > have:
                            attempts.progressed()
                        have = max(have, got[0])
                        if not attempts.retry(e):
                            raise
                    have = max(have, got[0])
                if adopted and _SHA256.fullmatch(etag) and _sha256(fd) != etag:
                    os.ftruncate(fd, 0)  # what another process left was not this file's bytes: start over
                    have, adopted = 0, False
                    continue
                break
            if os.fstat(fd).st_size != size:
                raise HubError(f"{where}: downloaded {os.fstat(fd).st_size} bytes, expected {size}")
            os.fsync(fd)  # the bytes are durable before the name that vouches for them
            try:
                os.replace(mine, blob)
            except FileNotFoundError as e:  # another process took our partial for abandoned and finished it
                if not blob.exists():
                    raise HubError(f"{where}: another process took over this download; run the command again") from e
            published = True
        finally:
            os.close(fd)
            if not published:
                try:
                    if mine.stat().st_size == 0:  # keep bytes for a later run to continue; not an empty file
                        mine.unlink()
                except FileNotFoundError:
                    pass
        for p, _ in _abandoned_partials(blob.parent, etag):  # others' leftovers of the same file
            p.unlink(missing_ok=True)

    def _get_into(
        self, url: str, fd: int, start: int, size: int, got: list[int], where: str, cancel: Event | None = None
    ) -> None:
        """One GET of the file from byte ``start``, written at its offsets; ``got[0]`` follows the
        bytes written, so a dropped connection is continued from there. ``cancel`` stops it between
        chunks (the run using it ended), leaving what it wrote for a later run to continue."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        # The token goes to the Hub, not to a storage host its HEAD redirected to (a signed URL needs none).
        same_host = _same_origin(url, self.api.endpoint)
        headers = build_hf_headers(token=self.token if same_host else False)
        headers["Accept-Encoding"] = "identity"  # the bytes of the file, counted as its size counts them
        if start:
            headers["Range"] = f"bytes={start}-"
        with get_session().stream(
            "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True
        ) as response:
            hf_raise_for_status(response)
            offset = start if response.status_code == 206 else 0  # 200: the server ignored Range
            length = response.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or offset + int(length) != size):
                sent = f"{offset + int(length)} bytes" if length.isdigit() else f"Content-Length {length!r}"
                raise HubError(
                    f"{where}: the server sends {sent} of a file its HEAD announced as {size} bytes; "
                    "it may have changed on the server: run the same command again"
                )
            for chunk in response.iter_bytes():
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{where}: the run using it ended")
                if offset + len(chunk) > size:
                    raise HubError(f"{where}: the server sent more than the {size} bytes it announced")
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, offset)
                    offset += n
                    view = view[n:]
                got[0] = offset
        if offset < size:
            raise BodyCutShort(f"after {offset} of {size} bytes")

    @contextmanager
    def _blob_lock(self, etag: str) -> Iterator[None]:
        """An exclusive flock while a blob is downloaded: on a node where locks work, a second task
        waits and then finds the file there. Correctness never rests on it."""
        import fcntl

        path = self._lock_dir("blobs") / f"{etag}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def use(self, step: int, filename: str, size: int | None = None, cancel: Event | None = None) -> tuple[Path, bool]:
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
                if not self.offline:
                    what = f"download {filename} of {name}"
                    link = self._call(lambda: self._download(step, filename, size, cancel), what=what)
                else:  # the client links a blob that may be shared
                    with self._repo_lock(exclusive=False):
                        link = self._download_cached(step, filename)
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

    def files(self, step: int) -> dict[str, int]:
        """The files of a step's revision and their sizes, as the server lists them (or the cache holds)."""
        name, commit = self.revisions[step]
        if self.offline:
            snapshot = self.repo_cache / "snapshots" / commit
            cached = [p for p in snapshot.rglob("*") if p.is_file()] if snapshot.is_dir() else []
            return {str(p.relative_to(snapshot)): p.stat().st_size for p in cached}
        listing = self._call(lambda: self._list_tree(name, commit), what=f"list {name}")
        files: dict[str, int] = {}
        for entry in listing:
            if not isinstance(entry, dict) or entry.get("type") != "file":
                continue
            path = _check_path(entry.get("path"), f"{self.repo}@{name}: file name", "the tree listing")
            if isinstance(entry.get("size"), int):
                files[path] = entry["size"]
        return files

    def _list_tree(self, name: str, commit: str) -> list[Any]:
        """The tree listing's entries, page by page, each page under the retry policy (``HfApi.list_repo_tree``
        would retry each page itself first, for up to 23 s)."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self.token)
        url: str | None = f"{self.api.endpoint}/api/models/{self.repo}/tree/{quote(commit, safe='')}"
        params: dict[str, str] | None = {"recursive": "false", "expand": "false"}
        entries: list[Any] = []
        seen: set[str] = set()
        while url is not None:

            def page(url: str = url, params: dict[str, str] | None = params) -> Any:
                response = get_session().get(
                    url, params=params, headers=headers, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=True
                )
                hf_raise_for_status(response)
                return response

            response = self.retry.call(page, where=f"{self.repo}@{name}", action="listing its files")
            try:
                body = response.json()
            except ValueError as e:
                raise HubError(f"{self.repo}@{name}: the tree listing is not JSON") from e
            if not isinstance(body, list):
                raise HubError(f"{self.repo}@{name}: the tree listing is not a list")
            entries += body
            url, params = self._next_page(response, url, seen, name), None
        return entries

    def _next_page(self, response: Any, url: str, seen: set[str], name: str) -> str | None:
        """The next page a tree listing links to: on the endpoint's host (the token goes with it), and
        never one already listed (a server whose pages loop would otherwise be listed forever)."""
        link = response.links.get("next", {}).get("url")
        if link is None:
            return None
        where = f"{self.repo}@{name}: the tree listing's next page {link!r}"
        if not isinstance(link, str):
            raise UnsafeServerValueError(f"{where} is not a URL")
        following = urldefrag(urljoin(url, link)).url  # a fragment is never sent: not a new page
        if not _same_origin(following, self.api.endpoint):
            host = public_url(self.api.endpoint)
            raise UnsafeServerValueError(f"{where} is on another host than {host}; not followed")
        if following in seen or len(seen) >= MAX_TREE_PAGES:
            raise HubError(f"{where} was listed before (or is page {MAX_TREE_PAGES + 1}): the pages do not end")
        seen.add(following)
        return following

    def weight_files(self, step: int, sizes: dict[str, int]) -> tuple[str, list[str]]:
        """The format of a revision's weights and their files (the shards an index names)."""
        name, _ = self.revisions[step]
        found = next(((n, fmt) for n, fmt in WEIGHT_FILES if n in sizes), None)
        if found is None:
            raise InvalidCheckpointError(
                f"{self.repo}@{name}", f"no weights in a supported format (has {', '.join(sorted(sizes)) or 'nothing'})"
            )
        weight, fmt = found
        if not weight.endswith(".index.json"):
            return fmt, [weight]
        if sizes[weight] > MAX_INDEX_BYTES:
            raise InvalidCheckpointError(
                f"{self.repo}@{name}/{weight}", f"{sizes[weight]} bytes, too large for an index"
            )
        path, _ = self.use(step, weight, sizes[weight])
        try:
            shards = shard_files(path.read_bytes(), f"{self.repo}@{name}/{weight}")
        finally:
            self.done_with(step, weight)
        for shard in shards:
            if shard not in sizes:
                raise InvalidCheckpointError(f"{self.repo}@{name}", f"{weight} names {shard}, which is not there")
        return fmt, shards

    def _stream(self, step: int, filename: str, size: int) -> BinaryIO:
        """A weight file to read headers from: the cached copy if there is one, else HTTP ranges."""
        _, commit = self.revisions[step]
        cached = self.repo_cache / "snapshots" / commit / filename
        if cached.is_file():
            return open(cached, "rb")
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        name, _ = self.revisions[step]
        url = hf_hub_url(self.repo, filename, revision=commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        where = f"{self.repo}@{name}/{filename}"
        return cast(BinaryIO, RangeReader(url, size, headers, retry=self.retry, where=where))

    def steps(self) -> list[int]:
        return sorted(self.revisions)

    def checkpoints(self, steps: Iterable[int]) -> dict[int, Checkpoint]:
        """Headers of several revisions at once: each is a few round trips, so they are read in parallel."""
        wanted = sorted(set(steps))
        missing = [s for s in wanted if s not in self.revisions]
        if missing:
            raise StepNotFoundError(missing, self.revisions, self.repo)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {s: pool.submit(self.plan_checkpoint, s) for s in wanted}
        failed = [e for f in futures.values() if (e := f.exception()) is not None]
        if len(failed) > 1 and all(isinstance(e, InvalidCheckpointError) for e in failed):
            listed = "; ".join(str(e) for e in failed[:5]) + (
                f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
            )
            raise InvalidCheckpointError(self.repo, f"{len(failed)} revisions cannot be used: {listed}")
        if failed:
            raise failed[0]
        return {s: f.result() for s, f in futures.items()}

    def listing(self, step: int) -> Listing:
        """Format, weight files and bytes to download (weights, config, tokenizer), for ``ls``: from the file
        list (and the index of a sharded revision), without reading any header."""
        sizes = self.files(step)
        fmt, weights = self.weight_files(step, sizes)
        nbytes = sum(n for f, n in sizes.items() if f in weights or is_extra_file(f))
        name, _ = self.revisions[step]
        shards = f" ({len(weights)} shards)" if len(weights) > 1 else ""
        return Listing(fmt + shards, nbytes, f"{self.repo}@{name}", name)

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
                raise InvalidCheckpointError(label, f"tensor '{dup[0]}' appears in more than one shard")
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
            {f: n for f, n in sizes.items() if is_extra_file(f)},
            label=label,
            format=fmt,
            planned=planned,
        )
        meta: dict[str, object] = {"hub": {"repo": self.repo, "revision": name, "commit": commit}}
        return Checkpoint(step, label, fmt, entries, aliases, meta=meta, remote=remote, name=name)


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

    def download(self, filename: str, cancel: Event | None = None) -> tuple[Path, bool]:
        path, fetched = self.hub.use(self.step, filename, self.sizes.get(filename), cancel)
        expected = self.sizes.get(filename, self.extras.get(filename))
        got = path.stat().st_size
        if expected is not None and got != expected:
            self.hub.done_with(self.step, filename)
            name, _ = self.hub.revisions[self.step]
            raise HubError(
                f"{self.hub.repo}@{name}/{filename}: the cache holds {got} bytes but the server lists {expected}",
                repo=self.hub.repo,
                revision=name,
                filename=filename,
            )
        return path, fetched

    def done_with(self, filename: str, *, keep: bool = False) -> None:
        self.hub.done_with(self.step, filename, keep=keep)

    def local_entries(self, filename: str, local: Path) -> dict[str, TensorEntry]:
        """Where the tensors of ``filename`` are in its downloaded copy, checked against the plan's header."""
        part, _ = open_weight_file(local, self.format, allow_legacy=self.hub.allow_legacy)
        if {n: e.info for n, e in part.items()} != self.planned[filename]:
            raise InvalidCheckpointError(
                f"{self.label}/{filename}", "the downloaded file's tensors differ from its header as read when planning"
            )
        return part


def _same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port: the token goes nowhere else (an endpoint's ``user:password@`` part is
    not part of where a request goes, and an https endpoint's token never goes over http)."""
    try:
        x, y = urlsplit(a), urlsplit(b)
        return (x.scheme.lower(), x.hostname, x.port) == (y.scheme.lower(), y.hostname, y.port)
    except ValueError:  # a port that is not a number
        return False


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


def _count(n: int) -> str:
    return "1 revision" if n == 1 else f"{n} revisions"


def _no_match(repo: str, pattern: RevisionPattern, names: Iterable[str], has: str) -> str:
    """What a repository whose revisions the pattern misses has instead: a few of their names, sorted."""
    listed = sorted(names)
    shown = ", ".join(one_line(n) for n in listed[:5])
    shown = f", e.g. {shown}, ..." if len(listed) > 5 else f": {shown}" if listed else ""
    return f"{repo}: no revision matches {pattern.text!r} (--revision-pattern); {has}{shown}"


# ---------------------------------------------------------------- values from the server, before paths


def _check_path(value: object, what: str, source: str) -> str:
    """A file name (or revision name) from the server: a relative path of plain parts, so that
    ``snapshots/<commit>/<value>`` and ``refs/<value>`` stay inside the repository's cache folder."""
    if (
        not isinstance(value, str)
        or not value
        or "\\" in value
        or _CONTROL.search(value)
        or value.startswith("/")
        or any(part in ("", ".", "..") for part in value.split("/"))
    ):
        raise UnsafeServerValueError(
            f"{what} {value!r} from {source} is not a relative path inside the repository; refusing it"
        )
    return value


def _check_commit(value: object, where: str, source: str) -> str:
    if not isinstance(value, str) or not _COMMIT.fullmatch(value):
        raise UnsafeServerValueError(f"{where}: commit hash {value!r} from {source} is not 40 hex digits; refusing it")
    return value


def _check_etag(value: str, where: str, source: str) -> str:
    if not _ETAG.fullmatch(value):
        raise UnsafeServerValueError(
            f"{where}: {source} {value!r} is not a safe file name (letters, digits, '.', '_', '-'); refusing it"
        )
    return value


def _check_cache_dir(path: Path) -> None:
    """The download cache must be (or can become) a writable folder: one line, not a traceback later."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise CacheDirError(path, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheDirError(path, f"{probe} is not writable")


# ---------------------------------------------------------------- partial downloads


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _abandoned_partials(blobs: Path, etag: str) -> list[tuple[Path, int]]:
    """Partial downloads of ``etag`` whose owner is gone (this host, pid not running) or that nobody
    has touched for ``STALE_PARTIAL_SECONDS`` (another host, or an older ckptavg's ``<etag>.incomplete``),
    with their sizes, largest first."""
    found = []
    host, now = _host(), time.time()
    for p in blobs.glob(f"{etag}.*incomplete"):
        m = _PARTIAL.fullmatch(p.name)
        if m is None or m["etag"] != etag:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if m["host"] == host and m["pid"] is not None:
            if _alive(int(m["pid"])):
                continue
        elif now - st.st_mtime < STALE_PARTIAL_SECONDS:
            continue
        found.append((p, st.st_size))
    return sorted(found, key=lambda f: -f[1])


def _adopt_partial(blobs: Path, etag: str, mine: Path) -> bool:
    """Take the largest abandoned partial of ``etag`` as ``mine`` by renaming it (atomic: of two
    processes adopting the same file, one gets it and the other finds it gone)."""
    for p, _ in _abandoned_partials(blobs, etag):
        try:
            os.rename(p, mine)
        except FileNotFoundError:
            continue
        return True
    return False


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 1 << 24, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()
