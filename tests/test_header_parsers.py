"""The input boundary, one field at a time: every header field of a safetensors file, every record of a
torch zip file and every entry of a shard index is checked before it is used, and a bad one is refused
with one line that names the file and says what is wrong.

Each test writes a real file (``safetensors.torch.save_file``, ``torch.save``), damages exactly one thing,
and asserts the message fragment. The dtype tests average real files of every low-precision format through
the CLI and compare against a float64 reference rounded to the dtype.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptavg.cli import cli
from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources import torch_file
from ckptavg.sources.index import MAX_INDEX_BYTES, shard_files, weight_map
from ckptavg.sources.safetensors_file import DTYPES, read_safetensors_header, read_safetensors_index
from ckptavg.sources.torch_file import load_torch_file, read_torch_structure

# ---------------------------------------------------------------- safetensors headers


def st_bytes(header: dict | str, data: bytes) -> bytes:
    """A safetensors file from a header (a dict, or raw JSON text) and data bytes."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def parse(blob: bytes, label: str = "m.safetensors") -> dict:
    return read_safetensors_header(io.BytesIO(blob), len(blob), Path(label))[0]


def refused(blob: bytes, label: str = "m.safetensors") -> str:
    with pytest.raises(InvalidCheckpointError) as e:
        parse(blob, label)
    msg = str(e.value)
    assert msg.startswith(f"{label}: ") and "\n" not in msg, msg
    return msg


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def with_w(**fields: object) -> bytes:
    return st_bytes({"w": {**W, **fields}}, bytes(8))


def test_a_valid_header_parses(tmp_path: Path):
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(0), "c": torch.ones(4, dtype=torch.int8)}, tmp_path / "m")
    entries, meta = read_safetensors_index(tmp_path / "m")
    assert {n: (e.info.shape, e.info.dtype) for n, e in entries.items()} == {
        "a": ((2, 3), torch.float32),
        "b": ((0,), torch.float32),
        "c": ((4,), torch.int8),
    }


def test_zero_size_tensor_at_another_tensors_start_is_accepted():
    blob = st_bytes({"w": W, "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}}, bytes(8))
    assert list(parse(blob)) == ["z", "w"]


def test_header_that_is_not_an_object():
    assert "header is a JSON array, not an object" in refused(st_bytes("[1, 2]", b""))


def test_header_that_is_not_utf8():
    raw = b'{"\xff": {}}'
    assert "header is not UTF-8 (byte 2)" in refused(struct.pack("<Q", len(raw)) + raw)


def test_header_cut_short_by_the_stream():
    blob = with_w()
    with pytest.raises(InvalidCheckpointError, match="header cut short at 10 of"):
        read_safetensors_header(io.BytesIO(blob[:18]), len(blob), Path("m.safetensors"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}', "Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN is not a JSON number"),
        ('{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', "Infinity is not a JSON number"),
        ('{"w": ', "header is not valid JSON (Expecting value"),
    ],
    ids=["int-of-5000-digits", "deep-nesting", "nan", "infinity", "cut-json"],
)
def test_json_that_python_would_choke_on(text: str, fragment: str):
    assert fragment in refused(st_bytes(text, bytes(8)))


def test_huge_float_exponent_is_not_a_shape():
    text = '{"w": {"dtype": "F32", "shape": [1e99999], "data_offsets": [0, 8]}}'
    assert "shape [Infinity] is not a list of non-negative integers" in refused(st_bytes(text, bytes(8)))


def test_repeated_tensor_name_is_refused():
    """The safetensors library silently accepts either copy; so does json.loads (the last one)."""
    w = json.dumps(W)
    text = f'{{"w": {w}, "w": {w}}}'
    assert 'header repeats the key "w"' in refused(st_bytes(text, bytes(8)))


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ([], "__metadata__ is a JSON array, not an object of strings"),
        ("pt", "__metadata__ is a JSON string, not an object of strings"),
        ({"format": 1}, '__metadata__ value of "format" is a JSON number; the format allows only strings'),
        ({"format": {"a": "b"}}, '__metadata__ value of "format" is a JSON object'),
    ],
)
def test_metadata_must_be_an_object_of_strings(metadata: object, fragment: str):
    assert fragment in refused(st_bytes({"__metadata__": metadata, "w": W}, bytes(8)))


def test_null_metadata_reads_as_none_as_in_the_safetensors_library():
    blob = st_bytes({"__metadata__": None, "w": W}, bytes(8))
    assert read_safetensors_header(io.BytesIO(blob), len(blob), Path("m"))[1] == {}


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "a tensor has an empty name"),
        ("a\x00b", 'tensor name "a\\u0000b" holds control characters'),
        ("line\nbreak", 'tensor name "line\\nbreak" holds control characters'),
        ("x\x85", "holds control characters"),
    ],
)
def test_tensor_names_must_be_printable_and_non_empty(name: str, fragment: str):
    assert fragment in refused(st_bytes({name: W}, bytes(8)))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ([1, 2], "tensor 'w': header entry is a JSON array, not an object"),
        ({"shape": [2], "data_offsets": [0, 8]}, "tensor 'w': header entry has no dtype"),
        ({"dtype": "F32"}, "tensor 'w': header entry has no data_offsets, shape"),
        ({**W, "byte_order": "big"}, "tensor 'w': header entry has unknown field(s) \"byte_order\""),
    ],
)
def test_entry_must_hold_exactly_dtype_shape_and_offsets(spec: object, fragment: str):
    assert fragment in refused(st_bytes({"w": spec}, bytes(8)))


@pytest.mark.parametrize(
    "dtype, fragment",
    [
        (4, "dtype is a JSON number, not a string"),
        ("F128", 'unknown dtype "F128" (known: F64, F32'),
        ("F4", "dtype F4 (packed 4-bit floats) is not supported"),
        ("F6_E2M3", "dtype F6_E2M3 (packed 6-bit floats) is not supported"),
        ("C64", "dtype C64 (complex numbers) is not supported"),
    ],
)
def test_dtype_must_be_a_known_name(dtype: object, fragment: str):
    assert fragment in refused(with_w(dtype=dtype))


@pytest.mark.parametrize(
    "shape",
    [[2.0], [2.5], [True, 2], [-2], "2", 2, None, [[2]], [2**63]],
    ids=["float", "fraction", "bool", "negative", "string", "number", "null", "nested", "past-int64"],
)
def test_shape_must_be_a_list_of_non_negative_ints(shape: object):
    assert "is not a list of non-negative integers" in refused(with_w(shape=shape))


def test_shape_whose_bytes_overflow_int64_is_refused_without_computing_them():
    shape = [2**62] * 100_000  # a naive product has 6 million bits
    msg = refused(with_w(shape=shape))
    assert "needs more than the file's 8 bytes of data; the header is corrupt" in msg and len(msg) < 300


@pytest.mark.parametrize(
    "offsets, fragment",
    [
        ([0], "is not a pair of non-negative 64-bit integers"),
        ([0, 8, 16], "is not a pair"),
        ([0.0, 8], "is not a pair"),
        ([False, 8], "is not a pair"),
        ([-8, 0], "is not a pair"),
        ([0, 2**64], "is not a pair"),
        ({"begin": 0}, "is not a pair"),
        ([8, 0], "data_offsets [8, 0) ends before it begins"),
        ([0, 4], "bytes [0, 4), but shape [2] of F32 needs 8 bytes"),
    ],
)
def test_data_offsets_must_be_an_ordered_pair_matching_the_shape(offsets: object, fragment: str):
    assert fragment in refused(with_w(data_offsets=offsets))


def test_long_values_are_cut_in_messages():
    msg = refused(with_w(dtype="X" * 10_000))
    assert len(msg) < 400 and '"XXXX' in msg and "XXX... (known:" in msg


# ---------------------------------------------------------------- dtypes end to end

FLOAT8 = [DTYPES[c] for c in ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0") if c in DTYPES]
UINTS = [torch.uint16, torch.uint32, torch.uint64]
STEPS = [1000, 2000, 3000, 4000]


def write_steps(root: Path, dtype: torch.dtype) -> dict[int, dict[str, torch.Tensor]]:
    """Steps of a small run in ``dtype``: a float tensor (averaged) unless dtype is an integer, and a
    tensor big enough to straddle the engine's chunks."""
    states = {}
    for s in STEPS:
        g = torch.Generator().manual_seed(s)
        if dtype.is_floating_point:
            x = torch.randn(70_000, generator=g, dtype=torch.float64) * (s / 1000)
            if dtype == DTYPES.get("F8_E8M0"):  # scales: positive powers of two only
                x = x.abs() + 2**-10
            state = {"w": x.to(dtype), "scalar": x[:1].reshape(()).to(dtype)}
        else:
            top = min(torch.iinfo(dtype).max, 2**62)
            state = {"w": torch.randint(0, top, (70_000,), generator=g, dtype=torch.int64).to(dtype)}
        (root / f"step{s}").mkdir(parents=True)
        save_file(state, root / f"step{s}" / "model.safetensors", metadata={"format": "pt"})
        states[s] = state
    return states


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    """Read back with our own parser (the safetensors library cannot read every dtype it writes: F8_E8M0)."""
    f = folder / "model.safetensors"
    entries, _ = read_safetensors_index(f)
    raw = f.read_bytes()
    return {
        n: torch.frombuffer(bytearray(raw[e.offset : e.offset + e.info.nbytes]), dtype=torch.uint8)
        .view(e.info.dtype)
        .reshape(e.info.shape)
        if e.info.nbytes
        else torch.empty(e.info.shape, dtype=e.info.dtype)
        for n, e in entries.items()
    }


def mean_of(states: dict[int, dict[str, torch.Tensor]], steps: list[int], name: str) -> torch.Tensor:
    dtype = states[steps[0]][name].dtype
    return torch.stack([states[s][name].to(torch.float64) for s in steps]).mean(0).to(dtype)


def run_cli(*args: object) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# Means of two members and EMA with decay 0.5 are exact in float32, so the output must be the float64
# reference rounded to the dtype, bit for bit, whichever reducer the plan picks.
PLANS = {
    "avg": (lambda run, out: ("avg", run / "step3000", run / "step4000", "--out", out), [3000, 4000]),
    "lawa-disjoint-float32": (
        lambda run, out: ("lawa", run, "--steps", "4000:4000", "--k", "2", "--out", out),
        [3000, 4000],
    ),
    "lawa-overlapping-float64": (
        lambda run, out: ("lawa", run, "--steps", "3000:4000", "--k", "2", "--out", out),
        [3000, 4000],
    ),
    "ema": (
        lambda run, out: ("ema", run, "--steps", "3000:4000", "--decay", "0.5", "--interval", "1000", "--out", out),
        [3000, 4000],
    ),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("dtype", FLOAT8, ids=lambda d: str(d).removeprefix("torch."))
def test_float8_is_averaged_in_float32_and_written_in_its_own_dtype(tmp_path: Path, dtype: torch.dtype, plan: str):
    run, out = tmp_path / "run", tmp_path / "out"
    states = write_steps(run, dtype)
    make_args, members = PLANS[plan]
    run_cli(*make_args(run, out))
    folder = out if plan == "avg" else out / "step4000"
    got = read_output(folder)
    for name in ("w", "scalar"):
        assert same_bits(got[name], mean_of(states, members, name)), name


@pytest.mark.parametrize("dtype", UINTS, ids=lambda d: str(d).removeprefix("torch."))
def test_wide_unsigned_integers_are_copied_from_the_newest_member(tmp_path: Path, dtype: torch.dtype):
    run, out = tmp_path / "run", tmp_path / "out"
    states = write_steps(run, dtype)
    run_cli("lawa", run, "--steps", "4000:4000", "--k", "3", "--out", out)
    assert same_bits(read_output(out / "step4000")["w"], states[4000]["w"])


def test_nan_in_a_float8_member_is_named_not_a_crash(tmp_path: Path):
    """torch has no isfinite for float8_e4m3fn: the check must upcast rather than raise."""
    run, out = tmp_path / "run", tmp_path / "out"
    write_steps(run, torch.float8_e4m3fn)
    f = run / "step3000" / "model.safetensors"
    save_file(
        {
            "w": torch.full((70_000,), float("nan")).to(torch.float8_e4m3fn),
            "scalar": torch.tensor(1.0).to(torch.float8_e4m3fn),
        },
        f,
        metadata={"format": "pt"},
    )
    result = CliRunner().invoke(cli, ["lawa", str(run), "--steps", "4000:4000", "--k", "2", "--out", str(out)])
    assert result.exit_code == 1
    assert f"tensor 'w' holds NaN or Inf at step 3000 ({run / 'step3000'})" in result.stderr


# ---------------------------------------------------------------- shard indexes

INDEX = "run/step1/model.safetensors.index.json"


def index_bytes(weight_map: object, **extra: object) -> bytes:
    return json.dumps({"metadata": {"total_size": 12.0}, "weight_map": weight_map, **extra}).encode()


def index_refused(raw: bytes) -> str:
    with pytest.raises(InvalidCheckpointError) as e:
        shard_files(raw, INDEX)
    msg = str(e.value)
    assert msg.startswith(f"{INDEX}: ") and "\n" not in msg, msg
    return msg


def test_shard_files_in_first_appearance_order():
    raw = index_bytes({"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors", "d": "sub/m-3.bin"})
    assert shard_files(raw, INDEX) == ["m-2.safetensors", "m-1.safetensors", "sub/m-3.bin"]
    assert weight_map(raw, INDEX)["c"] == "m-2.safetensors"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"[]", "index is a JSON array, not an object"),
        (b'{"metadata": {}}', "index has no weight_map"),
        (index_bytes(["a"]), "weight_map is a JSON array, not an object"),
        (index_bytes({}), "weight_map is empty"),
        (index_bytes({"a": 3}), "weight_map gives tensor 'a' a JSON number, not a file name"),
        (b'{"weight_map": {"a": "x", "a": "y"}}', 'index repeats the key "a"'),
        (b"\xff\xfe{}", "index is not UTF-8 (byte 0)"),
        (index_bytes({"": "x"}), "a tensor has an empty name"),
        (index_bytes({"a\nb": "x"}), 'tensor name "a\\nb" holds control characters'),
    ],
)
def test_index_structure(raw: bytes, fragment: str):
    assert fragment in index_refused(raw)


@pytest.mark.parametrize(
    "file, why",
    [
        ("", "is empty"),
        ("../../x", "climbs out with '..'"),
        ("a/../../x", "climbs out with '..'"),
        ("/etc/hostname", "is an absolute path"),
        ("a\\..\\x", "holds a backslash"),
        ("C:x.bin", "starts with a drive letter"),
        ("a//b.bin", "has an empty or '.' part"),
        ("./a.bin", "has an empty or '.' part"),
        ("a/", "has an empty or '.' part"),
        ("a\x00.bin", "holds control characters"),
        ("model.safetensors.index.json", "is an index, not a shard"),
    ],
)
def test_index_file_names_must_be_plain_relative_paths(file: str, why: str):
    msg = index_refused(index_bytes({"w": file}))
    assert f"weight_map puts tensor 'w' in {json.dumps(file)}, which {why}" in msg
    assert "inside the checkpoint folder" in msg


def test_index_over_the_size_bound_is_refused_unread():
    raw = b" " * (MAX_INDEX_BYTES + 1)
    assert f"index is {MAX_INDEX_BYTES + 1} bytes, over the {MAX_INDEX_BYTES}" in index_refused(raw)


# ---------------------------------------------------------------- torch zip files


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rezip(raw: bytes, edit=lambda name, data: (name, data, zipfile.ZIP_STORED)) -> bytes:  # type: ignore[no-untyped-def]
    """The archive rewritten record by record; ``edit`` may rename a record, change its bytes or compress it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as z, zipfile.ZipFile(out, "w") as o:
        for zi in z.infolist():
            name, data, method = edit(zi.filename, z.read(zi))
            o.writestr(name, data, compress_type=method)
    return out.getvalue()


def torch_refused(tmp_path: Path, raw: bytes) -> tuple[str, str]:
    """The messages of the local reader and the stream (Hub) reader, each checked to be one line naming
    the file."""
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(raw)
    with pytest.raises(InvalidCheckpointError) as local:
        load_torch_file(f)
    with pytest.raises(InvalidCheckpointError) as stream:
        read_torch_structure(io.BytesIO(raw), "org/model@step1/pytorch_model.bin")
    for msg, name in ((str(local.value), str(f)), (str(stream.value), "org/model@step1/pytorch_model.bin")):
        assert msg.startswith(f"{name}: ") and "\n" not in msg, msg
    return str(local.value), str(stream.value)


STATE = {"w": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}


def test_a_rezipped_torch_file_still_loads(tmp_path: Path):
    """The control for the tests below: rewriting the archive alone breaks nothing."""
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(rezip(torch_bytes(STATE)))
    obj, offset = load_torch_file(f)
    assert isinstance(obj, dict) and torch.equal(obj["w"], STATE["w"])
    assert read_torch_structure(io.BytesIO(f.read_bytes()), "x")["b"].shape == (3,)


@pytest.mark.parametrize("record", ["data/0", "data.pkl", "version"])
def test_compressed_records_are_refused_before_torch_inflates_them(tmp_path: Path, record: str):
    def deflate(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, data, zipfile.ZIP_DEFLATED if name.endswith("/" + record) else zipfile.ZIP_STORED

    for msg in torch_refused(tmp_path, rezip(torch_bytes(STATE), deflate)):
        assert f"/{record} is compressed (zip method 8); torch never writes compressed records" in msg


def test_pickle_over_the_bound_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch_file, "MAX_PICKLE_BYTES", 64)
    for msg in torch_refused(tmp_path, torch_bytes(STATE)):
        assert "/data.pkl) is" in msg and "bytes, over the 64 a checkpoint's structure can need" in msg


def test_storage_record_shorter_than_its_tensor_names_the_tensor(tmp_path: Path):
    def shorten(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, data[:20] if name.endswith("/data/0") else data, zipfile.ZIP_STORED

    raw = rezip(torch_bytes({"w": torch.arange(10, dtype=torch.float32)}), shorten)
    for msg in torch_refused(tmp_path, raw):
        assert "tensor 'w' needs bytes [0, 40) of storage record data/0, which holds 20" in msg


def test_view_past_its_record_names_the_tensor(tmp_path: Path):
    """A view at offset 2 of a 12-element storage whose record was cut to 10 elements."""

    def shorten(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, data[:40] if name.endswith("/data/0") else data, zipfile.ZIP_STORED

    base = torch.arange(12, dtype=torch.float32)
    raw = rezip(torch_bytes({"head": base[:2], "w": base[2:]}), shorten)
    for msg in torch_refused(tmp_path, raw):
        assert "tensor 'w' needs bytes [8, 48) of storage record data/0, which holds 40" in msg


def test_nested_tensor_is_named_by_its_path(tmp_path: Path):
    def shorten(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, data[:4] if name.endswith("/data/0") else data, zipfile.ZIP_STORED

    raw = rezip(torch_bytes({"model": {"wte.weight": torch.ones(4)}, "iter_num": 7}), shorten)
    for msg in torch_refused(tmp_path, raw):
        assert "tensor 'model.wte.weight' needs bytes [0, 16)" in msg


def test_storage_without_a_record_is_refused(tmp_path: Path):
    def rename(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name.replace("/data/0", "/data/9"), data, zipfile.ZIP_STORED

    for msg in torch_refused(tmp_path, rezip(torch_bytes({"w": torch.ones(4)}), rename)):
        assert "the pickle refers to storage '0', which has no record" in msg


def test_archive_without_a_pickle_is_refused(tmp_path: Path):
    def rename(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name.replace("data.pkl", "other.pkl"), data, zipfile.ZIP_STORED

    for msg in torch_refused(tmp_path, rezip(torch_bytes(STATE), rename)):
        assert "/data.pkl record; not a torch checkpoint" in msg


def test_garbage_pickle_is_corrupt_not_a_traceback(tmp_path: Path):
    def garble(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, b"\x80\x02}q\x00(X\x01" if name.endswith("data.pkl") else data, zipfile.ZIP_STORED

    for msg in torch_refused(tmp_path, rezip(torch_bytes(STATE), garble)):
        assert "the pickle is corrupt (" in msg


def test_pickle_with_a_malformed_storage_reference(tmp_path: Path):
    pid = b"\x80\x02(X\x07\x00\x00\x00storageq\x00X\x01\x00\x00\x000tQ."  # BINPERSID of ('storage', '0')

    def swap(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, pid if name.endswith("data.pkl") else data, zipfile.ZIP_STORED

    for msg in torch_refused(tmp_path, rezip(torch_bytes(STATE), swap)):
        assert "the pickle holds a persistent id that is not a storage reference" in msg


def test_duplicate_record_names_are_refused(tmp_path: Path):
    raw = torch_bytes(STATE)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as z, zipfile.ZipFile(out, "w") as o:
        for zi in z.infolist():
            o.writestr(zi.filename, z.read(zi))
        with pytest.warns(UserWarning, match="Duplicate name"):
            o.writestr(z.infolist()[-1].filename, b"x")
    for msg in torch_refused(tmp_path, out.getvalue()):
        assert "appears twice in the zip directory" in msg


def test_record_past_the_end_of_the_file_is_refused(tmp_path: Path):
    """The directory is intact but claims a record larger than the bytes before it."""
    raw = bytearray(rezip(torch_bytes({"w": torch.ones(4)})))
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        zi = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    # Patch the sizes of data/0 in its central directory entry (compressed and uncompressed, 4 bytes each).
    name = zi.filename.encode()
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46 : at + 46 + len(name)] != name:
        at = raw.find(b"PK\x01\x02", at + 4)
    raw[at + 20 : at + 28] = struct.pack("<II", 10**6, 10**6)
    for msg in torch_refused(tmp_path, bytes(raw)):
        assert "/data/0 runs to byte" in msg and "the file is truncated" in msg


def test_pickle_memo_index_near_four_billion_costs_no_memory(tmp_path: Path):
    """LONG_BINPUT 2**32-1: the C unpickler grows its memo array to that index (tens of GB zeroed)."""
    import resource

    memo_bomb = b"\x80\x02}r\xff\xff\xff\xff."  # PROTO 2, EMPTY_DICT, LONG_BINPUT 4294967295, STOP

    def swap(name: str, data: bytes) -> tuple[str, bytes, int]:
        return name, memo_bomb if name.endswith("data.pkl") else data, zipfile.ZIP_STORED

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raw = rezip(torch_bytes(STATE), swap)
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(raw)
    assert load_torch_file(f)[0] == {}
    assert read_torch_structure(io.BytesIO(raw), "x") == {}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB
