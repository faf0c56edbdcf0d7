"""What a long Hub trajectory on a cluster meets: transient faults, hostile values, locks that do nothing.

The real huggingface_hub client against tests/hub_server.py, which injects faults per request kind
(``HubServer.inject``). Retries wait milliseconds here (``CKPTAVG_RETRY_BASE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from factories import write_pythia_step
from hub_server import HubServer, commit_of

from ckptavg.cli import cli
from ckptavg.errors import HubUnavailableError
from ckptavg.sources.hub import STALE_PARTIAL_SECONDS, HubSource
from ckptavg.sources.retry import RetryPolicy

REPO = "EleutherAI/pythia-faults"
INDEXED = "Evil/index"  # step2000's index names a shard outside the repository
WEIGHTS = "pytorch_model.bin"
LAWA = ["lawa", "--steps", "2000:2000", "--k", "2"]  # members 1000 and 2000


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    for s in (1000, 2000):
        write_pythia_step(root / REPO / f"step{s}", s)
        write_pythia_step(root / INDEXED / f"step{s}", s, shards=2)
    index = root / INDEXED / "step2000" / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../../evil.bin"
    index.write_text(json.dumps(data))
    with HubServer(root) as server:
        yield server


@pytest.fixture(autouse=True)
def clean(hub: HubServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "0.01")
    hub.requests.clear()
    hub.timed.clear()
    yield
    for queue in hub.queued.values():
        queue.clear()
    for key in ("branches", "commits", "listed", "etags"):
        hub.faults.pop(key, None)


@pytest.fixture(scope="module")
def reference(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The output of a fault-free run."""
    tmp = tmp_path_factory.mktemp("reference")
    r = lawa(hub, tmp)
    assert r.exit_code == 0, r.output
    return (tmp / "o" / "step2000" / "model.safetensors").read_bytes()


def lawa(hub: HubServer, tmp: Path, *extra: str, repo: str = REPO) -> Result:
    args = [*LAWA, "--repo", repo, "--endpoint", hub.url, "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "o")]
    return CliRunner().invoke(cli, [*args, *extra])


def weight_requests(hub: HubServer) -> list[str]:
    """Downloads of the weight files: GETs of the whole file or from a byte on (not header ranges)."""
    return [r for r in hub.requests if r.startswith("GET") and re.search(r"/pytorch_model\.bin( \[bytes=\d+-\])?$", r)]


def outside_cache(tmp: Path) -> list[Path]:
    """Everything under ``tmp`` that is not the cache folder or in it."""
    return [p for p in tmp.rglob("*") if not p.is_relative_to(tmp / "cache")]


# ---------------------------------------------------------------- transient faults are retried


@pytest.mark.parametrize(
    "kind, fault",
    [
        ("refs", {"status": 503}),
        ("refs", {"hangup": True}),
        ("tree", {"status": 502}),
        ("tree", {"drop": True}),
        ("head", {"status": 500}),
        ("head", {"hangup": True}),
        ("range", {"status": 429}),
        ("range", {"drop": True}),
        ("download", {"status": 503}),
        ("download", {"status": 429, "retry_after": "0"}),
        ("download", {"drop": True}),
        ("download", {"hangup": True}),
    ],
)
def test_a_transient_fault_of_each_request_kind_is_retried_to_the_same_output(
    hub: HubServer, tmp_path: Path, reference: bytes, kind: str, fault: dict[str, object]
):
    hub.inject(kind, 2, **fault)
    r = lawa(hub, tmp_path)
    assert r.exit_code == 0, r.output
    assert hub.pending() == {}  # both faults were served, and survived
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference
    assert all(p.is_relative_to(tmp_path / "o") for p in outside_cache(tmp_path))


def test_a_tree_listed_in_pages_is_read_whole_and_each_page_is_retried(
    hub: HubServer, tmp_path: Path, reference: bytes
):
    hub.faults["page"] = 2
    hub.inject("tree", 4, status=503)
    try:
        r = lawa(hub, tmp_path)
    finally:
        hub.faults.pop("page")
    assert r.exit_code == 0, r.output
    assert hub.pending() == {}
    pages = [line for line in hub.requests if "/tree/" in line]
    files = len(list((hub.root / REPO / "step1000").iterdir()))
    assert len(pages) == 4 + 2 * -(-files // 2)  # every page of both revisions, and the four refused
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference


@pytest.mark.parametrize("link", ["other-host", "loop"])
def test_tree_pages_that_lead_to_another_host_or_back_are_refused_in_one_line(
    hub: HubServer, tmp_path: Path, link: str
):
    """The token goes with each page: a next page on another host is not followed, and pages that loop
    are not listed forever."""
    hub.faults["page"] = 2
    real = hub.url
    if link == "other-host":  # the same server under another name: a different host to the client
        hub.url = real.replace("127.0.0.1", "localhost")
    else:  # every page links back to the first (the fragment is not part of what is fetched)
        hub.url = f"{real}/api/models/{REPO}/tree/{commit_of(REPO, 'step1000')}?recursive=false&cursor=0#"
    try:
        r = CliRunner().invoke(
            cli,
            [
                *LAWA,
                "--repo",
                REPO,
                "--endpoint",
                real,
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "o"),
            ]
            + ["--dry-run", "--token", "hf_SECRETpage"],
        )
    finally:
        hub.url = real
        hub.faults.pop("page")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    if link == "other-host":
        assert "is on another host than" in line and "not followed" in line, line
        assert not [t for t, (host, _, _) in zip(hub.tokens, hub.seen, strict=True) if t and "localhost" in host]
    else:
        assert "was listed before" in line and "the pages do not end" in line, line
        assert len([q for q in hub.requests if "/tree/" in q]) < 10


def test_a_file_a_later_part_needs_again_is_downloaded_again(tmp_path: Path):
    """Older revisions in one file, newer ones in two shards: a budget of two parts per shard group lets
    go of an old file after the first group's first part, and the second group's first part needs it."""
    root = tmp_path / "hub"
    for s in range(1000, 7000, 1000):
        write_pythia_step(root / "Org/mixed" / f"step{s}", s, shards=1 if s <= 3000 else 2)
    with HubServer(root) as server:
        cmd = [sys.executable, "-m", "ckptavg", "lawa", "--repo", "Org/mixed", "--endpoint", server.url]
        cmd += ["--cache-dir", str(tmp_path / "c"), "--steps", "3000:6000", "--k", "3", "--interval", "1000"]
        cmd += ["--out", str(tmp_path / "o"), "--disk-budget", "240000"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run hung waiting for a file it had let go of")
    assert r.returncode == 0, r.stderr
    assert "part 3 of" in r.stderr  # several parts per shard group: the case under test


@pytest.mark.parametrize(
    "base, retry_after, wait",
    [
        ("1", "1", (1.0, 2.0)),  # as asked: not the first backoff (0.5-1 s)
        ("0.01", "3600", (0.6, 1.5)),  # capped at max_delay (60 x the base: 60 s by default)
    ],
)
def test_retry_after_is_honoured_up_to_a_cap(
    hub: HubServer,
    tmp_path: Path,
    reference: bytes,
    monkeypatch: pytest.MonkeyPatch,
    base: str,
    retry_after: str,
    wait: tuple[float, float],
):
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", base)
    hub.inject("download", 1, file=WEIGHTS, status=429, retry_after=retry_after)
    r = lawa(hub, tmp_path)
    assert r.exit_code == 0, r.output
    gets = [(t, line) for t, line in hub.timed if line in weight_requests(hub)]
    refused = gets[0]  # the 429; then the same file again, a second later
    retried = next(t for t, line in gets[1:] if line == refused[1])
    assert wait[0] <= retried - refused[0] < wait[1], gets
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference


def test_a_dropped_download_resumes_by_range_from_the_bytes_it_has_at_once(
    hub: HubServer, tmp_path: Path, reference: bytes, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "1")  # a backoff would wait 0.5-1 s
    hub.inject("download", 1, file=WEIGHTS, drop=True)
    r = lawa(hub, tmp_path)
    assert r.exit_code == 0, r.output
    gets = weight_requests(hub)
    dropped = gets[0]
    resumed = [g for g in gets if g.startswith(dropped + " [bytes=")]
    assert len(resumed) == 1, gets
    start = int(re.search(r"bytes=(\d+)-\]$", resumed[0]).group(1))  # type: ignore[union-attr]
    size = (hub.root / REPO / "step1000" / WEIGHTS).stat().st_size
    assert 0 < start <= size // 2, (start, size)  # the half the server sent is kept, not fetched again
    times = {line: t for t, line in reversed(hub.timed)}  # each line's first time
    assert times[resumed[0]] - times[dropped] < 0.4  # it made progress: no backoff
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference


def test_a_stalled_body_times_out_and_resumes_by_range(hub: HubServer, tmp_path: Path, reference: bytes):
    """The client's read timeout (HF_HUB_DOWNLOAD_TIMEOUT) ends a stalled body; the retry continues it."""
    hub.inject("download", 1, file=WEIGHTS, stall=4)
    cmd = [sys.executable, "-m", "ckptavg", *LAWA, "--repo", REPO, "--endpoint", hub.url]
    env = {**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    gets = weight_requests(hub)
    assert any(re.search(r"\[bytes=[1-9]\d*-\]$", g) for g in gets), gets
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference


def test_a_download_of_another_length_than_announced_is_not_retried(hub: HubServer, tmp_path: Path):
    """A complete answer of the wrong size is not a network fault: the file changed, or the server is broken."""
    hub.inject("download", 1, file=WEIGHTS, length=-10)
    r = lawa(hub, tmp_path)
    assert r.exit_code == 1
    size = (hub.root / REPO / "step1000" / WEIGHTS).stat().st_size
    assert re.fullmatch(
        f"Error: {REPO}@step(1000|2000)/{WEIGHTS}: the server sends {size - 10} bytes of a file its HEAD announced "
        f"as {size} bytes; it may have changed on the server: run the same command again\n",
        r.stderr,
    ), r.stderr
    assert len(weight_requests(hub)) <= 2  # the other revision's may have started; none was asked again
    assert len(set(weight_requests(hub))) == len(weight_requests(hub))


# ---------------------------------------------------------------- faults that outlive the retries


@pytest.mark.parametrize(
    "kind, where, action",
    [
        ("refs", f"{REPO}", "listing its refs"),
        ("tree", f"{REPO}@step(1000|2000)", "listing its files"),
        ("range", f"{REPO}@step(1000|2000)/{WEIGHTS}", r"reading bytes 0-65535 \(its header\)"),
        ("head", f"{REPO}@step(1000|2000)/[a-z_]+\\.(json|bin)", r"asking for its size and ETag \(HEAD\)"),
        ("download", f"{REPO}@step(1000|2000)/[a-z_]+\\.(json|bin)", "downloading it"),
    ],
)
def test_a_fault_that_outlives_the_retry_time_is_one_line_naming_the_file_and_the_attempts(
    hub: HubServer, tmp_path: Path, kind: str, where: str, action: str
):
    hub.inject(kind, 10_000, status=503)
    r = lawa(hub, tmp_path, "--retry-time", "0.3")
    assert r.exit_code == 1
    assert re.fullmatch(
        f"Error: {where}: gave up {action} after [2-9]\\d* attempts in 0\\.\\d s \\(last: HTTP 503\\); "
        "run the same command again to resume\n",
        r.stderr,
    ), r.stderr
    assert not (tmp_path / "o").exists() or not [p for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")]


def test_hub_unavailable_carries_its_attempts(hub: HubServer, tmp_path: Path):
    hub.inject("refs", 10_000, hangup=True)
    policy = RetryPolicy(total=0.2, first_delay=0.01, max_delay=0.02)
    with pytest.raises(HubUnavailableError) as e:
        HubSource(REPO, endpoint=hub.url, cache_dir=str(tmp_path / "cache"), retry=policy)
    assert e.value.attempts == len(hub.requests) >= 3
    assert 0.1 <= e.value.seconds < 1 and e.value.last == "RemoteProtocolError"


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refusals_are_not_retried(hub: HubServer, tmp_path: Path, status: int):
    hub.inject("head", 1, status=status)
    r = lawa(hub, tmp_path)
    assert r.exit_code == 1
    assert re.fullmatch(
        f"Error: {REPO} on {hub.url}: the server answered HTTP {status} while trying to download "
        "[a-z_.]+ of step(1000|2000)\n",
        r.stderr,
    ), r.stderr
    heads = [line for line in hub.requests if line.startswith("HEAD")]
    assert len(heads) == len(set(heads))  # no HEAD was asked twice


def test_the_token_does_not_follow_a_redirect_to_a_storage_host(hub: HubServer, tmp_path: Path, reference: bytes):
    hub.inject("head", 100, file=WEIGHTS, redirect=True)
    hub.seen.clear()
    r = lawa(hub, tmp_path, "--token", "hf_SECRET")
    assert r.exit_code == 0, r.output
    storage = [(line, token) for host, line, token in hub.seen if host.startswith("localhost")]
    assert storage and all(token is None for _, token in storage), storage
    assert all(token == "Bearer hf_SECRET" for host, _, token in hub.seen if host.startswith("127.0.0.1"))
    assert (tmp_path / "o" / "step2000" / "model.safetensors").read_bytes() == reference


# ---------------------------------------------------------------- hostile values


def hostile(hub: HubServer, tmp_path: Path, key: str, value: dict[str, object], repo: str = REPO) -> Result:
    if key:
        hub.faults[key] = value
    r = lawa(hub, tmp_path, repo=repo)
    assert r.exit_code == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert outside_cache(tmp_path) == [], outside_cache(tmp_path)  # no output, nothing beside the cache
    assert not list(tmp_path.rglob("*evil*"))
    return r


@pytest.mark.parametrize("name", ["../../evil.bin", "/etc/evil", "sub/../../evil", "a\\..\\evil", "evil\n.bin", ""])
def test_a_file_name_that_would_leave_the_cache_is_refused(hub: HubServer, tmp_path: Path, name: str):
    r = hostile(hub, tmp_path, "listed", {name: 10})
    assert re.fullmatch(
        f"Error: {REPO}@step(1000|2000): file name {re.escape(repr(name))} from the tree listing is not a relative "
        "path inside the repository; refusing it\n",
        r.stderr,
    ), r.stderr


def test_an_index_entry_that_would_leave_the_cache_is_refused(hub: HubServer, tmp_path: Path):
    r = hostile(hub, tmp_path, "", {}, repo=INDEXED)
    assert r.stderr == (
        f"Error: {INDEXED}@step2000/pytorch_model.bin.index.json: weight_map puts tensor 'gpt_neox.embed_in.weight' "
        "in \"../../evil.bin\", which climbs out with '..' (outside the checkpoint folder); an index may only name "
        "files inside the checkpoint folder\n"
    )


def test_a_revision_name_that_would_leave_the_cache_is_refused(hub: HubServer, tmp_path: Path):
    r = hostile(hub, tmp_path, "branches", {"../../step3000": "a" * 40})
    assert r.stderr == (
        f"Error: {REPO}: revision name '../../step3000' from the refs listing is not a relative path inside the "
        "repository; refusing it\n"
    )


@pytest.mark.parametrize("commit", ["../../../evil", "A" * 40, "0" * 39, "0" * 40 + "\n"])
def test_a_commit_hash_that_is_not_hex_is_refused(hub: HubServer, tmp_path: Path, commit: str):
    r = hostile(hub, tmp_path, "commits", {"step1000": commit})
    assert r.stderr == (
        f"Error: {REPO}@step1000: commit hash {commit!r} from the refs listing is not 40 hex digits; refusing it\n"
    )


@pytest.mark.parametrize("etag", ["../evil", "a/b", ".."])
def test_an_etag_that_is_not_a_file_name_is_refused(hub: HubServer, tmp_path: Path, etag: str):
    r = hostile(hub, tmp_path, "etags", {WEIGHTS: etag})
    assert re.fullmatch(
        f"Error: {REPO}@step(1000|2000)/{WEIGHTS}: the ETag of its HEAD {re.escape(repr(etag))} is not a safe file "
        "name \\(letters, digits, '.', '_', '-'\\); refusing it\n",
        r.stderr,
    ), r.stderr


def test_a_cache_dir_that_is_a_file_is_one_line(hub: HubServer, tmp_path: Path):
    (tmp_path / "cache").write_text("not a folder")
    for cache in (tmp_path / "cache", tmp_path / "cache" / "sub"):
        r = CliRunner().invoke(cli, ["ls", "--repo", REPO, "--endpoint", hub.url, "--cache-dir", str(cache)])
        assert r.exit_code == 1
        assert (
            r.stderr == f"Error: {cache}: cannot be the download cache: {tmp_path / 'cache'} is a file, not a folder\n"
        )
    assert not hub.requests


# ---------------------------------------------------------------- partial downloads and shared caches


def blobs_of(tmp_path: Path, repo: str = REPO) -> Path:
    return tmp_path / "cache" / f"models--{repo.replace('/', '--')}" / "blobs"


def served(hub: HubServer, step: int = 1000) -> tuple[bytes, str]:
    data = (hub.root / REPO / f"step{step}" / WEIGHTS).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def fetch_weights(hub: HubServer, tmp_path: Path) -> Path:
    source = HubSource(REPO, endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    data, _ = served(hub)
    path, fetched = source.use(1000, WEIGHTS, len(data))
    assert fetched and path.read_bytes() == data
    source.done_with(1000, WEIGHTS)  # ours: deleted again
    return path


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize(
    "owner, age, adopted",
    [
        (f"{socket.gethostname()}-DEAD", 0, True),  # this host, its process gone: a killed run
        (f"{socket.gethostname()}-{os.getpid()}", 0, False),  # this host, alive: still downloading
        ("other-node-17-12345", 0, False),  # another host, written just now: maybe alive
        ("other-node-17-12345", STALE_PARTIAL_SECONDS + 60, True),  # another host, untouched for long
        ("", STALE_PARTIAL_SECONDS + 60, True),  # an older ckptavg's <etag>.incomplete
    ],
)
def test_a_leftover_partial_is_adopted_only_when_its_owner_is_gone(
    hub: HubServer, tmp_path: Path, owner: str, age: int, adopted: bool
):
    data, etag = served(hub)
    blobs = blobs_of(tmp_path)
    blobs.mkdir(parents=True)
    owner = owner.replace("DEAD", str(dead_pid()))
    partial = blobs / (f"{etag}.ckptavg-{owner}-0123abcd.incomplete" if owner else f"{etag}.incomplete")
    partial.write_bytes(data[:30000])
    os.utime(partial, (time.time() - age, time.time() - age))
    fetch_weights(hub, tmp_path)
    gets = weight_requests(hub)
    assert len(gets) == 1 and gets[0].endswith(" [bytes=30000-]") == adopted, gets
    assert partial.exists() != adopted  # a live owner's file is left alone
    assert not [p for p in blobs.iterdir() if p != partial]  # nothing else stays behind


def test_an_adopted_partial_with_wrong_bytes_is_downloaded_again(hub: HubServer, tmp_path: Path):
    data, etag = served(hub)
    blobs = blobs_of(tmp_path)
    blobs.mkdir(parents=True)
    (blobs / f"{etag}.ckptavg-{socket.gethostname()}-{dead_pid()}-0123abcd.incomplete").write_bytes(
        b"\0" * 30000  # a node crashed before its page cache reached the disk
    )
    fetch_weights(hub, tmp_path)  # asserts the bytes
    first, again = weight_requests(hub)
    assert first == f"{again} [bytes=30000-]"  # continued, found not to be the file's bytes, fetched whole


def test_two_processes_without_working_locks_never_corrupt_a_blob(hub: HubServer, tmp_path: Path):
    """Lustre, GPFS and some NFS mounts ignore flock: simulated by a sitecustomize that makes it a no-op.
    Both processes download the same files at once; every blob is the served bytes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import fcntl\n\n\ndef _ignored(*args, **kwargs):\n    return None\n\n\nfcntl.flock = _ignored\n"
    )
    script = textwrap.dedent(
        f"""
        import fcntl, sys, time
        from pathlib import Path
        from ckptavg.sources.hub import HubSource

        assert fcntl.flock.__name__ == "_ignored"
        hub = HubSource({REPO!r}, endpoint={hub.url!r}, cache_dir={str(tmp_path / "cache")!r})
        Path(sys.argv[1]).touch()
        while not Path({str(tmp_path / "go")!r}).exists():
            time.sleep(0.005)
        for step in (1000, 2000):
            for name, size in hub.files(step).items():
                hub.use(step, name, size)
        """
    )
    hub.inject("download", 10_000, stall=0.2)  # every body takes a while: the two overlap
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{i}")], env=env, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    gets = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert len(gets) > len({g.split(" [")[0] for g in gets}), gets  # some file was downloaded by both
    blobs = blobs_of(tmp_path)
    expected = {hub.etag(f): f.read_bytes() for s in (1000, 2000) for f in (hub.root / REPO / f"step{s}").iterdir()}
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == expected  # no partial left, none corrupt
    snapshots = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    for branch, commit in hub.branches(REPO).items():
        files = sorted((hub.root / REPO / branch).iterdir())
        assert sorted(p.name for p in (snapshots / commit).iterdir()) == [f.name for f in files]
        assert all((snapshots / commit / f.name).read_bytes() == f.read_bytes() for f in files)


# ---------------------------------------------------------------- the policy, pure


@pytest.mark.parametrize(
    "status, headers, expected",
    [
        (503, {}, ("HTTP 503", None)),
        (429, {"Retry-After": "7"}, ("HTTP 429", 7.0)),
        (500, {"Retry-After": "soon"}, ("HTTP 500", None)),
        (408, {}, ("HTTP 408", None)),
        (401, {}, None),
        (403, {}, None),
        (404, {"Retry-After": "7"}, None),
    ],
)
def test_which_answers_are_transient(status: int, headers: dict[str, str], expected: object):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from ckptavg.sources.retry import transient

    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", "http://127.0.0.1/x"))
    assert transient(HfHubHTTPError("x", response=response)) == expected


def test_transport_errors_are_transient_and_others_are_not():
    import httpx2

    from ckptavg.sources.retry import BodyCutShort, transient

    assert transient(httpx2.ReadTimeout("slow")) == ("ReadTimeout", None)
    assert transient(httpx2.RemoteProtocolError("peer closed")) == ("RemoteProtocolError", None)
    assert transient(httpx2.ConnectError("refused")) == ("ConnectError", None)
    assert transient(BodyCutShort("after 10 of 20 bytes")) == ("connection dropped: after 10 of 20 bytes", None)
    assert transient(ValueError("no")) is None and transient(OSError("disk full")) is None


def test_retry_after_as_an_http_date():
    import email.utils

    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from ckptavg.sources.retry import transient

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    response = httpx2.Response(503, headers={"Retry-After": when}, request=httpx2.Request("GET", "http://h/x"))
    _, wait = transient(HfHubHTTPError("x", response=response))  # type: ignore[misc]
    assert wait is not None and 28 <= wait <= 31


def test_the_default_policy_waits_minutes_not_seconds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CKPTAVG_RETRY_BASE")
    assert RetryPolicy.with_total(None) == RetryPolicy(total=600, first_delay=1, max_delay=60)
    assert RetryPolicy.with_total(5).total == 5
