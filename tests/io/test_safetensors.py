"""qwen2np's own safetensors reader/writer: round trips, zero-copy float32, exact conversions, bad files.

The `safetensors` package (a core dependency) is the reference for the format: it must read what we
write and we must read what it writes.
"""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np.errors import CheckpointError
from qwen2np.io.safetensors_file import (
    is_memory_mapped,
    load_safetensors,
    read_safetensors_header,
    write_safetensors,
)

RNG = np.random.default_rng(0)


def _raw_file(path, header, data=b"", header_bytes=None):
    """A safetensors file with exactly this header (dict or raw bytes) and data, valid or not."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_float32_is_memory_mapped_without_copy(tmp_path):
    w = RNG.standard_normal((5, 7), dtype=np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"w": w, "b": w[0]})
    t = load_safetensors(tmp_path / "a.safetensors")
    assert is_memory_mapped(t["w"]) and is_memory_mapped(t["b"])
    assert not t["w"].flags.writeable
    assert t["w"].dtype == np.float32 and t["w"].shape == (5, 7)
    np.testing.assert_array_equal(t["w"], w)
    # both tensors are views of one map of the file
    assert np.shares_memory(t["w"], t["w"]) and t["w"].base is not None


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("wanted", ["float32", "float64"])
def test_conversions_are_exact_and_copied(tmp_path, stored, wanted):
    w = RNG.standard_normal((33, 17), dtype=np.float32) * 3
    write_safetensors(tmp_path / "a.safetensors", {"w": w}, dtype=stored)
    t = load_safetensors(tmp_path / "a.safetensors", dtype=wanted)["w"]
    expected = w.astype(ml_dtypes.bfloat16 if stored == "bfloat16" else stored).astype(wanted)
    assert t.dtype == np.dtype(wanted)
    np.testing.assert_array_equal(t, expected)
    assert is_memory_mapped(t) == (stored == wanted)


def test_conversion_in_many_chunks(tmp_path, monkeypatch):
    import qwen2np.io.safetensors_file as sf

    monkeypatch.setattr(sf, "CHUNK_BYTES", 10)  # 5 bf16 values per chunk, so chunks split rows
    w = RNG.standard_normal((7, 9), dtype=np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"w": w}, dtype="bfloat16")
    t = load_safetensors(tmp_path / "a.safetensors")["w"]
    np.testing.assert_array_equal(t, w.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_progress_reaches_total(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"a": np.ones(3, np.float32), "b": np.ones(5, np.float32)})
    calls = []
    load_safetensors(tmp_path / "a.safetensors", progress=lambda d, t, n: calls.append((d, t, n)))
    assert calls == [(12, 32, "a"), (32, 32, "b")]


def test_the_safetensors_package_reads_what_we_write(tmp_path):
    tensors = {"x": RNG.standard_normal((3, 4), dtype=np.float32), "y": np.arange(5, dtype=np.float64),
               "z": np.ones((0, 2), np.float32)}
    write_safetensors(tmp_path / "a.safetensors", tensors, dtype=None)
    theirs = safetensors.numpy.load_file(str(tmp_path / "a.safetensors"))
    assert theirs.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(theirs[name], tensors[name])
        assert theirs[name].dtype == tensors[name].dtype
    assert read_safetensors_header(tmp_path / "a.safetensors").metadata == {"format": "pt"}


def test_we_read_what_the_safetensors_package_writes(tmp_path):
    tensors = {"w": RNG.standard_normal((4, 6), dtype=np.float32), "h": np.arange(6, dtype=np.float16)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    ours = load_safetensors(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(ours["w"], tensors["w"])
    np.testing.assert_array_equal(ours["h"], tensors["h"].astype(np.float32))


@settings(max_examples=40)
@given(shapes=st.dictionaries(st.text("abc.", min_size=1, max_size=8),
                              st.lists(st.integers(0, 5), min_size=0, max_size=3), max_size=5),
       dtype=st.sampled_from([None, "float32", "bfloat16", "float16", "float64"]))
def test_round_trip_property(tmp_path_factory, shapes, dtype):
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    tensors = {n: np.arange(np.prod(s, dtype=np.int64), dtype=np.float32).reshape(s) - 7 for n, s in shapes.items()}
    write_safetensors(path, tensors, dtype=dtype)
    header = read_safetensors_header(path)
    assert [e.name for e in header.entries] == sorted(tensors)
    back = load_safetensors(path, dtype="float64")
    for name, w in tensors.items():
        # small integers are exact in every dtype written here
        np.testing.assert_array_equal(back[name], w.astype(np.float64))
        assert back[name].shape == w.shape


# --- bad files: each is a CheckpointError naming the file (and the tensor) ---------------------------

GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _error(path):
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_truncated_before_the_length(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\x05\x00")
    assert "truncated" in _error(tmp_path / "a.safetensors")


def test_header_length_beyond_the_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert "runs past the end of the file" in _error(tmp_path / "a.safetensors")


def test_bad_json(tmp_path):
    assert "not valid JSON" in _error(_raw_file(tmp_path / "a.safetensors", None, header_bytes=b"{not json"))


def test_duplicate_json_keys(tmp_path):
    raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}'
    assert "duplicate key 'w'" in _error(_raw_file(tmp_path / "a.safetensors", None, b"\0" * 8, header_bytes=raw))


def test_header_not_an_object(tmp_path):
    assert "JSON object" in _error(_raw_file(tmp_path / "a.safetensors", [1, 2]))


def test_unknown_dtype(tmp_path):
    msg = _error(_raw_file(tmp_path / "a.safetensors", {"w": {**GOOD_ENTRY, "dtype": "F99"}}, b"\0" * 8))
    assert "unknown dtype 'F99'" in msg and "'w'" in msg


def test_unsupported_integer_dtype(tmp_path):
    msg = _error(_raw_file(tmp_path / "a.safetensors", {"ids": {**GOOD_ENTRY, "dtype": "I32"}}, b"\0" * 8))
    assert "unsupported dtype 'I32'" in msg and "'ids'" in msg


def test_offsets_do_not_match_shape(tmp_path):
    msg = _error(_raw_file(tmp_path / "a.safetensors", {"w": {**GOOD_ENTRY, "shape": [3]}}, b"\0" * 8))
    assert "needs 12" in msg and "'w'" in msg


def test_overlapping_offsets(tmp_path):
    header = {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    msg = _error(_raw_file(tmp_path / "a.safetensors", header, b"\0" * 12))
    assert "overlap" in msg and "'b'" in msg


def test_gap_between_tensors(tmp_path):
    header = {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    msg = _error(_raw_file(tmp_path / "a.safetensors", header, b"\0" * 20))
    assert "gap" in msg and "'b'" in msg


def test_offsets_outside_the_data_region(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    msg = _error(_raw_file(tmp_path / "a.safetensors", header, b"\0" * 8))  # truncated data
    assert "past the end of the data region" in msg and "'w'" in msg


def test_trailing_bytes_after_the_tensors(tmp_path):
    assert "data region holds 12" in _error(_raw_file(tmp_path / "a.safetensors", {"w": GOOD_ENTRY}, b"\0" * 12))


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": [2]},
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
    "not a dict",
])
def test_malformed_entries(tmp_path, entry):
    assert "'w'" in _error(_raw_file(tmp_path / "a.safetensors", {"w": entry}, b"\0" * 8))


@settings(max_examples=200)
@given(data=st.data())
def test_corrupt_headers_raise_checkpoint_errors_only(tmp_path_factory, data):
    """Any byte of a valid file flipped, or the file cut anywhere: a clean load or a CheckpointError."""
    path = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    write_safetensors(path, {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float16)}, dtype=None)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        load_safetensors(path)
    except CheckpointError as e:
        assert str(path) in str(e)


def test_missing_file(tmp_path):
    assert "cannot read" in _error(tmp_path / "nope.safetensors")


def test_write_refuses_integer_arrays(tmp_path):
    with pytest.raises(CheckpointError, match="'ids'"):
        write_safetensors(tmp_path / "a.safetensors", {"ids": np.arange(3)})
    assert not list(tmp_path.iterdir())  # nothing half-written
