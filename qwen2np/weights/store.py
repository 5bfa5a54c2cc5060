"""How a stored weight becomes a compute array: the one path, for every file format and every backend.

A checkpoint's tensors arrive as `StoredTensor`s (qwen2np/io/stored.py): bytes in a memory-mapped file,
in their own format (F32, F16, BF16, F64, or GGUF blocks such as Q4_K). The model holds each weight in
one of these ways, as qwen2np/weights/plan.py plans it within the memory budget (docs/weights.md):

* **kept**: an array in the compute dtype, made once when loading. When the file already stores the
  compute dtype (a float32 file for a float32 model), that array is the memory map itself: no copy.
* **converted per use**: a `StoredWeight`, which stays as stored and is converted each time the forward
  pass uses it, a block of rows at a time, just before the block's product (`matmul_t`), so that a decode
  step reads the stored bytes about once and no whole float32 matrix is ever written out. A *streamed*
  one also lets its pages go after each use, so that only the block being converted is in memory.

Either way the numbers are the same: widening bf16/f16/f32 to float32/float64 is exact, and GGUF blocks
are dequantized by the `gguf` package's own code, as transformers does. And the products are the same:
`matmul_t` computes a kept weight's product in the very blocks it uses for a converted one, so the
two give bitwise the same result (tests/weights/test_store.py).

>>> import numpy as np
>>> w = np.arange(6, dtype=np.float32).reshape(3, 2)               # [out, in]
>>> matmul_t(np.ones((1, 2), np.float32), w)                      # x · Wᵀ: [1, 2] -> [1, 3]
array([[1., 5., 9.]], dtype=float32)
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import CheckpointError
from ..io.checkpoint import open_checkpoint
from ..io.gguf_file import dequantize_rows, import_gguf
from ..io.safetensors_file import is_memory_mapped
from ..io.stored import PLAIN_KINDS, Checkpoint, StoredTensor
from .backend import array_module, resolve_dtype

__all__ = ["PLAIN_KINDS", "convert_rows", "convert_whole", "row_chunks", "StoredWeight", "matmul_t", "as_array",
           "block_rows", "hold_weights", "reads_file", "scratch", "clear_scratch"]

CHUNK_BYTES = 16 * 2**20   # stored bytes converted per step when a whole tensor is converted ahead of time

# Converted bytes per block of weight rows. A decode step (one row of x) converts blocks that stay in a
# core's cache (DECODE_BLOCK_BYTES: 1 MB, half of this machine's L2) right before their product, small
# enough that OpenBLAS computes each product in the calling thread (a bigger one wakes OpenBLAS's own
# threads, which then spin against the next block's conversion: 4 to 20 times slower, measured); a
# prefill, whose products are long, converts bigger blocks (PREFILL_BLOCK_BYTES) so that each product is
# big enough to run at full speed on OpenBLAS's threads.
DECODE_BLOCK_BYTES = 1 << 20
PREFILL_BLOCK_BYTES = 1 << 27


def convert_rows(stored, r0, r1, dtype, out=None):
    """Rows [r0, r1) of a StoredTensor in `dtype`: [r1 - r0, C] (into `out` when given).

    The only place where stored bytes become numbers. Plain formats are cast by NumPy (exact when
    widening; rounding to nearest even when narrowing, e.g. float32 to bfloat16); GGUF blocks go through
    the `gguf` package's dequantization, as in transformers.

    >>> import os, tempfile
    >>> from qwen2np.io.safetensors_file import write_safetensors
    >>> from qwen2np.io.stored import open_safetensors
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(3, 2)}, dtype="bfloat16")
    >>> convert_rows(open_safetensors(path)["w"], 1, 3, np.float64)
    array([[2., 3.],
           [4., 5.]])
    """
    n, C = r1 - r0, stored.num_columns
    dtype = np.dtype(dtype)
    if out is None:
        out = np.empty((n, C), dtype)
    if out.size == 0:
        return out                         # a tensor with a zero dimension: nothing to read (GGUF can't)
    if stored.kind in PLAIN_KINDS:
        out[...] = stored.values[r0:r1]
    else:
        raw = stored.raw_rows(r0, r1)

        gguf = import_gguf()
        kind = gguf.GGMLQuantizationType[stored.kind]
        out[...] = dequantize_rows(gguf, raw.reshape(n, stored.row_nbytes), kind)   # [n, C] float32 -> dtype
    return out


def convert_whole(stored, dtype):
    """The whole tensor in `dtype`, converted ahead of time (a weight the model keeps).

    Already stored in `dtype`: a read-only view of the memory map (no copy, no read). Otherwise converted
    CHUNK_BYTES of stored rows at a time into one new array, letting each chunk's pages go once
    converted, so that converting a whole model never holds its stored bytes and its result at once.
    """
    dtype = np.dtype(dtype)
    if stored.kind in PLAIN_KINDS and PLAIN_KINDS[stored.kind] == dtype:
        return stored.values.reshape(stored.shape)
    out = np.empty(stored.shape, dtype=dtype)
    rows = out.reshape(stored.num_rows, stored.num_columns)
    for r0, r1 in row_chunks(stored):
        convert_rows(stored, r0, r1, dtype, out=rows[r0:r1])
        stored.file.release(stored.start + r0 * stored.row_nbytes, (r1 - r0) * stored.row_nbytes)
    return out


def row_chunks(stored, row_bytes=None):
    """(r0, r1) of consecutive runs of rows of a StoredTensor, of CHUNK_BYTES each (at least one row),
    counting `row_bytes` per row: its stored bytes by default, or those of a row once converted. The steps
    in which a whole tensor is read, or compared (model/pretrained.py)."""
    step = max(1, CHUNK_BYTES // max(stored.row_nbytes if row_bytes is None else row_bytes, 1))
    for r0 in range(0, stored.num_rows, step):
        yield r0, min(stored.num_rows, r0 + step)


class StoredWeight:
    """A weight converted per use: it stays as stored and becomes `dtype` a block of rows at a time.

    It has the shape and dtype of the array it stands for; `np.asarray(w)` converts it whole (for a
    reader's inspection, not for the forward pass). With `stream=True` its pages leave the process's
    memory after each use.
    """

    def __init__(self, stored, dtype, stream=False):
        self.stored = stored
        self.dtype = np.dtype(dtype)
        self.shape = tuple(stored.shape)
        self.ndim = len(self.shape)
        self.stream = stream

    @property
    def size(self):
        return self.stored.size

    @property
    def nbytes(self):
        """Bytes of the array it stands for (in the compute dtype); the file holds `stored.nbytes`."""
        return self.size * self.dtype.itemsize

    def rows(self, r0, r1, out=None):
        """Rows [r0, r1) in the compute dtype: [r1 - r0, C]. Into an `out` of a wider dtype (the float32 of
        a half-precision product), the compute dtype's values, widened."""
        if out is None or out.dtype == self.dtype or PLAIN_KINDS.get(self.stored.kind) == self.dtype:
            return convert_rows(self.stored, r0, r1, out.dtype if out is not None else self.dtype, out)
        out[...] = convert_rows(self.stored, r0, r1, self.dtype)     # rounded to the compute dtype first
        return out

    def __getitem__(self, ids):
        """The rows `ids` (an integer array of any shape, or an int) in the compute dtype: [*ids.shape, C],
        converting only those rows. An embedding lookup reads the same whatever holds the table:
        `embed_tokens[input_ids]`."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{self.stored.name}: a weight converted per use is indexed by an integer array of "
                            f"rows, found {ids.dtype} (np.asarray(weight) converts it whole)")
        V = self.shape[0]
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -V or flat.max() >= V):
            bad = flat[(flat < -V) | (flat >= V)][0]
            raise IndexError(f"{self.stored.name}: row {bad} is out of bounds for {V} rows")
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        for i, row in enumerate(np.where(flat < 0, flat + V, flat).tolist()):   # -1: the last row, as NumPy
            self.rows(row, row + 1, out=out[i:i + 1])
        self.done()
        return out.reshape(*ids.shape, self.shape[1])

    def chunks(self, n):
        """The values in C order, a block of rows (about n values) at a time: for writing the weight out
        without converting it whole (io.safetensors_file.write_safetensors)."""
        step = max(1, n // max(self.stored.num_columns, 1))
        for r0 in range(0, self.stored.num_rows, step):
            yield self.rows(r0, min(self.stored.num_rows, r0 + step)).reshape(-1)
        self.done()

    def done(self):
        """Called after each use: a streamed weight lets its pages go."""
        if self.stream:
            self.stored.release()

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.stored.num_rows).reshape(self.shape)
        self.done()
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __repr__(self):
        how = "streamed" if self.stream else "memory-mapped"
        return (f"StoredWeight({self.stored.name}: {self.stored.kind} {how}, converted to {self.dtype.name} per use, "
                f"shape {self.shape})")


def block_rows(n, in_features, itemsize):
    """Weight rows per block of a product with n rows of x: a multiple of 16 for one row (see matmul_t)."""
    if n == 1:
        return max(16, DECODE_BLOCK_BYTES // (in_features * itemsize) // 16 * 16)
    return max(1, PREFILL_BLOCK_BYTES // (in_features * itemsize))


def matmul_t(x, weight):
    """x · Wᵀ: x [N, in], W [out, in] (an array, or a StoredWeight) -> [N, out].

    One row of x (a decode step): a matrix-vector product W · x. A weight kept in the product's dtype is
    one call (when its rows are a multiple of 16; see below), which OpenBLAS spreads over its threads; a weight converted per use goes a small block of
    rows at a time (DECODE_BLOCK_BYTES, a multiple of 16 rows), each block converted and multiplied by
    one of decode_workers() threads side by side, small enough that OpenBLAS computes it in that thread.
    Several rows (a prefill): x · Wᵀ a big block of rows at a time (PREFILL_BLOCK_BYTES) into columns of
    the result, OpenBLAS splitting each product; a kept weight goes in the same blocks.

    subtle: the same bits either way, so that a model's numbers do not depend on its memory budget. A
    matrix-vector product over a multiple of 16 rows gives every row the same result in one call as in
    blocks of a multiple of 16 rows (measured with OpenBLAS's Haswell, Zen, SkylakeX and SapphireRapids
    kernels, on 1 to 4 threads; tests/weights/test_store.py holds it). Other row counts do not: OpenBLAS
    treats the last rows of a call with other kernels, so a 17-row product's last row differs in the last
    bit from the same row computed alone. So a kept weight is one call only when its rows are a multiple
    of 16 (every weight of a Qwen2 checkpoint); otherwise, and for every matrix product, it goes in the
    very same blocks as a converted one.
    """
    xp = array_module(x)
    N, I = x.shape
    O = weight.shape[0]
    stored = isinstance(weight, StoredWeight)
    # a block is converted (into a per-thread buffer) when the weight is stored, or kept in another dtype
    # than the product's (half-precision weights in a float32 product)
    convert = stored or weight.dtype != x.dtype
    if N == 1 and not convert and O % 16 == 0:
        return (weight @ x[0])[None]                              # [out, in] @ [in] -> [1, out]
    rows = block_rows(N, I, x.dtype.itemsize)
    out = xp.empty((O,) if N == 1 else (N, O), dtype=x.dtype)

    def products(blocks):
        buffer = scratch((min(rows, O), I), x.dtype, xp if not stored else np) if convert else None
        for r0, r1 in blocks:
            if stored:
                block = xp.asarray(weight.rows(r0, r1, out=buffer[:r1 - r0]))
            elif convert:
                block = buffer[:r1 - r0]
                block[...] = weight[r0:r1]                         # exact: half precision widened
            else:
                block = weight[r0:r1]
            if N == 1:
                xp.matmul(block, x[0], out=out[r0:r1])             # [rows, in] @ [in] -> [rows]
            else:
                xp.matmul(x, block.T, out=out[:, r0:r1])           # [N, in] @ [in, rows] -> [N, rows]

    blocks = [(r0, min(O, r0 + rows)) for r0 in range(0, O, rows)]
    workers = decode_workers() if N == 1 and xp is np and len(blocks) > 1 else 1
    if workers == 1:
        products(blocks)
    else:   # contiguous shares, one per worker: each reads its own run of the weight's bytes
        share = -(-len(blocks) // workers)
        done = [_pool(workers).submit(products, blocks[i:i + share]) for i in range(share, len(blocks), share)]
        products(blocks[:share])
        for future in done:
            future.result()
    if stored:
        weight.done()
    return out[None] if N == 1 else out                            # -> [N, out]


DECODE_WORKERS = None   # threads of a decode step's products: None = the CPUs this process may use
_pools = {}
_pools_lock = threading.Lock()


def decode_workers():
    if DECODE_WORKERS is not None:
        return max(1, int(DECODE_WORKERS))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _pool(workers):
    """qwen2np's own worker threads for a decode step's products (workers - 1 of them: the calling thread
    takes a share too). Made on first use, kept for the process; they hold no state between products."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers - 1, thread_name_prefix="qwen2np-product")
        return pool


_scratch = threading.local()   # per thread: {(module, dtype): flat buffer}, at most one block each


def scratch(shape, dtype, xp=np):
    """A reused buffer of `shape` for converted blocks: one per thread, array module and dtype, grown as
    needed and never bigger than the largest block (PREFILL_BLOCK_BYTES). Reusing it spares a fresh
    allocation, whose pages the system must fault in and zero, at every product."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    size = int(np.prod(shape))
    key = (xp.__name__, np.dtype(dtype).str)
    flat = buffers.get(key)
    if flat is None or flat.size < size:
        flat = buffers[key] = xp.empty(size, dtype=dtype)
    return flat[:size].reshape(shape)


def clear_scratch():
    """Let this thread's conversion buffers go (they come back at the next product)."""
    _scratch.buffers = {}


def hold_weights(tensors, plan, progress=None):
    """{name: array or StoredWeight}: each StoredTensor of `tensors` held as the plan.WeightPlan says (a
    kept one converted now, `progress(done, total, name)` reporting); anything else (a head drawn at
    random) as it is."""
    kept = [n for n, t in tensors.items() if isinstance(t, StoredTensor) and plan.how(n) == "kept"]
    total, done = sum(tensors[n].nbytes for n in kept), 0
    params = {}
    for name, t in tensors.items():
        if not isinstance(t, StoredTensor):
            params[name] = t
        elif plan.how(name) == "kept":
            params[name] = convert_whole(t, plan.dtype)
            done += t.nbytes
            if progress is not None:
                progress(done, total, name)
        else:
            params[name] = StoredWeight(t, plan.dtype, stream=plan.how(name) == "streamed")
    return params


def reads_file(weight):
    """Whether the weight is read from its file while the model runs (a StoredWeight, or a kept memory map)."""
    return isinstance(weight, StoredWeight) or is_memory_mapped(weight)


def as_array(weight):
    """The whole weight as an array in the compute dtype (a kept weight as it is)."""
    return np.asarray(weight) if isinstance(weight, StoredWeight) else weight


def load_checkpoint(path, dtype="float32", progress=None):
    """The checkpoint at `path` with every tensor converted to a `dtype` array ("float32" or "float64").

    A tensor already stored in `dtype` is a read-only view of the memory-mapped file (no copy, no read);
    any other is converted a chunk of rows at a time into its own array, and the stored pages are let go
    as it goes, so the peak memory while loading stays near the size of the result.
    `progress`, if given, is called as `progress(done, total, label)` as tensors load (see
    `qwen2np.cli.progress.ProgressBar`).
    """
    dtype = resolve_dtype(dtype, allowed=("float32", "float64"), error=CheckpointError)
    return materialize(open_checkpoint(path), dtype, progress)


def materialize(checkpoint, dtype, progress=None):
    """`checkpoint` with its StoredTensors converted to `dtype` arrays (see load_checkpoint)."""
    total = sum(t.nbytes for t in checkpoint.tensors.values())
    done, tensors = 0, {}
    for name, stored in checkpoint.tensors.items():
        tensors[name] = convert_whole(stored, dtype)
        done += stored.nbytes
        if progress is not None:
            progress(done, total, name)
    return Checkpoint(checkpoint.config, tensors, checkpoint.origin, checkpoint.generation_config, checkpoint.path)

