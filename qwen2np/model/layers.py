"""The small building blocks of a Qwen2 layer, as plain functions of arrays.

Shapes use the legend of docs/dimensions.md: B batch, T new positions, D hidden size, F MLP width.

>>> import numpy as np
>>> x = np.array([[3.0, 4.0]], dtype=np.float32)
>>> rms_norm(x, np.ones(2, dtype=np.float32), eps=0.0)   # x / sqrt(mean(x^2)) = x / sqrt(12.5)
array([[0.84852815, 1.1313709 ]], dtype=float32)
>>> silu(np.array([0.0, 1.0], dtype=np.float32))
array([0.       , 0.7310586], dtype=float32)
"""

import numpy as np

from ..inspection.tracing import tap
from ..weights.backend import array_module
from ..weights.store import matmul_t


def accumulation_dtype(dtype):
    """The dtype products and reductions run in: float32 for half-precision activations (bfloat16,
    float16), as torch's CPU kernels accumulate them; the activations' own dtype otherwise."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize < 4 else np.dtype(dtype)


def linear(x, weight, bias=None):
    """y = x · Wᵀ + b, with W stored [out, in] as in the checkpoint.  [..., in] -> [..., out]

    W is an array, or a weight that stays as its file stores it and is converted block by block as the
    product goes (qwen2np/weights/store.py: the same bits either way).

    subtle: in half precision, torch accumulates the product in float32, adds the bias in float32 and
    rounds once (docs/numerics.md); so here, with x and W widened exactly to float32.
    """
    acc = accumulation_dtype(x.dtype)
    y = matmul_t(x.reshape(-1, x.shape[-1]).astype(acc, copy=False), weight)   # [N, in] @ [in, out] -> [N, out]
    if bias is not None:
        y += bias.astype(acc, copy=False)
    return y.reshape(*x.shape[:-1], weight.shape[0]).astype(x.dtype, copy=False)


def rms_norm(x, weight, eps):
    """Root-mean-square normalisation over the last axis, then a learned per-channel scale.  [..., D] -> [..., D]

    subtle: transformers computes the statistics in float32 even for half-precision activations and casts
    back to the input dtype *before* multiplying by the weight (docs/numerics.md). qwen2np computes them
    in float32 or float64, whichever the input is: float64 stays float64.
    """
    xp = array_module(x)
    h = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    variance = (h * h).mean(axis=-1, keepdims=True)  # [..., 1]
    h = h * (1 / xp.sqrt(variance + eps))
    return weight * h.astype(x.dtype, copy=False)


def silu(x):
    """x · sigmoid(x), also called swish. Qwen2's hidden_act.

    subtle: half-precision input is computed in float32 and rounded once, as torch's CPU kernel does."""
    if x.dtype.itemsize < 4:
        return silu(x.astype(np.float32)).astype(x.dtype)
    xp = array_module(x)
    e = xp.negative(x)
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 in float32: silu(x) is then -0, as it should be
        xp.exp(e, out=e)
    e += 1
    return xp.divide(x, e, out=e)       # x / (1 + exp(-x)), all in one new buffer


def relu(x):
    return array_module(x).maximum(x, 0)


def gelu_tanh(x):
    """The tanh approximation of GELU (transformers' gelu_pytorch_tanh and gelu_new)."""
    if x.dtype.itemsize < 4:
        return gelu_tanh(x.astype(np.float32)).astype(x.dtype)
    xp = array_module(x)
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    return 0.5 * x * (1 + xp.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


ACT2FN = {"silu": silu, "swish": silu, "relu": relu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh}


def swiglu_mlp(x, gate_proj, up_proj, down_proj, act=silu, scope=None):
    """Qwen2's MLP: down_proj( act(gate_proj x) * up_proj x ), no biases.  [B, T, D] -> [B, T, D]"""
    gate = tap(scope, "gate_proj", linear(x, gate_proj))   # [B, T, D] -> [B, T, F]
    up = tap(scope, "up_proj", linear(x, up_proj))         # [B, T, D] -> [B, T, F]
    h = tap(scope, "act", act(gate))                       # [B, T, F]
    h *= up                                                # in place: h is a new buffer (or a trace's copy)
    return tap(scope, "down_proj", linear(h, down_proj))   # [B, T, F] -> [B, T, D]


def softmax(x, axis=-1, out=None):
    """Numerically stable softmax along `axis`, in the dtype of `x` (into `out`, which may be `x`).

    >>> softmax(np.array([0.0, np.log(3.0)], dtype=np.float32)).tolist()
    [0.25, 0.75]
    """
    xp = array_module(x)
    e = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e
