"""The array module: the one handle through which qwen2np does array math.

qwen2np computes with NumPy. CuPy copies NumPy's API on the GPU, so the same code runs on either as long
as no function imports numpy for its math: each asks its inputs which module they belong to.

>>> import numpy as np
>>> array_module(np.zeros(3)) is np
True
>>> to_numpy(np.arange(3)).tolist()
[0, 1, 2]
"""

import numpy as np

from .errors import MissingDependencyError


def array_module(*arrays):
    """The module (numpy or cupy) that owns these arrays; numpy for anything that is not a cupy array."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def backend(name):
    """The array module called `name`: "numpy" or "cupy" (which needs the optional `cupy` extra)."""
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise MissingDependencyError(
                "the cupy backend needs CuPy: pip install 'qwen2np[cupy]' (and a CUDA GPU)"
            ) from e
        return cupy
    raise ValueError(f"unknown backend {name!r}: expected 'numpy' or 'cupy'")


def to_numpy(x):
    """A NumPy array with the values of `x`, copying from the GPU when `x` lives there."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
