"""Keeping freed memory for reuse: an opt-in setting of glibc's malloc that makes forward passes faster.

A forward pass allocates and frees hundreds of megabytes of temporaries: the MLP's [T, F] activations in
every layer, and the [T, V] logits (311 MB for 512 tokens of a 151,936-word vocabulary). glibc's malloc
serves blocks above a threshold (at most 32 MB) with a fresh `mmap` and gives them back to the system on
`free`. Memory that comes back from the system must be faulted in and zeroed page by page when it is
first written, and on a virtual machine the host may have reclaimed it meanwhile, which costs more: on
the 2-core test machine, writing 311 MB of fresh memory took 1.06 s, writing it again 0.02 s. Measured
there on a 512-token prefill of the test checkpoint (the median of 6, alternating processes): 4.7-4.8 s
with glibc's defaults, 4.0-4.4 s keeping freed memory; the matrix products themselves are unchanged.

`keep_freed_memory()` raises malloc's mmap and trim thresholds to KEEP_BYTES: blocks up to that size
come from the heap and freed ones stay there for the next allocation. The cost: the process keeps up to
KEEP_BYTES of freed memory after a forward pass, as memory arenas (ONNX Runtime's, jemalloc's) do, for
as long as it lives; the setting is process-wide and cannot be undone. So a library does not do it on
its own:

* in Python, nothing changes unless you call `qwen2np.memory.keep_freed_memory()` or set
  `QWEN2NP_KEEP_FREED_MEMORY=1` before building a model;
* the `qwen2np` command line and the benchmarks do it by default: they own their process. Set
  `QWEN2NP_KEEP_FREED_MEMORY=0` to keep malloc's defaults there. They also leave malloc alone when the
  environment already tunes it (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or those
  tunables in `GLIBC_TUNABLES`): the host's own settings win.

Only glibc has these settings; elsewhere this does nothing.
"""

import ctypes
import os
import platform

KEEP_BYTES = 1 << 30
ENVIRONMENT = "QWEN2NP_KEEP_FREED_MEMORY"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done = None


def keep_freed_memory():
    """Raise glibc malloc's mmap and trim thresholds to KEEP_BYTES, once per process (see the module
    docstring for what it gains and what it costs).

    Returns True when the thresholds are set, False when they cannot be (not glibc).
    """
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def apply_environment(default):
    """What a model build (default False) or the command line (default True) does: follow
    QWEN2NP_KEEP_FREED_MEMORY when it is "0" or "1", else `default`, leaving malloc alone when the
    environment already tunes it. Returns whether the thresholds are set."""
    setting = os.environ.get(ENVIRONMENT)
    if setting == "0" or (setting != "1" and (not default or _host_tunes_malloc())):
        return bool(_done)
    return keep_freed_memory()


def _host_tunes_malloc():
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables)


def _set_thresholds():
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
