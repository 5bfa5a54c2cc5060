"""The header of a GGUF file: its metadata keys and its table of tensors, parsed without reading tensor data.

A GGUF file (llama.cpp's format, versions 2 and 3) is laid out as::

    "GGUF"  version:u32  tensor_count:u64  kv_count:u64
    kv_count x   key:string  type:u32  value          (the metadata: config, tokenizer, ...)
    tensor_count x  name:string  n_dims:u32  dims:u64[n_dims]  ggml_type:u32  offset:u64
    padding to `general.alignment` (32 by default)
    the data region: each tensor at data_start + offset

Strings are a u64 length and UTF-8 bytes. `dims` run fastest-moving first, so a NumPy shape is the
reverse: `token_embd.weight` with dims [896, 151936] is a [151936, 896] array.

`gguf.GGUFReader` parses the same thing, but it builds a NumPy array for every metadata string: for
this project's 0.5B file (303,323 strings in the vocabulary and merges) that takes about 12 s and
515 MB. This parser takes a fraction of a second, and skips string arrays it is not asked for (their
length is kept in `array_lengths`). tests/io/test_gguf.py holds it equal to `GGUFReader`.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
>>> _ = open(path, "wb").write(minimal_gguf_bytes({"general.architecture": "qwen2"}))
>>> header = read_gguf_header(path)
>>> header.version, header.metadata["general.architecture"], header.tensors
(3, 'qwen2', [])
"""

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

__all__ = ["GGUFTensorInfo", "GGUFHeader", "read_gguf_header", "minimal_gguf_bytes"]

# metadata value type -> struct format for the fixed-size ones (8 is string, 9 is array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple  # NumPy order: the file's dims reversed
    ggml_type: int  # gguf.GGMLQuantizationType value: 0 F32, 8 Q8_0, 12 Q4_K, ...
    start: int  # absolute file offset of the tensor's first byte


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict  # key -> int | float | bool | str | list
    array_lengths: dict  # key -> number of elements, for every array (also the skipped string arrays)
    tensors: list  # [GGUFTensorInfo] in file order
    data_start: int
    file_size: int


class _Truncated(Exception):
    pass


def read_gguf_header(path, string_arrays=()):
    """Parse the header of the GGUF file at `path`.

    String arrays are decoded only for the keys in `string_arrays` (e.g. "tokenizer.ggml.tokens"), or
    all of them with `string_arrays=all`; the others are skipped and only their length is kept.
    Raises `CheckpointError` naming the file for anything that is not a well-formed GGUF v2/v3 header.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(f"{path}: truncated: expected a GGUF header of at least 24 bytes, "
                                      f"found {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _parse(path, blob, size, string_arrays)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e


def _parse(path, blob, size, string_arrays):
    if blob[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file: expected the magic bytes b'GGUF', found {bytes(blob[:4])!r}")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(f"{path}: GGUF version {version}{hint}: expected 2 or 3")
    reader = _Reader(blob, 24, path, string_arrays)
    try:
        metadata, lengths = {}, {}
        for _ in range(kv_count):
            key = reader.string()
            value_type = reader.scalar(4)
            metadata_value, length = reader.value(value_type, key)
            if length is not None:
                lengths[key] = length
            if metadata_value is not _SKIPPED:
                metadata[key] = metadata_value
        entries = []
        for _ in range(tensor_count):
            name = reader.string()
            n_dims = reader.scalar(4)
            if n_dims > 4:
                raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows at most 4")
            dims = [reader.scalar(10) for _ in range(n_dims)]
            ggml_type, offset = reader.scalar(4), reader.scalar(10)
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    except _Truncated:
        raise CheckpointError(f"{path}: truncated: the header runs past the end of the file ({size} bytes)") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise CheckpointError(f"{path}: general.alignment must be a positive multiple of 8, found {alignment!r}")
    data_start = -(-reader.pos // alignment) * alignment  # the next multiple of `alignment`
    tensors = []
    for name, shape, ggml_type, offset in entries:
        if offset % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} starts at data offset {offset}, which is not a "
                                  f"multiple of the alignment {alignment}")
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, data_start + offset))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"{path}: tensor {duplicate!r} appears twice in the tensor table")
    return GGUFHeader(path, version, metadata, lengths, tensors, data_start, size)


_SKIPPED = object()


class _Reader:
    """A cursor over the mapped header; raises _Truncated instead of struct.error past the end."""

    def __init__(self, blob, pos, path, string_arrays):
        self.blob, self.pos, self.path, self.string_arrays = blob, pos, path, string_arrays

    def scalar(self, value_type):
        fmt = _SCALAR[value_type]
        try:
            (value,) = struct.unpack_from(fmt, self.blob, self.pos)
        except (struct.error, OverflowError):  # past the end (or a corrupt length far beyond it)
            raise _Truncated from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, key=None):
        length = self.scalar(10)
        end = self.pos + length
        if end > len(self.blob):
            raise _Truncated
        raw = self.blob[self.pos:end]
        self.pos = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"metadata key {key!r}" if key else "a key or tensor name"
            raise CheckpointError(f"{self.path}: {where} holds a string that is not UTF-8: {e}") from None

    def value(self, value_type, key, keep_strings=False):
        """`(value, array length or None)`; value is _SKIPPED for a string array not asked for."""
        if value_type in _SCALAR:
            value = self.scalar(value_type)
            return (bool(value) if value_type == 7 else value), None
        if value_type == STRING:
            return self.string(key), None
        if value_type != ARRAY:
            raise CheckpointError(f"{self.path}: metadata key {key!r} has value type {value_type}, "
                                  "which is not a GGUF type (expected 0-12)")
        element_type, count = self.scalar(4), self.scalar(10)
        if element_type in _NUMPY:  # numbers: one read for the whole array
            nbytes = count * np.dtype(_NUMPY[element_type]).itemsize
            if self.pos + nbytes > len(self.blob):
                raise _Truncated
            values = np.frombuffer(self.blob, _NUMPY[element_type], count, self.pos).tolist()
            self.pos += nbytes
            return values, count
        wanted = keep_strings or self.string_arrays is all or key in self.string_arrays
        if element_type == STRING and not wanted:
            for _ in range(count):  # skip each string: read its length, jump past its bytes
                length = self.scalar(10)  # subtle: not `self.pos += self.scalar(10)`, which drops the 8
                self.pos += length
                if self.pos > len(self.blob):
                    raise _Truncated
            return _SKIPPED, count
        if element_type in (STRING, ARRAY):  # strings, or arrays of arrays (read whole)
            return [self.value(element_type, key, keep_strings=True)[0] for _ in range(count)], count
        raise CheckpointError(f"{self.path}: metadata key {key!r} is an array of type {element_type}, "
                              "which is not a GGUF type (expected 0-12)")


def minimal_gguf_bytes(metadata, tensors=(), alignment=DEFAULT_ALIGNMENT):
    """The bytes of a small GGUF v3 file, for tests and examples.

    `metadata` maps keys to str, bool, int (written u32), float (written f32) or lists of str/int;
    `tensors` is a list of `(name, numpy array)` written as F32 (float32 arrays) or as raw blocks
    `(name, ggml_type, numpy shape, raw bytes)`.
    """
    def string(s):
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    def value(v):
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, str):
            return struct.pack("<I", STRING) + string(v)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", ARRAY, STRING, len(v)) + b"".join(string(x) for x in v)
        if isinstance(v, list):
            return struct.pack("<IIQ", ARRAY, 5, len(v)) + np.asarray(v, dtype="<i4").tobytes()
        raise TypeError(f"cannot write metadata value {v!r}")

    blocks = []
    for t in tensors:
        if len(t) == 2:
            name, array = t
            blocks.append((name, 0, array.shape, np.ascontiguousarray(array, dtype="<f4").tobytes()))
        else:
            blocks.append(t)
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(blocks), len(metadata)))
    for key, v in metadata.items():
        out += string(key) + value(v)
    offset, data = 0, bytearray()
    for name, ggml_type, shape, raw in blocks:
        dims = tuple(reversed(shape))
        out += string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
        data += raw + b"\0" * (-len(raw) % alignment)
        offset = len(data)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out + data)
