"""The exercises of notebook 6 (training): RMSNorm's backward and softmax's backward, graded against
qwen2np.grad's own (qwen2np/grad/layers.py) and named where a typical mistake is recognised.

Each grader makes its inputs (float64, seeded), runs the reader's function, and compares what it
returns with the reference, output by output, with the verdicts of qwen2np.teaching.grader (the first
wrong output is named; nothing raises on a wrong answer; a stub that returns None is "not attempted").

>>> def softmax_backward(d_p, p):
...     return p * (d_p - (d_p * p).sum(axis=-1, keepdims=True))
>>> grade_softmax_backward(softmax_backward).passed
True
>>> print(grade_softmax_backward(lambda d_p, p: p * d_p).note)
only the Jacobian's diagonal: d_s = p ⊙ d_p misses − p ⊙ Σ_j d_p_j p_j (every p_j depends on every score)
"""

import numpy as np

from ..grad.layers import rms_norm_backward, softmax_backward
from ..model.layers import rms_norm, softmax
from .grader import RTOL, Verdict, compare_array, compare_steps, not_attempted

# The shapes the graders use: small, so that a mistake is found by its values, not lost in rounding.
_RMS_SHAPE = (2, 5, 16)         # [B, T, D]
_SOFTMAX_SHAPE = (2, 3, 5, 5)   # [B, H, T, S]


def _call(exercise, fn, *args):
    """(result, None), or (None, Verdict) when the reader's function raised or is still a stub."""
    try:
        out = fn(*args)
    except Exception as e:   # the reader's code: report, do not raise
        return None, Verdict(exercise, False, note=f"your function raised {type(e).__name__}: {e}")
    if out is None:
        return None, not_attempted(exercise, getattr(fn, "__name__", "your function"))
    return out, None


def rms_norm_inputs(seed=0, shape=_RMS_SHAPE, eps=1e-6):
    """(d_y, x, weight, eps) in float64: what rms_norm's backward receives."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2 + 0.5
    weight = 1 + 0.3 * rng.standard_normal(shape[-1])
    d_y = rng.standard_normal(shape)
    return d_y, x, weight, eps


def grade_rms_norm_backward(fn, seed=0):
    """`fn(d_y, x, weight, eps)` -> (d_x, d_w), or a dict {"d_x": …, "d_w": …}: the backward of
    y = rms_norm(x, weight, eps) = weight ⊙ x / sqrt(mean(x²) + eps) over the last axis, with
    d_y, x [B, T, D], weight [D]; d_x [B, T, D], d_w [D].

    Graded against qwen2np.grad.layers.rms_norm_backward; the typical mistakes are named: d_x without
    the term that comes from r = 1/sqrt(mean(x²) + eps) depending on x, the weight left out of d_x, d_w
    not summed over the rows, or summed without the normalisation."""
    exercise = "RMSNorm backward"
    d_y, x, weight, eps = rms_norm_inputs(seed)
    out, failed = _call(exercise, fn, d_y.copy(), x.copy(), weight.copy(), eps)
    if failed:
        return failed
    if not isinstance(out, dict):
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return Verdict(exercise, False, note=f"expected (d_x, d_w) or a dict {{'d_x': …, 'd_w': …}}, "
                                                 f"found {type(out).__name__}")
        out = {"d_x": out[0], "d_w": out[1]}
    d_x, d_w = rms_norm_backward(d_y, x, weight, eps)
    verdict = compare_steps(exercise, [("d_x", d_x), ("d_w", d_w)], out)
    if not verdict.passed and verdict.first_wrong is not None:
        verdict.note = _rms_norm_hint(verdict.first_wrong, out[verdict.first_wrong], d_y, x, weight, eps)
    return verdict


def _rms_norm_hint(step, mine, d_y, x, weight, eps):
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    n = x * r
    if step == "d_x":
        known = {"r treated as a constant: d_x lacks the term − n · mean(g ⊙ n), the share of r = 1/sqrt("
                 "mean(x²) + eps), which depends on every x_j": d_y * weight * r,
                 "the weight is missing from d_x: the gradient reaching n is g = d_y ⊙ weight":
                     r * (d_y - n * (d_y * n).mean(axis=-1, keepdims=True))}
    else:
        known = {"d_w must be summed over every row (B and T): the weight serves every position":
                     d_y * n,
                 "d_w = Σ_rows d_y ⊙ n, with n = x / sqrt(mean(x²) + eps) (the normalised x, not x)":
                     (d_y * x).reshape(-1, x.shape[-1]).sum(axis=0)}
    for hint, wrong in known.items():
        if np.shape(mine) == wrong.shape and compare_array(mine, wrong)[0]:
            return hint
    return ""


def softmax_inputs(seed=0, shape=_SOFTMAX_SHAPE):
    """(d_p, p) in float64: softmax probabilities of random scores, a causal mask applied (zeros above
    the diagonal, as in attention), and the gradient reaching them."""
    rng = np.random.default_rng(seed)
    scores = 2 * rng.standard_normal(shape)
    T, S = shape[-2:]
    scores = np.where(np.tril(np.ones((T, S), dtype=bool)), scores, np.finfo(np.float64).min)
    p = softmax(scores)
    d_p = rng.standard_normal(shape)
    return d_p, p


def grade_softmax_backward(fn, seed=0):
    """`fn(d_p, p)` -> d_s: the backward of p = softmax(s) over the last axis, given the probabilities p
    and the gradient d_p reaching them, both [B, H, T, S]; d_s [B, H, T, S].

    Graded against qwen2np.grad.layers.softmax_backward; the typical mistakes are named: the Jacobian's
    diagonal only (p ⊙ d_p), the sum over the wrong axis, the sign of the second term."""
    exercise = "softmax backward"
    d_p, p = softmax_inputs(seed)
    out, failed = _call(exercise, fn, d_p.copy(), p.copy())
    if failed:
        return failed
    if isinstance(out, dict):
        out = out.get("d_s")
    verdict = compare_steps(exercise, [("d_s", softmax_backward(d_p, p))], {"d_s": out})
    if not verdict.passed and verdict.first_wrong == "d_s":
        known = {"only the Jacobian's diagonal: d_s = p ⊙ d_p misses − p ⊙ Σ_j d_p_j p_j (every p_j depends "
                 "on every score)": p * d_p,
                 "the sum Σ_j d_p_j p_j runs over the keys, the last axis (where softmax normalised)":
                     p * (d_p - (d_p * p).sum(axis=-2, keepdims=True)),
                 "the sign of the second term: d_s = p ⊙ (d_p − Σ_j d_p_j p_j)":
                     p * (d_p + (d_p * p).sum(axis=-1, keepdims=True))}
        for hint, wrong in known.items():
            if np.shape(out) == wrong.shape and compare_array(out, wrong, RTOL)[0]:
                verdict.note = hint
                break
    return verdict
