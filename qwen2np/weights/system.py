"""What the machine offers: the memory this process may use, and an opt-in malloc setting that reuses it.

Memory available (`available_memory`, `default_budget`): /proc/meminfo's MemAvailable, or less when a
cgroup (v1 or v2) limits the process. The default budget of `from_pretrained` leaves a quarter of it to
the system and its page cache (plan.py plans the weights within it).

>>> format_bytes(491_400_064), format_bytes(2_520_000_000)
('491.4 MB', '2.52 GB')

Keeping freed memory for reuse (`keep_freed_memory`):

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

* in Python, nothing changes unless you call `qwen2np.keep_freed_memory()` or set
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

__all__ = ["available_memory", "default_budget", "format_bytes", "keep_freed_memory", "apply_environment"]

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


def available_memory():
    """Bytes this process can still use: /proc/meminfo's MemAvailable, or less when a cgroup (v1 or v2)
    limits the process: its limit minus what it holds, not counting its clean file cache, which the kernel
    reclaims when the cgroup needs room (as MemAvailable counts it). None when nothing can be read (not
    Linux)."""
    available = _meminfo("MemAvailable")
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def default_budget():
    """The budget when none is given: what the machine has available, less a quarter of its memory (of
    the cgroup's limit when that is lower), which stays for the system and its page cache; at least half
    of what is available. None when nothing can be read.

    subtle: a budget that fills the machine is slower, not faster: the pages of the weights that stay
    mapped are then pushed out of the page cache and read again. Measured on the 24 GB test machine with
    a 7B bf16 checkpoint in float32: a budget of 24.6 GB (14 of 28 layers kept as float32, 20.8 GB
    resident) decoded a token in 1.40 s; 21 GB (17.1 GB resident) in 1.10 s (docs/weights.md).
    """
    available = available_memory()
    total = _meminfo("MemTotal")
    limit = _cgroup_limit()
    if limit is not None:
        total = limit if total is None else min(total, limit)
    if available is None or total is None:
        return available
    return max(available - total // 4, available // 2)


def _cgroup_limit():
    """The memory limit of this process's cgroup (v1 or v2), the tightest up the hierarchy; None if none."""
    limits = [room + used for room, used in _cgroup_rooms()]
    return min(limits) if limits else None


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom():
    """limit - (usage - clean file cache) of the tightest memory cgroup of this process and its parents."""
    rooms = [room for room, _ in _cgroup_rooms()]
    return min(rooms) if rooms else None


# where the process's cgroups are listed, and where their folders are mounted
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
# memory.stat's keys, v2 and v1: the file cache on the kernel's LRU lists (active and inactive; shared
# memory is not on them), and the part of it that must be written back before it can be reclaimed
_FILE_CACHE = {"v2": (("active_file", "inactive_file"), ("file_dirty", "file_writeback")),
               "v1": (("total_active_file", "total_inactive_file"), ("total_dirty", "total_writeback"))}


def _cgroup_rooms():
    """(limit - held, held) for each memory cgroup of this process and its parents that sets a limit, where
    held is the usage less the clean file cache (v1 and v2)."""
    try:
        with open(PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                  # v2: one unified hierarchy
            base, files = CGROUP_ROOT, ("memory.max", "memory.current", "v2")
        elif "memory" in controllers.split(","):               # v1: the memory controller's own hierarchy
            base, files = f"{CGROUP_ROOT}/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "v1")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):               # the cgroup, then its parents
            room = _headroom("/".join([base] + parts[:depth]), *files)
            if room is not None:
                rooms.append(room)
    return rooms


def _headroom(folder, limit_file, usage_file, version):
    """(limit - held, held) of one cgroup folder, or None when it sets no limit or cannot be read.

    subtle: a cgroup is charged for the page cache its processes read, the checkpoint's included, and a
    page read twice moves to the *active* list. Both lists are reclaimed when the cgroup needs room (only
    dirty pages must be written first), so all clean file cache counts as free, as the kernel's
    MemAvailable counts it; counting the active part as held made the default budget shrink run after run
    in a container, as the checkpoint's own pages (the very weights the model reads) filled it.
    """
    try:
        with open(f"{folder}/{limit_file}") as f:
            limit = f.read().strip()
        with open(f"{folder}/{usage_file}") as f:
            usage = int(f.read())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:    # no limit set
        return None
    stat = {}
    try:
        with open(f"{folder}/memory.stat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                stat[key] = int(value)
    except (OSError, ValueError):
        pass
    cached, unclean = _FILE_CACHE[version]
    clean = max(0, sum(stat.get(k, 0) for k in cached) - sum(stat.get(k, 0) for k in unclean))
    held = max(0, usage - clean)
    return max(0, int(limit) - held), held


def format_bytes(n):
    """`n` bytes in decimal units, as a short string.

    >>> format_bytes(491_400_064)
    '491.4 MB'
    >>> format_bytes(2_520_000_000)
    '2.52 GB'
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{int(n)} B"
