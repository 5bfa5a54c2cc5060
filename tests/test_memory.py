"""Building a model makes malloc keep freed blocks (qwen2np/memory.py), unless QWEN2NP_KEEP_FREED_MEMORY=0.

Each case runs in a fresh process (malloc's settings are per process and cannot be undone): it builds a
tiny model, then allocates a 64 MB array, frees it and allocates another. Kept: both come from the
[heap] and the second reuses the first's address. Returned (malloc's defaults): a block that big is
mapped on its own, outside the heap.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import json
import numpy as np
import qwen2np

qwen2np.Qwen2Model(qwen2np.Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
from qwen2np import memory

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
print(json.dumps({"set": memory.keep_freed_memory(), "in_heap": in_heap(b.ctypes.data),
                  "reused": b.ctypes.data == first}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc's thresholds are glibc's")


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


@glibc_only
def test_building_a_model_keeps_freed_memory():
    assert probe(QWEN2NP_KEEP_FREED_MEMORY="1") == {"set": True, "in_heap": True, "reused": True}


@glibc_only
def test_the_environment_variable_keeps_mallocs_defaults():
    result = probe(QWEN2NP_KEEP_FREED_MEMORY="0")
    assert result["set"] is False and result["in_heap"] is False
