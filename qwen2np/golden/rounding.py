"""Half precision for the golden tools: which dump dtypes are half, and rounding to them.

A port that computes in bfloat16 or float16 rounds after each operation; isolation recomputes each
operation in float64 and rounds where such a port rounds (recipes.py), with `rounding(dtype)`. A port
holds its weights rounded to its dtype too: `round_weight` makes that copy, so that the weights'
fingerprint can tell which way the port held them (isolate.py).

NumPy and ml_dtypes only, like recipes.py and metrics.py (tests/test_layering.py holds it).

>>> import numpy as np
>>> r = rounding("bfloat16")
>>> r(np.array([1.0, 1 + 2 ** -9, 1 + 3 * 2 ** -9])).tolist()    # ties to even, 8 bits of mantissa
[1.0, 1.0, 1.0078125]
>>> rounding("float32")(np.array([1 + 2 ** -30])).tolist()         # identity above half precision
[1.0000000009313226]
"""

import ml_dtypes
import numpy as np

HALF = ("bfloat16", "float16")


def half_dtype(dtype):
    """The NumPy dtype of a half-precision dump dtype ("bfloat16" or "float16")."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)


def rounding(dtype):
    """r(x): float64 -> the nearest value of `dtype`, as float64; the identity for float32 and float64
    (and None: a port that holds its weights as they are).

    subtle: ml_dtypes rounds float64 to bfloat16 through float32 (two roundings), as a port that computes
    in float32 and stores bfloat16 does.
    """
    if dtype not in HALF:
        return lambda x: x
    target = half_dtype(dtype)
    return lambda x: np.asarray(x).astype(target).astype(np.float64)


def round_weight(w, dtype):
    """A weight rounded to a half-precision dtype, stored so (half the memory of float32)."""
    return np.asarray(w).astype(np.float32, copy=False).astype(half_dtype(dtype))
