"""The array module and the compute dtypes: what qwen2np's arrays are made of.

qwen2np computes in float32 (the default), float64 (the reference mode), or bfloat16 and float16 (as
transformers computes in half precision): `resolve_dtype` is the one parser of a dtype argument.

qwen2np computes with NumPy. CuPy copies NumPy's API on the GPU, so the same code runs on either as long
as no function imports numpy for its math: each asks its inputs which module they belong to.

>>> import numpy as np
>>> array_module(np.zeros(3)) is np
True
>>> to_numpy(np.arange(3)).tolist()
[0, 1, 2]
"""

import ml_dtypes
import numpy as np

from ..errors import ConfigError, MissingDependencyError

__all__ = ["COMPUTE_DTYPES", "resolve_dtype", "array_module", "backend", "to_numpy"]

COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                  "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def resolve_dtype(dtype, allowed=None, error=ConfigError):
    """'float32' | 'float64' | 'bfloat16' | 'float16' (or the NumPy types) -> np.dtype; anything else, or
    a dtype outside `allowed` (names) when given, is refused with `error` and the reason.

    >>> resolve_dtype("bfloat16").name, resolve_dtype(np.float64).name
    ('bfloat16', 'float64')
    >>> resolve_dtype("int8", allowed=("float32", "float64"))
    Traceback (most recent call last):
    ...
    qwen2np.errors.ConfigError: dtype: expected one of float32, float64, found 'int8'
    """
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if allowed is not None and name not in allowed:
        raise error(f"dtype: expected one of {', '.join(allowed)}, found {dtype!r}")
    if name not in COMPUTE_DTYPES:
        raise error(
            f"dtype {dtype!r}: qwen2np computes in 'float32' (default), 'float64' (the reference mode), or "
            f"'bfloat16'/'float16' (as transformers computes in half precision)"
        )
    return COMPUTE_DTYPES[name]


def array_module(*arrays):
    """The module (numpy or cupy) that owns these arrays; numpy for anything that is not a cupy array."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy   # optional (the `cupy` extra): only an array that is already cupy's gets here

            return cupy
    return np


def backend(name):
    """The array module called `name`: "numpy" or "cupy" (which needs the optional `cupy` extra)."""
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy   # optional (the `cupy` extra)
        except ImportError as e:
            raise MissingDependencyError(
                "the cupy backend needs CuPy: pip install 'qwen2np[cupy]' (and a CUDA GPU)"
            ) from e
        return cupy
    raise ConfigError(f"unknown backend {name!r}: expected 'numpy' or 'cupy'")


def to_numpy(x):
    """A NumPy array with the values of `x`, copying from the GPU when `x` lives there."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
