"""Reading and writing `.safetensors` files with our own parser: no pickle, no torch, no copy for float32.

A safetensors file is three parts:

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data region]

The header maps each tensor name to `{"dtype": "F32", "shape": [896], "data_offsets": [begin, end]}`,
offsets counted from the start of the data region; an optional `"__metadata__"` maps strings to
strings. Tensors tile the data region exactly: the first begins at 0, each begins where the previous
ends, and the last ends at the end of the file.

Loading in float32 a tensor stored as F32 costs nothing: it is a read-only view of one memory map of
the file, and pages are read from disk only when the model touches them. Any other combination (BF16
or F16 stored, float64 asked) is converted chunk by chunk into one preallocated array, reading with
plain file reads, so that the page cache (which does not count in the process's RSS) holds the stored
bytes and the process holds only the result plus one small buffer.

>>> import tempfile, os, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.safetensors")
>>> write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, dtype="bfloat16")
>>> [(e.name, e.dtype, e.shape) for e in read_safetensors_header(path).entries]
[('w', 'BF16', (2, 3))]
>>> load_safetensors(path)["w"]
array([[0., 1., 2.],
       [3., 4., 5.]], dtype=float32)
"""

import json
import math
import mmap
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_NAMES",
    "TensorEntry",
    "SafetensorsHeader",
    "read_safetensors_header",
    "load_safetensors",
    "write_safetensors",
    "is_memory_mapped",
]

# safetensors dtype name -> NumPy dtype (little-endian, as the format requires)
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# the reverse, for writing: NumPy dtype name -> safetensors dtype
SAFETENSORS_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# dtypes the format defines that a Qwen2 checkpoint never holds; named so the error can say "unsupported"
_OTHER_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0"}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
CHUNK_BYTES = 16 * 2**20  # stored bytes converted per step: bounds the extra memory while loading


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes are (absolute file offsets) and what they hold."""

    name: str
    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple
    start: int  # absolute offset in the file of the first byte
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    entries: list  # [TensorEntry], in file order
    metadata: dict  # the "__metadata__" strings ({"format": "pt"} for files written by transformers)
    data_start: int  # 8 + N


def _fail(path, what, tensor=None):
    where = f"{path}" if tensor is None else f"tensor {tensor!r} in {path}"
    raise CheckpointError(f"{where}: {what}")


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_safetensors_header(path):
    """Parse and check the header of the safetensors file at `path`; read no tensor data.

    Every check happens here, before any tensor is loaded, so a bad file never half-loads: the 8-byte
    length, the JSON, each entry's dtype/shape/offsets, offsets that tile the data region with no gap
    or overlap, and a data region as long as the offsets say. Raises `CheckpointError` naming the file
    (and the tensor).
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                _fail(path, f"truncated: expected at least 8 bytes (the header length), found {file_size}")
            header_len = int.from_bytes(prefix, "little")
            if header_len > file_size - 8:
                _fail(path, f"header length {header_len} runs past the end of the file ({file_size} bytes); "
                      "the file is truncated or not a safetensors file")
            if header_len > MAX_HEADER_BYTES:
                _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(path, f"the header is not valid JSON: {e}")
    if not isinstance(header, dict):
        _fail(path, f"the header must be a JSON object, found {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _fail(path, "'__metadata__' must map strings to strings")
    data_start = 8 + header_len
    data_len = file_size - data_start

    entries = [_check_entry(path, name, info, data_start) for name, info in header.items()]
    # subtle: the format requires the tensors to tile the data region exactly, in offset order
    position = 0
    for e in sorted(entries, key=lambda e: (e.start, e.nbytes)):
        begin = e.start - data_start
        if begin < position:
            _fail(path, f"data_offsets [{begin}, {begin + e.nbytes}] overlap the previous tensor, "
                  f"which ends at {position}", e.name)
        if begin > position:
            _fail(path, f"data_offsets [{begin}, {begin + e.nbytes}] leave a gap after offset {position}", e.name)
        position = begin + e.nbytes
        if position > data_len:
            _fail(path, f"data_offsets end at {position}, past the end of the data region ({data_len} bytes): "
                  "the file is truncated", e.name)
    if position != data_len:
        _fail(path, f"the tensors cover {position} bytes of data but the data region holds {data_len}")
    return SafetensorsHeader(path, entries, metadata, data_start)


def _check_entry(path, name, info, data_start):
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        _fail(path, f"expected an entry with keys dtype, shape, data_offsets, found {info!r}"[:300], name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        kind = "unsupported" if isinstance(dtype, str) and dtype in _OTHER_DTYPES else "unknown"
        _fail(path, f"{kind} dtype {dtype!r}: expected one of {known}", name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        _fail(path, f"shape must be a list of non-negative integers, found {shape!r}", name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        _fail(path, f"data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}", name)
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        _fail(path, f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape {shape} "
              f"of {dtype} needs {expected}", name)
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], expected)


def load_safetensors(path, dtype="float32", progress=None, header=None):
    """`{name: array}` for every tensor of the file, in `dtype` ("float32" or "float64").

    Stored in `dtype` already: a read-only view of one memory map of the file (no copy, no read).
    Otherwise: a new array filled chunk by chunk (at most `CHUNK_BYTES` of stored data at a time).
    `progress(done_bytes, total_bytes, name)` is called after each tensor.

    >>> import tempfile, os, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_safetensors(path, {"b": np.ones(2, np.float32)})
    >>> t = load_safetensors(path)["b"]
    >>> t, t.flags.writeable, is_memory_mapped(t)
    (array([1., 1.], dtype=float32), False, True)
    """
    out_dtype = np.dtype(dtype)
    header = read_safetensors_header(path) if header is None else header
    total = sum(e.nbytes for e in header.entries)
    done = 0
    mapped = None  # one memory map of the whole file, shared by every tensor stored in `dtype`
    tensors = {}
    with open(header.path, "rb") as f:
        for e in header.entries:
            stored = SAFETENSORS_DTYPES[e.dtype]
            if stored == out_dtype:
                if mapped is None:
                    mapped = np.memmap(header.path, dtype=np.uint8, mode="r")
                # no copy: a plain-ndarray view of the map (not the np.memmap subclass)
                flat = mapped[e.start:e.start + e.nbytes].view(np.ndarray).view(stored)
                tensors[e.name] = flat.reshape(e.shape)
            else:
                tensors[e.name] = _read_converted(f, header.path, e, stored, out_dtype)
            done += e.nbytes
            if progress is not None:
                progress(done, total, e.name)
    return tensors


def is_memory_mapped(array):
    """True when `array` is a view of a memory-mapped file (its chain of `.base` reaches a map).

    >>> is_memory_mapped(np.zeros(3))
    False
    """
    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


def _read_converted(f, path, e, stored, out_dtype):
    """Read tensor `e` (stored as `stored`) into a new `out_dtype` array, one chunk of the file at a time."""
    out = np.empty(e.shape, dtype=out_dtype)
    flat = out.reshape(-1)
    step = max(CHUNK_BYTES // stored.itemsize, 1) * stored.itemsize
    buffer = np.empty(min(step, e.nbytes), dtype=np.uint8)
    f.seek(e.start)
    for begin in range(0, e.nbytes, step):
        chunk = buffer[:min(step, e.nbytes - begin)]
        if f.readinto(chunk) != chunk.nbytes:
            _fail(path, "the file ended while reading this tensor: it is truncated", e.name)
        i = begin // stored.itemsize
        flat[i:i + chunk.nbytes // stored.itemsize] = chunk.view(stored)  # exact widening (or rounding) cast
    return out


def write_safetensors(path, tensors, dtype=None, metadata=None):
    """Write `{name: array}` as a safetensors file, converting to `dtype` ("float32", "bfloat16",
    "float16", "float64"; None keeps each array's dtype) chunk by chunk.

    The header lists tensors in name order with `{"format": "pt"}` metadata, which is what the
    `safetensors` package and transformers expect. The file is written under a temporary name and
    renamed, so a reader never sees a half-written file.

    A tensor may also be any object with `shape`, `dtype` and `chunks(n)`, which yields its values in C
    order, about n at a time (a weight converted per use; a synthetic weight drawn as it is written):
    such a tensor is never whole in memory.
    """
    path = os.fspath(path)
    names = sorted(tensors)
    header, offset, plan = {}, 0, []
    for name in names:
        array = tensors[name]
        target = np.dtype(array.dtype) if dtype is None else np.dtype(_numpy_dtype(dtype))
        type_name = SAFETENSORS_NAMES.get(target.name)
        if type_name is None:
            raise CheckpointError(f"tensor {name!r}: cannot write dtype {target.name} to {path}: "
                                  f"expected one of {', '.join(SAFETENSORS_NAMES)}")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * target.itemsize
        header[name] = {"dtype": type_name, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((array, target))
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data region starts 8-byte aligned

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for array, target in plan:
                step = max(CHUNK_BYTES // max(target.itemsize, 1), 1)
                for piece in _chunks(array, step):
                    f.write(np.ascontiguousarray(piece, dtype=target).tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _chunks(array, step):
    """The values of `array` in C order, about `step` at a time."""
    if hasattr(array, "chunks"):
        yield from array.chunks(step)
        return
    flat = np.asarray(array).reshape(-1)
    for i in range(0, flat.size, step):
        yield flat[i:i + step]


def _numpy_dtype(name):
    if isinstance(name, str) and name == "bfloat16":
        return ml_dtypes.bfloat16
    return name
