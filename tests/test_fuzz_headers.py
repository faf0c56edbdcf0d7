"""Property-based fuzzing of the input boundary: mutated safetensors headers, torch zip files and shard
indexes either read as something consistent with the file, or fail with one line naming the file.

The property, for every parser: the call returns a result whose offsets and sizes agree with the file,
or raises ``InvalidCheckpointError`` (``UnsafePickleError`` included) whose message is one line starting
with the file's label. Any other exception, a traceback, is a failure; so is a run that grows the
process's peak memory by more than a bound (a zip bomb or a lying storage size would).

The default run is short (``FUZZ_EXAMPLES`` examples per property, a few seconds in all); the ``slow``
versions run ``FUZZ_EXAMPLES_SLOW`` (``CKPTAVG_FUZZ_EXAMPLES`` overrides both):
``pytest -m slow tests/test_fuzz_headers.py``.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from ckptavg.errors import InvalidCheckpointError
from ckptavg.sources.index import shard_files
from ckptavg.sources.safetensors_file import read_safetensors_header
from ckptavg.sources.torch_file import load_torch_file, read_torch_structure, state_dict_entries

FUZZ_EXAMPLES = int(os.environ.get("CKPTAVG_FUZZ_EXAMPLES", 60))
FUZZ_EXAMPLES_SLOW = int(os.environ.get("CKPTAVG_FUZZ_EXAMPLES", 3000))
PEAK_RSS_GROWTH = 512 << 20  # bytes the whole fuzz run may add to the process's peak RSS


def fuzz(examples: int) -> Callable:  # type: ignore[type-arg]
    return settings(
        max_examples=examples,
        deadline=2000,
        database=None,
        derandomize=examples == FUZZ_EXAMPLES,  # the default suite is the same every run
        suppress_health_check=list(HealthCheck),  # tmp_path is shared by the examples on purpose
    )


def refused_well(e: InvalidCheckpointError, label: str) -> None:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, repr(msg)
    assert msg.startswith(f"{label}: "), (label, msg)


@pytest.fixture
def asked_for(request: pytest.FixtureRequest) -> None:
    """The long runs need ``-m slow``: nothing in this project deselects ``slow`` tests by default."""
    if "slow" not in (request.config.option.markexpr or "") or "not slow" in request.config.option.markexpr:
        pytest.skip("a long fuzz run; select it with -m slow")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@pytest.fixture(autouse=True, scope="module")
def bounded_memory():  # type: ignore[no-untyped-def]
    before = peak_rss()
    yield
    grown = peak_rss() - before
    assert grown < PEAK_RSS_GROWTH, f"fuzzing grew the peak RSS by {grown >> 20} MiB"


# ---------------------------------------------------------------- JSON values

SPECIAL_INTS = st.sampled_from([0, 1, 2, 3, 4, 7, 8, -1, -8, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30])
SCALARS = (
    st.none()
    | st.booleans()
    | SPECIAL_INTS
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["F32", "F16", "I8", "BOOL", "F8_E8M0", "F4", "C64", "U64", "__metadata__", "..", "/x"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
NUMBER_TEXT = st.sampled_from(["1e99999", "-1e99999", "9" * 5000, "-0", "1.0", "2.5", "1e3", "[" * 3000])


# ---------------------------------------------------------------- (a) safetensors headers

ST_LABEL = "run/step1/model.safetensors"


def st_base() -> bytes:
    return save(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "z": torch.zeros(0, 4),
            "i": torch.ones(5, dtype=torch.int8),
            "s": torch.tensor(1.5, dtype=torch.float16),
        },
        metadata={"format": "pt"},
    )


ST_BASE = st_base()
(ST_N,) = struct.unpack("<Q", ST_BASE[:8])
ST_HEADER = json.loads(ST_BASE[8 : 8 + ST_N])
ST_DATA = ST_BASE[8 + ST_N :]


@st.composite
def st_mutants(draw: st.DrawFn) -> bytes:
    header = json.loads(json.dumps(ST_HEADER))
    names = sorted(header)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["field", "entry", "drop", "extra", "rename", "int", "offsets", "shape"]))
        entry = header.get(name)
        if how == "entry" or not isinstance(entry, dict):
            header[name] = draw(JSON)
        elif how == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
        elif how == "drop" and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif how == "extra":
            entry[draw(st.text(max_size=6))] = draw(JSON)
        elif how == "rename":
            header[draw(st.text(max_size=8))] = header.pop(name)
        elif how == "int" and entry.get("data_offsets"):
            entry["data_offsets"] = [draw(SPECIAL_INTS | st.integers(-100, 200)) for _ in range(2)]
        elif how == "offsets" and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
            shift = draw(st.integers(-16, 16))
            entry["data_offsets"] = [x + shift if isinstance(x, int) else x for x in entry["data_offsets"]]
        elif how == "shape":
            entry["shape"] = draw(st.lists(SPECIAL_INTS | st.integers(-3, 9), max_size=4))
    text = json.dumps(header)
    if draw(st.booleans()):  # splice in a number Python's json handles badly
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(NUMBER_TEXT) + text[at:]
    raw = bytearray(text.encode())
    for _ in range(draw(st.integers(0, 3))):  # byte flips in the header
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    n = len(raw)
    length = draw(st.sampled_from([n, n, n, n - 1, n + 1, 0, 2**64 - 1, 2**63])) if draw(st.booleans()) else n
    data = ST_DATA
    cut = draw(st.sampled_from(["none", "none", "shorter", "longer"]))
    if cut == "shorter":
        data = data[: draw(st.integers(0, len(data)))]
    elif cut == "longer":
        data = data + bytes(draw(st.integers(1, 16)))
    return struct.pack("<Q", length) + bytes(raw) + data


def check_safetensors(blob: bytes) -> None:
    try:
        entries, metadata = read_safetensors_header(io.BytesIO(blob), len(blob), Path(ST_LABEL))
    except InvalidCheckpointError as e:
        refused_well(e, ST_LABEL)
        return
    (n,) = struct.unpack("<Q", blob[:8])
    data_start, spans = 8 + n, []
    for name, e in entries.items():
        assert isinstance(name, str) and name and name.encode("utf-8")
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name), name
        assert data_start <= e.offset and e.offset + e.info.nbytes <= len(blob), name
        assert all(isinstance(d, int) and d >= 0 for d in e.info.shape)
        spans.append((e.offset, e.offset + e.info.nbytes))
    covered = data_start
    for begin, end in sorted(spans):
        assert begin == covered
        covered = end
    assert covered == len(blob)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


@fuzz(FUZZ_EXAMPLES)
@given(st_mutants())
def test_mutated_safetensors_headers(blob: bytes):
    check_safetensors(blob)


@pytest.mark.slow
@fuzz(FUZZ_EXAMPLES_SLOW)
@given(st_mutants())
def test_mutated_safetensors_headers_long(asked_for: None, blob: bytes):
    check_safetensors(blob)


# ---------------------------------------------------------------- (b) torch zip files

TORCH_LABEL = "org/model@step1/pytorch_model.bin"


def torch_base() -> bytes:
    base = torch.arange(12, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save({"a": base[:4], "b": base[4:], "h": torch.ones(3, dtype=torch.float16), "i": torch.tensor(7)}, buf)
    return buf.getvalue()


TORCH_BASE = torch_base()
with zipfile.ZipFile(io.BytesIO(TORCH_BASE)) as _z:
    TORCH_RECORDS = {zi.filename: _z.read(zi) for zi in _z.infolist()}


@st.composite
def torch_mutants(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "rename", "record", "pickle"]))
    if how in ("rename", "record", "pickle"):
        records = dict(TORCH_RECORDS)
        names = sorted(records)
        if how == "rename":
            old = draw(st.sampled_from(names))
            new = draw(st.sampled_from([n for n in names if n != old]) | st.text(min_size=1, max_size=12))
            records = {new if k == old else k: v for k, v in records.items()}
        elif how == "record":
            name = draw(st.sampled_from(names))
            data = records[name]
            records[name] = draw(st.sampled_from([data[: len(data) // 2], data + bytes(8), b"", data[1:]]))
        else:
            pkl = bytearray(records[next(n for n in names if n.endswith("data.pkl"))])
            for _ in range(draw(st.integers(1, 4))):
                pkl[draw(st.integers(0, len(pkl) - 1))] = draw(st.integers(0, 255))
            records[next(n for n in names if n.endswith("data.pkl"))] = bytes(pkl)
        out = io.BytesIO()
        compress = draw(st.sampled_from([None, None, None, *names]))
        with zipfile.ZipFile(out, "w") as o:
            for name, data in records.items():
                method = zipfile.ZIP_DEFLATED if name == compress else zipfile.ZIP_STORED
                o.writestr(name, data, compress_type=method)
        return out.getvalue()
    raw = bytearray(TORCH_BASE)
    if how == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    tail = max(0, len(raw) - 1024)  # the zip directory lives at the end: flip there more often
    for _ in range(draw(st.integers(1, 6))):
        lo = draw(st.sampled_from([0, tail, tail]))
        raw[draw(st.integers(lo, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def check_torch(blob: bytes, tmp: Path) -> None:
    try:
        obj = read_torch_structure(io.BytesIO(blob), TORCH_LABEL)
        entries, _ = state_dict_entries(Path(TORCH_LABEL), obj, None)  # as hub.py names it: by the file
        assert all(isinstance(n, str) for n in entries)
    except InvalidCheckpointError as e:
        refused_well(e, TORCH_LABEL)
    f = tmp / "pytorch_model.bin"
    f.write_bytes(blob)
    try:
        obj, offset = load_torch_file(f)
        entries, _ = state_dict_entries(f, obj, offset)
    except InvalidCheckpointError as e:
        refused_well(e, str(f))
        return
    for name, e in entries.items():
        if e.offset >= 0:
            assert e.offset + e.info.nbytes <= len(blob), name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on a mutated PROTO opcode
@fuzz(FUZZ_EXAMPLES)
@given(torch_mutants())
def test_mutated_torch_files(tmp_path: Path, blob: bytes):
    check_torch(blob, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@fuzz(FUZZ_EXAMPLES_SLOW)
@given(torch_mutants())
def test_mutated_torch_files_long(asked_for: None, tmp_path: Path, blob: bytes):
    check_torch(blob, tmp_path)


# ---------------------------------------------------------------- (c) shard indexes

INDEX_LABEL = "run/step1/model.safetensors.index.json"
PATHISH = st.lists(
    st.sampled_from(["a", "b", ".", "..", "/", "\\", ":", "\x00", "\n", "é", "\ud800", ".index.json"]), max_size=8
).map("".join)


@st.composite
def index_mutants(draw: st.DrawFn) -> bytes:
    weight_map = draw(st.dictionaries(st.text(max_size=6), PATHISH | JSON, max_size=5))
    index: object = {"metadata": draw(JSON), "weight_map": weight_map}
    if draw(st.integers(0, 5)) == 0:
        index = draw(JSON)
    raw = bytearray(json.dumps(index).encode())
    for _ in range(draw(st.integers(0, 2))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def check_index(raw: bytes) -> None:
    try:
        files = shard_files(raw, INDEX_LABEL)
    except InvalidCheckpointError as e:
        refused_well(e, INDEX_LABEL)
        return
    assert files and len(set(files)) == len(files)
    for f in files:
        parts = f.split("/")
        assert f.encode("utf-8") and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in f)
        assert "\\" not in f and not f.startswith("/") and ":" not in f[1:2]
        assert all(p not in ("", ".", "..") for p in parts), f
        assert not f.endswith(".index.json")


@fuzz(FUZZ_EXAMPLES)
@given(index_mutants())
def test_mutated_indexes(raw: bytes):
    check_index(raw)


@pytest.mark.slow
@fuzz(FUZZ_EXAMPLES_SLOW)
@given(index_mutants())
def test_mutated_indexes_long(asked_for: None, raw: bytes):
    check_index(raw)
