"""A Hub-like HTTP server on 127.0.0.1 for the real huggingface_hub client (see shared/notes/hub-protocol.md).

Repositories are folders: ``root/ORG/NAME/BRANCH/<files>``. Each branch has a fixed commit hash, and
revisions may be given as branch names or hashes, as the real Hub accepts. ``faults`` injects what the
real Hub can answer: ``{"status": 503}`` for every request, ``{"gated": {"ORG/NAME"}}`` for 401s and
``{"forbidden": {"ORG/NAME"}}`` for 403s (a gated repository without accepted terms),
``{"drop": {"pytorch_model.bin": n}}`` to cut the next n downloads of a file half way,
``{"short": {"pytorch_model.bin": n}}`` to send every download of it n bytes short of the size its HEAD
announced, ``{"slow": {"pytorch_model.bin": seconds}}`` to wait before answering. These hit downloads
(no Range, or an open one ``bytes=N-`` that resumes), not the closed ranges that read headers.
``{"unresolvable": {"pytorch_model.bin"}}`` lists a file but answers 404 when it is fetched, and
``{"rate": bytes}`` sends every response at most that fast per connection (a CDN's limit per stream).

``inject(kind, n, file=..., **fault)`` spoils the next ``n`` requests of one kind (``refs`` listing,
``tree`` listing, ``head`` of a file, header ``range`` GET, ``download`` GET: whole or an open range
``bytes=N-``), optionally only those of one file (its name, or ``REVISION/PATH`` as requested):
``status=503`` (429, 500, 502 ...; with ``retry_after="2"`` a Retry-After header) answers that status;
``hangup=True`` closes the connection without an answer; ``drop=True`` promises the body, sends half and
hangs up; ``stall=seconds`` sends half the body, waits, then the rest (a slow body); ``length=-10``
sends a complete answer that many bytes off the size announced; ``redirect=True`` (HEAD) sends the client to
``localhost`` for the bytes, as the Hub sends LFS files to a storage host.

Hostile values, as a broken or malicious server would send them: ``{"branches": {"../x": sha}}`` adds
branches to the refs listing, ``{"commits": {"step1000": "zz"}}`` replaces a branch's commit hash there,
``{"listed": {"../../evil.bin": 10}}`` adds entries to every tree listing, ``{"etags": {"config.json":
"a/b"}}`` replaces a file's ETag. ``{"page": n}`` answers tree listings in pages of n entries, linked by a
``Link: <...?cursor=N>; rel="next"`` header as the Hub's are.

``requests`` logs every request with its Range (``timed`` with its time.monotonic()), ``tokens`` its
Authorization header.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``. A run deletes files and folders while we look: those
    count as gone (os.walk skips folders that vanish)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


class PeakSize:
    """Samples ``tree_bytes(path)`` on a thread while the ``with`` block runs; ``peak`` is the largest."""

    def __init__(self, path: Path, every: float = 0.002) -> None:
        self.path, self.every, self.peak = path, every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            if self.path.exists():
                self.peak = max(self.peak, tree_bytes(self.path))
            time.sleep(self.every)

    def __enter__(self) -> PeakSize:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


KINDS = ("refs", "tree", "head", "range", "download")


def commit_of(repo: str, branch: str) -> str:
    return hashlib.sha1(f"{repo}@{branch}".encode()).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that hung up: expected
            return
        super().handle_error(request, client_address)


class HubServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, Any] = {}
        self.queued: dict[str, list[tuple[str | None, dict[str, Any]]]] = {k: [] for k in KINDS}
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.timed: list[tuple[float, str]] = []
        self.bytes_sent = 0  # body bytes of files sent (downloads and ranges), for benchmarks
        self.etags: dict[tuple[str, int, int], str] = {}
        self.tokens: list[str | None] = []  # the Authorization header of each request
        self.seen: list[tuple[str, str, str | None]] = []  # (Host, request, Authorization) of each request
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                server.handle(self, head=True)

            def do_GET(self) -> None:
                server.handle(self, head=False)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str, n: int = 1, *, file: str | None = None, **fault: Any) -> None:
        """Spoil the next ``n`` requests of ``kind`` (of ``file`` only, if given) with ``fault``."""
        assert kind in KINDS, kind
        with self.lock:
            self.queued[kind] += [(file, fault)] * n

    def take(self, kind: str, file: tuple[str, ...]) -> dict[str, Any]:
        with self.lock:
            for i, (only, _) in enumerate(self.queued[kind]):
                if only is None or only in file:
                    return self.queued[kind].pop(i)[1]
        return {}

    def pending(self) -> dict[str, int]:
        """Injected faults not yet served, per kind (a test asserts they all were)."""
        with self.lock:
            return {k: len(v) for k, v in self.queued.items() if v}

    # ------------------------------------------------------------------ routing

    def branches(self, repo: str) -> dict[str, str]:
        folder = self.root / repo
        return {p.name: commit_of(repo, p.name) for p in sorted(folder.iterdir()) if p.is_dir()}

    def resolve(self, repo: str, rev: str) -> tuple[str, Path] | None:
        for branch, sha in self.branches(repo).items():
            if rev in (branch, sha):
                return sha, self.root / repo / branch
        return None

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.urlsplit(h.path).path
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        rng = h.headers.get("Range")
        line = f"{h.command} {path}" + (f" [{rng}]" if rng else "")
        self.requests.append(line)
        self.timed.append((time.monotonic(), line))
        self.tokens.append(h.headers.get("Authorization"))
        self.seen.append((h.headers.get("Host", ""), line, h.headers.get("Authorization")))
        if "status" in self.faults:
            return self.send(h, self.faults["status"], b"unavailable", head)
        api = parts[:2] == ["api", "models"]
        kind, file_keys = None, ()
        if api and len(parts) == 5 and parts[4] == "refs":
            kind = "refs"
        elif api and len(parts) >= 6 and parts[4] == "tree":
            kind = "tree"
        elif not api and len(parts) >= 5 and parts[2] == "resolve":
            file_keys = (parts[-1], "/".join(parts[3:]))  # the file's name, or REVISION/PATH
            kind = "head" if head else "range" if rng and not rng.endswith("-") else "download"
        fault = self.take(kind, file_keys) if kind else {}
        h.fault = fault  # type: ignore[attr-defined]
        if fault.get("hangup"):
            h.close_connection = True
            return None
        if "status" in fault:
            extra = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            return self.send(h, fault["status"], b"unavailable", head, extra)
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo in self.faults.get("gated", set()):
            return self.send(h, 401, b"gated", head, {"X-Error-Code": "GatedRepo"})
        if repo in self.faults.get("forbidden", set()):
            return self.send(h, 403, b"forbidden", head, {"X-Error-Code": "GatedRepo"})
        if not (self.root / repo).is_dir():
            return self.send(h, 404, b"not found", head, {"X-Error-Code": "RepoNotFound"})
        if api and len(parts) == 5 and parts[4] == "refs":
            branches = {**self.branches(repo), **self.faults.get("branches", {})}
            branches.update({b: c for b, c in self.faults.get("commits", {}).items() if b in branches})
            refs = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in branches.items()]
            return self.json(h, {"branches": refs, "converts": [], "tags": []}, head)
        if api and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            found = self.resolve(repo, parts[5])
            if found is None:
                return self.send(h, 404, b"no revision", head, {"X-Error-Code": "RevisionNotFound"})
            sha, folder = found
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            entries = [
                {
                    "type": "file",
                    "path": str(p.relative_to(folder)),
                    "size": p.stat().st_size,
                    "oid": self.etag(p)[:40],  # a content hash, as git's blob id is
                }
                for p in files
            ]
            entries += [{"type": "file", "path": n, "size": size} for n, size in self.faults.get("listed", {}).items()]
            if parts[4] == "tree" and self.faults.get("page"):  # pages of that many entries, as the Hub's cursor
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
                at, size = int(query.get("cursor", ["0"])[0]), self.faults["page"]
                link = {}
                if at + size < len(entries):
                    link["Link"] = f'<{self.url}{path}?recursive=false&cursor={at + size}>; rel="next"'
                return self.json(h, entries[at : at + size], head, link)
            if parts[4] == "tree":
                return self.json(h, entries, head)
            siblings = [{"rfilename": e["path"], "size": e["size"]} for e in entries]
            return self.json(h, {"id": repo, "sha": sha, "siblings": siblings}, head)
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            found = self.resolve(repo, parts[3])
            if found is None:
                return self.send(h, 404, b"no revision", head, {"X-Error-Code": "RevisionNotFound"})
            sha, folder = found
            file = folder / "/".join(parts[4:])
            if not file.is_file() or file.name in self.faults.get("unresolvable", set()):
                return self.send(h, 404, b"no file", head, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            return self.file(h, file, sha, head)
        return self.send(h, 404, b"unknown route", head)

    # ------------------------------------------------------------------ responses

    def send(
        self, h: BaseHTTPRequestHandler, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None
    ) -> None:
        fault = getattr(h, "fault", {}) if status == 200 else {}
        promised = len(body)
        if fault.get("length"):  # a complete answer of another size than it should be
            body = (body + b" " * max(0, fault["length"]))[: max(0, len(body) + fault["length"])]
            promised = len(body)
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(promised))
        h.end_headers()
        if head:
            return
        if fault.get("drop"):  # promise the body, send half, hang up
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if fault.get("stall"):
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            time.sleep(fault["stall"])
            body = body[len(body) // 2 :]
        h.wfile.write(body)

    def json(self, h: BaseHTTPRequestHandler, obj: object, head: bool, headers: dict[str, str] | None = None) -> None:
        self.send(h, 200, json.dumps(obj).encode(), head, {"Content-Type": "application/json", **(headers or {})})

    def etag(self, file: Path) -> str:
        """The sha256 of the content, as the Hub's ETag for LFS files (cached: benchmarks serve GBs)."""
        st = file.stat()
        key = (str(file), st.st_size, st.st_mtime_ns)
        if key not in self.etags:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            self.etags[key] = digest.hexdigest()
        return self.etags[key]

    def file(self, h: BaseHTTPRequestHandler, file: Path, sha: str, head: bool) -> None:
        size = file.stat().st_size
        etag = self.faults.get("etags", {}).get(file.name) or self.etag(file)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        fault = getattr(h, "fault", {})
        if head and fault.get("redirect"):  # to a storage host, as the Hub sends LFS files to its CDN
            port = self.httpd.server_address[1]
            where = f"http://localhost:{port}{urllib.parse.urlsplit(h.path).path}"
            linked = {"X-Linked-Size": str(size), "X-Linked-Etag": headers["ETag"], "Location": where}
            return self.send(h, 302, b"", head, {"X-Repo-Commit": sha, **linked})
        rng = h.headers.get("Range")
        status, start, end = 200, 0, size - 1
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = min(int(end_s), size - 1) if end_s else size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            status = 206
        length = end + 1 - start
        download = not head and not (rng and not rng.endswith("-"))  # whole file, or a resumed download
        drops, shorts = self.faults.get("drop", {}), self.faults.get("short", {})
        if download and file.name in self.faults.get("slow", {}):
            time.sleep(self.faults["slow"][file.name])
        send = length
        stall_at = None
        if fault.get("drop") or (download and drops.get(file.name, 0) > 0):  # promise it all, send half, hang up
            if not fault.get("drop"):
                drops[file.name] -= 1
            send = length // 2
            h.close_connection = True
        elif fault.get("length"):  # a complete answer, of another size than announced
            length = send = max(0, length + fault["length"])
        elif download and shorts.get(file.name):  # a complete answer, but shorter than HEAD announced
            length = send = length - shorts[file.name]
        if fault.get("stall"):  # a slow body: half, a pause, the rest
            stall_at = send - send // 2
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if head:
            return
        rate = self.faults.get("rate")  # bytes per second per connection, as a CDN allows one stream
        t0, sent = time.perf_counter(), 0
        with open(file, "rb") as f:
            f.seek(start)
            while send > 0:
                block = f.read(min(send, 1 << 20, send - stall_at if stall_at and send > stall_at else send))
                if not block:
                    break
                h.wfile.write(block)
                send -= len(block)
                sent += len(block)
                with self.lock:
                    self.bytes_sent += len(block)
                if stall_at and send == stall_at:
                    h.wfile.flush()
                    time.sleep(fault["stall"])
                if rate:
                    time.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
        h.wfile.flush()
