"""A Hub token is sent clean and shown nowhere: not in messages, tracebacks, logs, warnings or SLURM scripts.

Where a token comes from (--token, --token-file, HF_TOKEN), what is stripped (surrounding whitespace,
a file's CRLF) and what is refused (spaces, control and non-ASCII characters: exit 1, one line that names
the source and never the token; 1 and not 2 because the same token from HF_TOKEN or a file is no
command-line slip, and the library raises the same TokenError). End-to-end checks use the real
huggingface_hub client against the loopback Hub, whose ``tokens`` log every Authorization header.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from factories import write_pythia_step
from hub_server import HubServer

from ckptavg.cli import cli
from ckptavg.errors import TokenError
from ckptavg.tokens import Redactor, clean_token, read_token_file, resolve_token

SECRET = "hf_SECRETsecret123"
REPO = "Org/private-run"
BAD_TAIL = "SECRETsecret123"  # what must not show even when the token's head is mangled


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    for s in (1000, 2000):
        write_pythia_step(root / REPO / f"step{s}", s)
    with HubServer(root) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "0.01")  # retries wait milliseconds (a 503 is retried)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants

    # huggingface_hub's stored login (read when no token is given): a file of the test's, not the machine's.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "stored-login"))


def ls(hub: HubServer, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Result:
    args = ["ls", "--repo", REPO, "--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache"), *extra]
    return CliRunner(env=env).invoke(cli, args)


def one_error_line(r: Result, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0].removeprefix("Error: ")


def assert_secret_absent(*texts: str) -> None:
    for text in texts:
        assert BAD_TAIL not in text, text
        assert "secret123" not in text, text


# ---------------------------------------------------------------- where a token comes from


@pytest.mark.parametrize(
    "raw", [SECRET, f" {SECRET} ", f"{SECRET}\n", f"{SECRET}\r\n", f"\t{SECRET}\r\n\r\n", f"\u00a0{SECRET}\u3000"]
)
def test_surrounding_whitespace_is_stripped_from_every_source(raw: str, tmp_path: Path):
    path = tmp_path / "token"
    path.write_bytes(raw.encode())
    assert resolve_token(raw, environ={}) == SECRET
    assert resolve_token(environ={"HF_TOKEN": raw}) == SECRET
    assert resolve_token(token_file=path, environ={}) == SECRET
    assert read_token_file(path) == SECRET


def test_precedence_is_option_then_file_then_environment(tmp_path: Path):
    (tmp_path / "token").write_text("hf_fromfile\n")
    env = {"HF_TOKEN": "hf_fromenv"}
    assert resolve_token("hf_fromoption", environ=env) == "hf_fromoption"
    assert resolve_token(token_file=tmp_path / "token", environ=env) == "hf_fromfile"
    assert resolve_token(environ=env) == "hf_fromenv"
    assert resolve_token(environ={}) is None
    assert resolve_token("", environ=env) is None  # `--token "$HF_TOKEN"` with the variable unset: no token
    assert resolve_token(environ={"HF_TOKEN": " \r\n"}) is None
    with pytest.raises(TokenError, match=r"^give --token or --token-file, not both$"):
        resolve_token("hf_x", token_file=tmp_path / "token")


def test_a_file_with_a_byte_order_mark_and_crlf_gives_the_token(tmp_path: Path):
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n")
    assert read_token_file(tmp_path / "token") == SECRET


def test_token_file_path_expands_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "token").write_text(SECRET + "\n")
    assert read_token_file("~/.cache/huggingface/token") == SECRET


# ---------------------------------------------------------------- what is refused, and how it is said

REFUSED = [
    ("hf_SEC\x00RETsecret123", "has a control character (U+0000) at position 7 of 19"),
    ("hf_SECRET\x1bsecret123", "has a control character (U+001B) at position 10 of 19"),
    ("hf_SECRET\x7fsecret123", "has a control character (U+007F) at position 10 of 19"),
    ("hf_SECRET\r\nsecret123", "has a control character (U+000D) at position 10 of 20"),
    ("hf_SECRET secret123", "has a space at position 10 of 19"),
    ("hf_SECRÉTsecret123", "has a non-ASCII character at position 8 of 18"),
    ("\ufeffhf_SECRETsecret123", "has an invisible non-ASCII character (U+FEFF) at position 1 of 19"),
    ("hf_SECRET\u200bsecret123", "has an invisible non-ASCII character (U+200B) at position 10 of 19"),
]
TAIL = "; a token is printable ASCII without spaces: copy it again (it was not sent)"


@pytest.mark.parametrize("raw,what", REFUSED)
def test_refused_tokens_say_what_and_where_but_not_the_token(raw: str, what: str, tmp_path: Path):
    with pytest.raises(TokenError) as option:
        resolve_token(raw, environ={})
    assert str(option.value) == f"the token from --token {what}{TAIL}"
    with pytest.raises(TokenError) as env:
        resolve_token(environ={"HF_TOKEN": raw})
    assert str(env.value) == f"the token from HF_TOKEN {what}{TAIL}"
    path = tmp_path / "token"
    path.write_bytes(raw.encode())
    if raw.startswith("\ufeff"):  # in a file, a leading byte-order mark is the encoding's, not the token's
        assert read_token_file(path) == SECRET
        raw = raw.replace("\ufeff", "\u200b")
        path.write_bytes(raw.encode())
        what = what.replace("FEFF", "200B")
    with pytest.raises(TokenError) as file:
        read_token_file(path)
    assert str(file.value) == f"the token from --token-file {path} {what}{TAIL}"
    for e in (option.value, env.value, file.value):
        assert e.__cause__ is None and e.__context__ is None  # no chained exception quotes it either
        assert_secret_absent(str(e), repr(e))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder, not a file"),
        (lambda p: p.write_bytes(b""), "the file holds no token"),
        (lambda p: p.write_bytes(b"\r\n  \n"), "the file holds no token"),
        (lambda p: p.write_bytes(b"hf_SECRET\xffsecret123"), "not UTF-8 text; a token is printable ASCII"),
        (lambda p: p.write_bytes(b"x" * 70000), "more than 65536 bytes, too large to hold a token"),
    ],
)
def test_a_token_file_that_gives_no_token_is_one_line_naming_it(make, message: str, tmp_path: Path):
    path = tmp_path / "token"
    make(path)
    with pytest.raises(TokenError) as e:
        read_token_file(path)
    assert str(e.value) == f"--token-file {path}: {message}"
    assert_secret_absent(str(e.value))


def test_an_unreadable_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "token"
    path.write_text(SECRET)
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:  # as chmod 0 would, for anyone but root (who runs these tests in CI containers)
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(TokenError) as e:
        read_token_file(path)
    assert str(e.value) == f"--token-file {path}: cannot read it (Permission denied)"


def test_the_library_entry_point_cleans_and_refuses_too(hub: HubServer, tmp_path: Path):
    from ckptavg.sources import open_hub_run

    hub.tokens.clear()
    run = open_hub_run(REPO, endpoint=hub.url, token=f"{SECRET}\r\n", cache_dir=str(tmp_path / "c"))
    assert run.steps() == [1000, 2000] and set(hub.tokens) == {f"Bearer {SECRET}"}
    hub.tokens.clear()
    with pytest.raises(TokenError, match=r"^the token from the token argument has a non-ASCII character at"):
        open_hub_run(REPO, endpoint=hub.url, token="hf_SECRÉTsecret123", cache_dir=str(tmp_path / "c"))
    assert hub.tokens == []  # refused before any request


# ---------------------------------------------------------------- the CLI, end to end


@pytest.mark.parametrize("raw", [f"{SECRET}\r\n", f"{SECRET}\n", f"  {SECRET}  "])
@pytest.mark.parametrize("source", ["--token", "HF_TOKEN", "--token-file"])
def test_the_server_receives_the_clean_token(hub: HubServer, tmp_path: Path, raw: str, source: str):
    path = tmp_path / "token"
    path.write_bytes(raw.encode())
    extra, env = {"--token": (["--token", raw], None), "HF_TOKEN": ([], {"HF_TOKEN": raw})}.get(
        source, (["--token-file", str(path)], None)
    )
    hub.tokens.clear()
    r = ls(hub, tmp_path, *extra, env=env)
    assert r.exit_code == 0, r.output
    assert [ln.split("\t")[0] for ln in r.stdout.splitlines()] == ["1000", "2000"]
    assert hub.tokens and set(hub.tokens) == {f"Bearer {SECRET}"}
    assert_secret_absent(r.stdout, r.stderr)


@pytest.mark.parametrize("raw,what", [REFUSED[i] for i in (0, 3, 5, 7)])
def test_a_refused_token_is_exit_1_in_one_line_and_nothing_is_sent(hub: HubServer, tmp_path: Path, raw, what):
    path = tmp_path / "token"
    path.write_bytes(raw.encode())
    hub.requests.clear()
    for extra, env, origin in [
        (["--token", raw], None, "--token"),
        ([], {"HF_TOKEN": raw}, "HF_TOKEN"),
        (["--token-file", str(path)], None, f"--token-file {path}"),
    ]:
        if "\x00" in raw and extra[:1] == ["--token"]:
            continue  # no argv or environment can hold NUL; a file can
        if "\x00" in raw and env:
            continue
        r = ls(hub, tmp_path, *extra, env=env)
        assert one_error_line(r) == f"the token from {origin} {what}{TAIL}"
        assert_secret_absent(r.output)
    assert hub.requests == []


def test_a_non_ascii_token_in_a_real_process_is_one_line_not_a_traceback(hub: HubServer, tmp_path: Path):
    env = {**os.environ, "HF_TOKEN": "hf_SECRÉTsecret123", "PYTHONIOENCODING": "utf-8"}
    for debug in ("", "1"):
        env["CKPTAVG_DEBUG"] = debug
        done = subprocess.run(
            [sys.executable, "-m", "ckptavg", "ls", "--repo", REPO, "--endpoint", hub.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert_secret_absent(done.stdout, done.stderr)
        if not debug:
            assert (
                done.stderr == f"Error: the token from HF_TOKEN has a non-ASCII character at position 8 of 18{TAIL}\n"
            )
        else:
            assert "Traceback" in done.stderr and "ckptavg.errors.TokenError: the token from HF_TOKEN" in done.stderr


def test_token_and_token_file_together_is_a_usage_error(hub: HubServer, tmp_path: Path):
    (tmp_path / "token").write_text(SECRET)
    r = ls(hub, tmp_path, "--token", SECRET, "--token-file", str(tmp_path / "token"))
    assert one_error_line(r, code=2) == "give --token or --token-file, not both"
    assert_secret_absent(r.output)


def test_a_missing_token_file_is_one_line_naming_it(hub: HubServer, tmp_path: Path):
    r = ls(hub, tmp_path, "--token-file", str(tmp_path / "nope"))
    assert one_error_line(r) == f"--token-file {tmp_path / 'nope'}: no such file"


@pytest.mark.parametrize("where", ["--token", "HF_TOKEN", "--token-file"])
def test_debug_tracebacks_of_a_failing_hub_run_hold_no_token(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
):
    monkeypatch.setenv("CKPTAVG_DEBUG", "1")
    path = tmp_path / "token"
    path.write_bytes(f"{SECRET}\r\n".encode())
    extra = {"--token": ["--token", f"{SECRET}\r\n"], "--token-file": ["--token-file", str(path)]}.get(where, [])
    if where == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", f"{SECRET}\r\n")
    hub.faults["status"] = 503
    try:
        down = ls(hub, tmp_path, *extra, "--retry-time", "0.2")
    finally:
        del hub.faults["status"]
    missing = CliRunner().invoke(cli, ["ls", "--repo", "Nobody/nothing", "--endpoint", hub.url, *extra])
    for r in (down, missing):
        assert r.exit_code == 1 and r.stdout == ""
        assert "Traceback (most recent call last)" in r.stderr
        assert_secret_absent(r.stderr)
    assert "ckptavg.errors.HubUnavailableError: Org/private-run" in down.stderr and "HTTP 503" in down.stderr
    assert "Nobody/nothing" in missing.stderr and "repository not found" in missing.stderr


def _leaky_open_hub_run(repo: str, *, token: str | None = None, **options: object) -> None:
    """A stand-in for a third-party failure that quotes the token in every spelling it could."""
    logging.getLogger("huggingface_hub.file_download").error("sent Authorization: Bearer %s", token)
    warnings.warn(f"retrying with {token}", UserWarning, stacklevel=1)
    raise RuntimeError(f"header {token!r} refused; raw {token}; bytes {str(token).encode()!r}")


@pytest.mark.parametrize("debug", ["", "1"])
def test_a_bug_that_quotes_the_token_is_printed_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, debug: str
):
    import ckptavg.sources

    monkeypatch.setenv("CKPTAVG_DEBUG", debug)
    monkeypatch.setattr(ckptavg.sources, "open_hub_run", _leaky_open_hub_run)
    path = tmp_path / "token"
    path.write_bytes(f"{SECRET}\r\n".encode())
    caplog.set_level(logging.WARNING)

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        sys.stderr.write(f"{category.__name__}: {message}\n")  # as Python shows one, less file and line

    monkeypatch.setattr(warnings, "showwarning", show)  # pytest would record, not show, warnings
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for extra in (["--token", f" {SECRET}\r\n"], ["--token-file", str(path)]):
            r = CliRunner().invoke(cli, ["ls", "--repo", REPO, *extra])
            assert r.exit_code == 1 and r.stdout == ""
            assert "Traceback (most recent call last)" in r.stderr
            assert "RuntimeError: header '***' refused; raw ***; bytes b'***'" in r.stderr
            assert "UserWarning: retrying with ***" in r.stderr
            assert_secret_absent(r.stderr)
    assert warnings.showwarning is show  # the CLI put back what it replaced
    assert [rec.getMessage() for rec in caplog.records] == ["sent Authorization: Bearer ***"] * 2
    assert logging.getLogRecordFactory() is logging.LogRecord  # the CLI put back what it replaced


def test_huggingface_hubs_stored_login_is_redacted_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub
    import huggingface_hub.constants

    import ckptavg.sources

    Path(huggingface_hub.constants.HF_TOKEN_PATH).write_text(SECRET + "\n")  # as `hf auth login` stores it

    def refuse(repo: str, *, token: str | None = None, **options: object) -> None:
        assert token is None  # none given: huggingface_hub would send its stored login
        raise RuntimeError(f"sent {huggingface_hub.get_token()}")

    monkeypatch.setattr(ckptavg.sources, "open_hub_run", refuse)
    r = CliRunner().invoke(cli, ["ls", "--repo", REPO])
    assert r.exit_code == 1 and "RuntimeError: sent ***" in r.stderr
    assert_secret_absent(r.output)


def test_a_library_error_that_quotes_the_token_is_one_redacted_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ckptavg.sources
    from ckptavg.errors import HubError

    def refuse(repo: str, *, token: str | None = None, **options: object) -> None:
        raise HubError(f"{repo}: the server said 'bad token {token}'", repo=repo)

    monkeypatch.setattr(ckptavg.sources, "open_hub_run", refuse)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    r = CliRunner().invoke(cli, ["ls", "--repo", REPO])
    assert one_error_line(r) == f"{REPO}: the server said 'bad token ***'"


def test_usage_errors_do_not_quote_the_token(tmp_path: Path):
    r = CliRunner().invoke(cli, ["lawa", "--repo", REPO, "--token", SECRET, "--steps", SECRET, "--out", "o"])
    assert r.exit_code == 2 and "Invalid value for '--steps': '***'" in r.stderr, r.stderr
    assert_secret_absent(r.output)


def test_redactor_covers_raw_stripped_and_escaped_spellings():
    red = Redactor(f" {SECRET}\r\n", None, "")
    text = f"a {SECRET} b {SECRET!r} c {f' {SECRET}'!r} d {(SECRET + chr(13) + chr(10)).encode()!r}"
    assert red.redact(text) == "a *** b '***' c ' ***' d b'***\\r\\n'"
    odd = Redactor("hf_SECRÉTsecret123")
    assert odd.redact(f"{'hf_SECRÉTsecret123'.encode()!r} {ascii('hf_SECRÉTsecret123')}") == "b'***' '***'"
    assert Redactor().redact("nothing to hide") == "nothing to hide"
    assert clean_token(None, "--token") is None


def test_log_records_are_redacted_and_a_malformed_one_does_not_raise(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    with Redactor(SECRET).active():
        logging.getLogger("huggingface_hub.file_download").error("Authorization: Bearer %s", SECRET)
        logging.getLogger("ckptavg.test").error("two %s %s", SECRET)  # one argument short
    logging.getLogger("ckptavg.test").info("after: %s", "kept")
    assert [r.getMessage() for r in caplog.records] == [
        "Authorization: Bearer ***",
        "two %s %s ('***',)",
        "after: kept",
    ]


def test_a_thread_that_dies_quoting_the_token_is_printed_redacted(capsys: pytest.CaptureFixture[str]):
    import threading

    def die() -> None:
        raise RuntimeError(f"Authorization: Bearer {SECRET}")

    hook = threading.excepthook
    with Redactor(SECRET).active():
        t = threading.Thread(target=die, name="download-0")
        t.start()
        t.join()
    assert threading.excepthook is hook
    err = capsys.readouterr().err
    assert err.startswith("Exception in thread download-0:\nTraceback (most recent call last):")
    assert err.endswith("RuntimeError: Authorization: Bearer ***\n")


# ---------------------------------------------------------------- SLURM scripts


def slurm(
    hub: HubServer, tmp_path: Path, *extra: str, env: dict[str, str] | None = None, submit: bool = False
) -> Result:
    command = ["lawa", "--repo", REPO, "--endpoint", hub.url, "--cache-dir", str(tmp_path / "cache")]
    command += ["--steps", "2000:2000", "--k", "2", "--out", str(tmp_path / "out"), *extra]
    return CliRunner(env=env).invoke(cli, ["slurm", "--num-tasks", "1", *(["--submit"] if submit else []), *command])


def test_slurm_leaves_the_token_out_of_the_script_and_says_how_the_job_gets_it(hub: HubServer, tmp_path: Path):
    for extra in (["--token", SECRET], [f"--token={SECRET}\r\n"]):
        hub.tokens.clear()
        r = slurm(hub, tmp_path, *extra)
        assert r.exit_code == 0, r.output
        assert set(hub.tokens) == {f"Bearer {SECRET}"}  # planning used it
        assert SECRET.encode() not in r.stdout_bytes and "secret123" not in r.stdout
        assert_secret_absent(r.stderr)
        script = r.stdout
        assert "--token " not in script and "--token=" not in script
        assert "# export HF_TOKEN=... (or HF_TOKEN=$(cat ~/.cache/huggingface/token)) before sbatch, or give" in script
        assert (
            ': "${HF_TOKEN:?this job needs a Hub token: export HF_TOKEN=... before sbatch, or use --token-file}"\n'
            in (script)
        )
        assert script.rstrip().splitlines()[-1].startswith("exec ")
        assert r.stderr == (
            "ckptavg: --token was left out of the script: export HF_TOKEN=... before sbatch (sbatch passes the "
            "environment on), or use --token-file PATH\n"
        )


def test_slurm_with_an_empty_token_asks_for_none(hub: HubServer, tmp_path: Path):
    r = slurm(hub, tmp_path, "--token", "")
    assert r.exit_code == 0, r.output
    assert "HF_TOKEN:?" not in r.stdout and "--token" not in r.stdout.splitlines()[-1]
    assert r.stderr.startswith("ckptavg: the script holds no token")


def test_slurm_with_hf_token_in_the_environment_writes_no_token(hub: HubServer, tmp_path: Path):
    r = slurm(hub, tmp_path, env={"HF_TOKEN": SECRET})
    assert r.exit_code == 0, r.output
    assert SECRET.encode() not in r.stdout_bytes and "HF_TOKEN:?" not in r.stdout  # a public repo may need none
    assert "ckptavg: the script holds no token; its job reads HF_TOKEN from the environment of sbatch" in r.stderr


def test_slurm_keeps_a_token_file_path_which_the_job_reads(hub: HubServer, tmp_path: Path):
    path = tmp_path / "token"
    path.write_text(SECRET + "\r\n")
    r = slurm(hub, tmp_path, "--token-file", str(path))
    assert r.exit_code == 0, r.output
    assert f"--token-file {path}" in r.stdout and SECRET.encode() not in r.stdout_bytes
    assert (
        r.stderr == f"ckptavg: the job reads its Hub token from --token-file {path}; compute nodes must see that file\n"
    )


def test_slurm_of_a_local_run_says_nothing_about_tokens(tmp_path: Path, make_st_run):
    make_st_run([1000, 2000])
    r = CliRunner().invoke(
        cli, ["slurm", "lawa", str(tmp_path / "run"), "--steps", "2000:2000", "--k", "2", "--out", "o"]
    )
    assert r.exit_code == 0, r.output
    assert "HF_TOKEN" not in r.stdout and r.stderr == ""


def test_slurm_submit_hands_the_token_to_sbatch_in_its_environment_only(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records what SLURM would keep: the script, and the environment it exports
    fake.write_text(f'#!/bin/sh\ncat > {tmp_path}/script\nprintf %s "$HF_TOKEN" > {tmp_path}/env\necho 42\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    r = slurm(hub, tmp_path, "--token", f"{SECRET}\r\n", submit=True)
    assert r.exit_code == 0, r.output
    assert r.stdout == "42\n"
    assert SECRET.encode() not in (tmp_path / "script").read_bytes()
    assert (tmp_path / "env").read_text() == SECRET  # cleaned, for the job to read as HF_TOKEN
    assert r.stderr == "ckptavg: --token goes to the job as HF_TOKEN in the environment of sbatch, not in the script\n"
