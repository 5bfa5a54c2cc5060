"""A dump's tensors.safetensors read a block at a time, so that compare and isolate hold a few blocks in
memory, never whole tensors (a [1, 1024, 151936] float32 logits tensor is 622 MB); read_dump makes them.
"""

import math
import os
import weakref

import numpy as np

from ..errors import DumpError


class DumpTensor:
    """A tensor of a dump's tensors.safetensors, read when indexed: `t[index]` reads the elements of one
    C-contiguous block (a tuple of slices and integers, as metrics.blocks makes) into a new array;
    `np.asarray(t)` reads it whole.

    subtle: the block is read with plain file reads, through the page cache, which does not count in the
    process's memory; the pages of a memory map, once touched, count until the map is closed, so that
    reading a whole dump through its map would hold all of it. The file is opened once, by read_dump:
    a dump replaced meanwhile (`--overwrite`) is still read as it was.
    """

    def __init__(self, file, key, start, dtype, shape):
        self._file, self.key, self._start = file, key, start
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __repr__(self):
        return f"DumpTensor({self.key!r}, shape={self.shape}, dtype={self.dtype.name})"

    def __array__(self, dtype=None, copy=None):
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, index):
        first, shape, kept = _block(self.shape, index if isinstance(index, tuple) else (index,), self.key)
        out = np.empty(math.prod(shape), self.dtype)
        self._file.read_into(out, self._start + first * self.dtype.itemsize, self.key)
        return out.reshape(kept)


class TensorFile:
    """tensors.safetensors held open, so that what read_dump checked is what is read; closed with the dump."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read_into(self, out, offset, key):
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        try:
            while done < len(view):
                if hasattr(os, "preadv"):   # straight into the array
                    n = os.preadv(self.fd, [view[done:]], offset + done)
                else:
                    chunk = os.pread(self.fd, min(len(view) - done, 1 << 26), offset + done)
                    n = len(chunk)
                    view[done:done + n] = chunk
                if n == 0:
                    raise DumpError(f"{self.path}: {key}: the file ended while reading the tensor (truncated since "
                                    f"it was opened)")
                done += n
        except OSError as e:
            raise DumpError(f"{self.path}: {key}: cannot read the tensor: {e.strerror or e}") from e


def _block(shape, index, key):
    """(first element, block shape, result shape) of `index` into an array of `shape`: slices of step 1 and
    integers that select one C-contiguous block; an IndexError otherwise."""
    if len(index) > len(shape):
        raise IndexError(f"{key}: {len(index)} indices for a tensor of {len(shape)} axes")
    starts, dims, kept = [], [], []
    for axis, n in enumerate(shape):
        i = index[axis] if axis < len(index) else slice(None)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise IndexError(f"{key}: a DumpTensor reads contiguous blocks, not a slice of step {step}; "
                                 f"read it whole with np.asarray")
            starts.append(start)
            dims.append(max(0, stop - start))
            kept.append(dims[-1])
        elif isinstance(i, (int, np.integer)) and not isinstance(i, bool) and -n <= i < n:
            starts.append(int(i) % n)
            dims.append(1)
        else:
            raise IndexError(f"{key}: index {i!r} on axis {axis} (of length {n}): expected a slice or an integer "
                             f"in range")
    cut = len(shape) - 1   # after the last axis not taken whole, every axis must be taken whole ...
    while cut >= 0 and dims[cut] == shape[cut]:
        cut -= 1
    if cut > 0 and math.prod(dims) and any(d != 1 for d in dims[:cut]):   # ... and before it, one index each
        raise IndexError(f"{key}: {index} is not one contiguous block of {list(shape)}; index with "
                         f"metrics.blocks, or read it whole with np.asarray")
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    first = sum(s * t for s, t in zip(starts, strides)) if math.prod(dims) else 0
    return first, dims, kept
