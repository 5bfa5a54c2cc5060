"""Keeping freed memory for reuse: why a qwen2np model asks malloc not to hand big blocks back.

A forward pass allocates and frees hundreds of megabytes of temporaries: the MLP's [T, F] activations in
every layer, and the [T, V] logits (311 MB for 512 tokens of a 151,936-word vocabulary). glibc's malloc
serves blocks above a threshold (at most 32 MB) with a fresh `mmap` and gives them back to the system on
`free`. Memory that comes back from the system must be faulted in and zeroed page by page when it is
first written, and on a virtual machine the host may have reclaimed it meanwhile, which costs more: on
the 2-core test machine, writing 311 MB of fresh memory took 1.06 s, writing it again 0.02 s. Measured
there on a 512-token prefill of the test checkpoint (the median of 6, alternating processes): 4.7-4.8 s
with glibc's defaults, 4.0-4.4 s keeping freed memory; the matrix products themselves are unchanged.

So when a NumPy model is built, qwen2np raises malloc's mmap and trim thresholds to KEEP_BYTES: blocks
up to that size come from the heap and freed ones stay there for the next allocation. The cost: the
process keeps up to KEEP_BYTES of freed memory after a forward pass, as memory arenas (ONNX Runtime's,
jemalloc's) do. Set QWEN2NP_KEEP_FREED_MEMORY=0 before building a model to keep malloc's defaults. Only
glibc has these settings; elsewhere this does nothing.
"""

import ctypes
import os
import platform

KEEP_BYTES = 1 << 30

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done = None


def keep_freed_memory():
    """Raise glibc malloc's mmap and trim thresholds to KEEP_BYTES, once per process.

    Returns True when the thresholds are set, False when they cannot be (not glibc) or must not be
    (QWEN2NP_KEEP_FREED_MEMORY=0).
    """
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def _set_thresholds():
    if os.environ.get("QWEN2NP_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
