"""The input boundary under hostile and unusual files, through the real CLI: each case either works as a
user would expect or fails with one line naming the file, exit code 1, nothing written under --out and
the inputs untouched.

Files are real (written by transformers, torch and safetensors in tests/factories.py) and then damaged.
The header parsers' own cases and their fuzzing are in test_header_parsers.py and test_fuzz_headers.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import error_line, tree_digest
from factories import write_nanogpt_ckpt, write_pythia_run, write_pythia_step
from hub_server import HubServer
from safetensors.torch import load_file

from ckptavg.cli import cli
from ckptavg.sources.extras import EXTRA_FILES

STEPS = [1000, 2000, 3000]
SECRET = "AWS_SECRET_ACCESS_KEY=do-not-ship-me"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTAVG_DEBUG", raising=False)
    monkeypatch.setenv("CKPTAVG_RETRY_BASE", "0.01")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def lawa(run: Path, out: Path, *extra: object) -> Result:
    return invoke("lawa", run, "--steps", "3000:3000", "--k", 3, "--out", out, *extra)


# ---------------------------------------------------------------- extra files: one allow-list


def test_only_config_and_tokenizer_files_are_copied_into_outputs(tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    write_pythia_run(run, STEPS)
    newest = run / "step3000"
    (newest / ".env").write_text(SECRET)
    (newest / "notes.txt").write_text("private notes")
    (newest / "optimizer.pt").write_bytes(b"\0" * 64)
    (newest / "tokenizer").mkdir()  # a folder of that name is not a tokenizer file

    r = lawa(run, out)

    assert r.exit_code == 0, r.stderr
    copied = {p.name for p in (out / "step3000").iterdir()} - {"model.safetensors", "ckptavg.json"}
    assert copied == {p.name for p in newest.iterdir() if p.name in EXTRA_FILES}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= copied


def test_a_symlink_leaving_the_checkpoint_folder_is_refused_by_name(tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    write_pythia_run(run, STEPS)
    private = tmp_path / "home" / ".ssh" / "id_rsa"
    private.parent.mkdir(parents=True)
    private.write_text(SECRET)
    link = run / "step3000" / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(private)
    before = tree_digest(tmp_path / "run")

    line = error_line(lawa(run, out))

    assert line == (
        f"{link}: a symlink to {private}, outside the checkpoint folder; not copied into outputs "
        "(replace the link by a copy of the file, or remove it)"
    )
    assert not out.exists() or not list(out.rglob("*"))
    assert tree_digest(tmp_path / "run") == before


def test_a_symlink_leaving_through_a_parent_folder_link_is_refused(tmp_path: Path):
    """``step3000/config.json -> ../elsewhere/config.json``, where that folder is outside the run."""
    run, out = tmp_path / "run", tmp_path / "out"
    write_pythia_run(run, STEPS)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text((run / "step3000" / "config.json").read_text())
    (run / "step3000" / "config.json").unlink()
    (run / "step3000" / "config.json").symlink_to(Path("..", "..", "elsewhere", "config.json"))

    line = error_line(lawa(run, out))

    assert line.startswith(f"{run / 'step3000' / 'config.json'}: a symlink to {outside / 'config.json'}, outside")


def test_a_symlink_within_the_checkpoint_folder_is_followed(tmp_path: Path):
    run, out = tmp_path / "run", tmp_path / "out"
    write_pythia_run(run, STEPS)
    newest = run / "step3000"
    (newest / "tokenizer.json").rename(newest / "tok-v2.json")
    (newest / "tokenizer.json").symlink_to("tok-v2.json")

    r = lawa(run, out)

    assert r.exit_code == 0, r.stderr
    copied = out / "step3000" / "tokenizer.json"
    assert not copied.is_symlink()  # a file of its own, not a link back into the run
    assert copied.read_bytes() == (newest / "tok-v2.json").read_bytes()
    assert not (out / "step3000" / "tok-v2.json").exists()  # not on the list


def test_a_huggingface_cache_snapshot_links_into_its_blobs(tmp_path: Path):
    """A checkpoint folder that is a snapshot of the huggingface_hub cache: every file is a link into the
    repository's blobs folder, and that is where they belong."""
    repo = tmp_path / "hub" / "models--org--run"
    run, out = tmp_path / "run", tmp_path / "out"
    write_pythia_run(run, STEPS[:2])
    snapshot = repo / "snapshots" / ("a" * 40)
    write_pythia_step(snapshot, 3000)
    (repo / "blobs").mkdir()
    for f in sorted(snapshot.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        f.symlink_to(Path("..", "..", "blobs", blob.name))
    (run / "step3000").symlink_to(snapshot)

    r = lawa(run, out)

    assert r.exit_code == 0, r.stderr
    assert (out / "step3000" / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()


def test_the_hub_copies_the_same_allow_list(tmp_path: Path):
    """Files of a revision outside the allow-list are neither downloaded nor copied."""
    repo = "someone/messy-run"
    root = tmp_path / "hub"
    for s in STEPS:
        write_pythia_step(root / repo / f"step{s}", s)
    (root / repo / "step3000" / ".env").write_text(SECRET)
    (root / repo / "step3000" / "training_args.txt").write_text("private")
    out = tmp_path / "out"
    with HubServer(root) as hub:
        r = invoke(
            "lawa", "--repo", repo, "--steps", "3000:3000", "--k", 3, "--out", out,
            "--endpoint", hub.url, "--cache-dir", tmp_path / "cache",
        )  # fmt: skip
        asked = " ".join(hub.requests)

    assert r.exit_code == 0, r.stderr
    copied = {p.name for p in (out / "step3000").iterdir()} - {"model.safetensors", "ckptavg.json"}
    assert copied == {p.name for p in (root / repo / "step3000").iterdir() if p.name in EXTRA_FILES}
    assert ".env" not in asked and "training_args.txt" not in asked


# ---------------------------------------------------------------- convert reads through the same boundary


def test_convert_of_a_truncated_ckpt_is_one_line(tmp_path: Path):
    src, out = tmp_path / "ckpt.pt", tmp_path / "gpt2"
    write_nanogpt_ckpt(src, 1000)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])

    line = error_line(invoke("convert", src, "--out", out))

    assert line.startswith(f"{src}: ")
    assert not out.exists() and not list(tmp_path.glob(".gpt2*"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_head": None}, "'n_head' is None, not a positive integer"),
        ({"n_embd": -16}, "'n_embd' is -16, not a positive integer"),
        ({"vocab_size": "96"}, "'vocab_size' is '96', not a positive integer"),
        ({"n_head": 3}, "n_embd 16 is not a multiple of n_head 3"),
        ({"dropout": float("nan")}, "'dropout' is nan, not a number in [0, 1]"),
    ],
)
def test_convert_names_the_model_arg_it_cannot_use(tmp_path: Path, change: dict[str, object], message: str):
    src, out = tmp_path / "ckpt.pt", tmp_path / "gpt2"
    write_nanogpt_ckpt(src, 1000)
    ckpt = torch.load(src, weights_only=True)
    ckpt["model_args"] = {k: v for k, v in {**ckpt["model_args"], **change}.items() if v is not None}
    torch.save(ckpt, src)

    line = error_line(invoke("convert", src, "--out", out))

    assert line == f"{src}: model_args: {message}"
    assert not out.exists() and not list(tmp_path.glob(".gpt2*"))


def test_convert_copies_only_tokenizer_files_and_never_through_a_link_out(tmp_path: Path):
    src, tok, out = tmp_path / "ckpt.pt", tmp_path / "tok", tmp_path / "gpt2"
    write_nanogpt_ckpt(src, 1000)
    write_pythia_step(tmp_path / "pythia", 1000)
    tok.mkdir()
    for f in (tmp_path / "pythia").glob("tokenizer*"):
        (tok / f.name).write_bytes(f.read_bytes())
    (tok / "tokenizer_notes.txt").write_text("private")

    assert invoke("convert", src, "--out", out, "--tokenizer", tok).exit_code == 0
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    assert not (out / "tokenizer_notes.txt").exists()

    (tmp_path / "secret").write_text(SECRET)
    (tok / "vocab.json").symlink_to(tmp_path / "secret")
    line = error_line(invoke("convert", src, "--out", tmp_path / "again", "--tokenizer", tok))
    assert line.startswith(f"{tok / 'vocab.json'}: a symlink to {tmp_path / 'secret'}, outside the checkpoint folder")
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------- paths of any bytes


def test_a_run_folder_whose_name_is_not_utf8_is_averaged(tmp_path: Path):
    """torch's file reader takes UTF-8 names only; such a path is read through its descriptor."""
    plain, odd = tmp_path / "run", tmp_path / os.fsdecode(b"run-\xff\xfe")
    write_pythia_run(plain, STEPS, tokenizer=False)
    odd.mkdir()
    for s in STEPS:
        (odd / f"step{s}").symlink_to(plain / f"step{s}")  # the same bytes, under a name that is not UTF-8

    assert lawa(plain, tmp_path / "a").exit_code == 0
    r = lawa(odd, tmp_path / "b")

    assert r.exit_code == 0, r.stderr
    a, b = (load_file(tmp_path / x / "step3000" / "model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_weight_file_swapped_for_a_pipe_after_planning_is_an_error_not_a_hang(tmp_path: Path):
    from safetensors.torch import save_file

    from ckptavg.errors import InvalidCheckpointError
    from ckptavg.sources import FileTable, open_checkpoint

    folder = tmp_path / "c"
    folder.mkdir()
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")
    header = open_checkpoint(folder)  # planned from a regular file
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")  # opening a pipe for reading blocks until a writer comes

    with FileTable() as files, pytest.raises(InvalidCheckpointError, match="no longer a regular file"):
        header.open(files).read("w", 0, 4, torch.empty(16, dtype=torch.uint8))
