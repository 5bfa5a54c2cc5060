"""Keeping freed memory (qwen2np/weights/system.py) is opt-in for library users, on by default in the command line.

Each case runs in a fresh process (malloc's settings are per process and cannot be undone): it builds a
tiny model (or runs a command), then allocates a 64 MB array, frees it and allocates another. Kept: both
come from the [heap] and the second reuses the first's address. Returned (malloc's defaults): a block
that big is mapped on its own, outside the heap.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import contextlib, io, json, sys
import numpy as np
import qwen2np

qwen2np.Qwen2Model(qwen2np.Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
from qwen2np.weights import system as memory
if "cli" in sys.argv:
    from qwen2np.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["tokenize", "hello"])
if "call" in sys.argv:
    memory.keep_freed_memory()

def in_heap(address):
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= address < hi:
                    return True
    return False

a = np.ones(16 << 20, dtype=np.float32)
first = a.ctypes.data
del a
b = np.ones(16 << 20, dtype=np.float32)
print(json.dumps({"set": bool(memory._done), "in_heap": in_heap(b.ctypes.data),
                  "reused": b.ctypes.data == first}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc's thresholds are glibc's")


KEPT = {"set": True, "in_heap": True, "reused": True}


def probe(*args, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("QWEN2NP_KEEP_FREED_MEMORY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return json.loads(out.stdout)


@glibc_only
def test_a_library_user_keeps_mallocs_defaults():
    """Building a model changes no process-wide setting on its own."""
    result = probe()
    assert result["set"] is False and result["in_heap"] is False


@glibc_only
def test_library_users_opt_in_by_function_or_environment():
    assert probe("call") == KEPT
    assert probe(QWEN2NP_KEEP_FREED_MEMORY="1") == KEPT


@glibc_only
def test_the_command_line_keeps_freed_memory_unless_told_not_to():
    assert probe("cli") == KEPT
    result = probe("cli", QWEN2NP_KEEP_FREED_MEMORY="0")
    assert result["set"] is False and result["in_heap"] is False


@glibc_only
def test_the_command_line_leaves_a_host_tuned_malloc_alone():
    """The host's own MALLOC_* settings win over the command line's default."""
    result = probe("cli", MALLOC_MMAP_THRESHOLD_="33554432")
    assert result["set"] is False
