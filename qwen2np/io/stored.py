"""A tensor as a checkpoint file stores it (where its bytes are, in what format, its rows as bytes), and a
checkpoint as a set of them.

Opening a checkpoint reads no weight: each file is memory-mapped once (read-only) and every tensor is
described by a `StoredTensor` (file, offset, shape, stored format: "F32", "BF16", … or a GGUF block
type such as "Q4_K"). How stored bytes become compute arrays is said in one place, qwen2np/weights/store.py.

The model reads its weights from the mapped files while it runs. If a file is changed in place under
it (rewritten, truncated), the process would read other numbers, or die of a bus error on a page past
the new end; `MappedFile.check()` compares the file's size and modification time with what they were
when it was opened (an `fstat` of the file kept open: about a microsecond), and the model calls it
before each forward pass. A file *replaced* by a new one (written beside, then renamed over, as
`save_pretrained` and `pip` do) is harmless: the map keeps the old file alive.

>>> import os, tempfile, numpy as np
>>> from qwen2np.io.safetensors_file import write_safetensors
>>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, dtype="bfloat16")
>>> (w,) = open_safetensors(path).values()
>>> w.kind, w.shape, w.nbytes, bytes(w.raw_rows(1, 2)).hex()     # 3, 4, 5 as bf16 0x4040 0x4080 0x40a0, little-endian
('BF16', (2, 3), 12, '40408040a040')
"""

import math
import mmap
import os
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from .safetensors_file import read_safetensors_header

__all__ = ["PLAIN_KINDS", "MappedFile", "StoredTensor", "Checkpoint", "open_safetensors"]

# stored formats that are plain little-endian values
PLAIN_KINDS = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
               "BF16": np.dtype(ml_dtypes.bfloat16)}


class MappedFile:
    """One checkpoint file, open and memory-mapped read-only for as long as a model uses it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror or e}") from e
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        st = os.fstat(fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if self.size else None
        self.bytes = (np.frombuffer(self._map, dtype=np.uint8) if self._map is not None
                      else np.zeros(0, np.uint8))                     # [size] uint8, read-only

    def check(self):
        """Raise CheckpointError if the file changed in place since it was opened (see the module docstring)."""
        st = os.fstat(self._fd)
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            change = (f"its size went from {self.size:,} to {st.st_size:,} bytes" if st.st_size != self.size
                      else "it was modified in place")
            raise CheckpointError(
                f"{self.path}: changed on disk since it was loaded ({change}); a memory-mapped model reads its "
                "weights from the file while it runs, so its results would no longer be this checkpoint's. "
                "Reload the model (replace checkpoint files by writing beside them and renaming, never in place)")

    def release(self, start, nbytes):
        """Let the pages of bytes [start, start + nbytes) go from this process's memory (they stay in the
        page cache while the system has room); reading them again maps them back in."""
        if self._map is None or nbytes <= 0:
            return
        page = mmap.PAGESIZE
        begin = -(-start // page) * page                   # whole pages inside the range only
        end = (start + nbytes) // page * page
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def __repr__(self):
        return f"MappedFile({self.path!r}, {self.size:,} bytes)"


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A tensor in a checkpoint file, not read yet.

    `kind` is the stored format: "F32", "F16", "BF16", "F64" (plain little-endian values) or a GGUF
    block type ("Q4_K", "Q8_0", …). The rows are the leading axes flattened: a [V, D] matrix has V rows of
    D values, a [D] vector one row.
    """

    name: str
    shape: tuple           # NumPy order
    kind: str
    file: MappedFile
    start: int             # absolute offset of the first byte in the file
    nbytes: int            # stored bytes
    origin: str            # where it came from, for messages: "model-00001-of-00004.safetensors"

    @cached_property
    def num_rows(self):
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def num_columns(self):
        return self.shape[-1] if self.shape else 1

    @cached_property
    def row_nbytes(self):
        return self.nbytes // self.num_rows if self.num_rows else 0

    @cached_property
    def values(self):
        """A plain format's values as a read-only [rows, columns] view of the map (nothing is read until
        it is indexed); None for GGUF blocks. Made once: a decode step slices it thousands of times."""
        if self.kind not in PLAIN_KINDS:
            return None
        return self.raw_rows(0, self.num_rows).view(PLAIN_KINDS[self.kind]).reshape(self.num_rows, self.num_columns)

    @property
    def size(self):
        return math.prod(self.shape)

    def raw_rows(self, r0, r1):
        """The stored bytes of rows [r0, r1): a read-only uint8 view of the map, [(r1 - r0) · row_nbytes]."""
        a = self.start + r0 * self.row_nbytes
        return self.file.bytes[a:a + (r1 - r0) * self.row_nbytes]

    def release(self):
        """Drop this tensor's mapped pages from the process's memory (MappedFile.release)."""
        self.file.release(self.start, self.nbytes)

    def __repr__(self):
        return f"StoredTensor({self.name!r}, {self.shape}, {self.kind}, {self.origin})"


def open_safetensors(path, header=None, origin=None):
    """{name: StoredTensor} for every tensor of a safetensors file (its header checked, no data read)."""
    header = read_safetensors_header(path) if header is None else header
    file = MappedFile(header.path)
    if file.size != os.path.getsize(header.path):   # pragma: no cover - changed between header and open
        raise CheckpointError(f"{header.path}: changed while it was being opened")
    origin = origin or os.path.basename(header.path)
    return {e.name: StoredTensor(e.name, e.shape, e.dtype, file, e.start, e.nbytes, origin) for e in header.entries}



@dataclass
class Checkpoint:
    """What a checkpoint holds, with tensors named as in a Hugging Face checkpoint."""

    config: dict  # a config.json dict (model_type "qwen2"), as transformers would write it
    tensors: dict  # {name: StoredTensor or ndarray}, names as stored (GGUF names already mapped to HF names)
    origin: dict  # {tensor name: the file it came from}, for error messages
    generation_config: dict | None = None  # generation_config.json when present
    path: Path = field(default=None)  # the folder or file that was loaded

    def __repr__(self):
        n = sum(int(np.prod(a.shape, dtype=np.int64)) for a in self.tensors.values())
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {n:,} parameters)"
