"""Exercises of notebook 6 (training): RMSNorm's backward and softmax's backward, graded against
qwen2np.grad's own (qwen2np/grad/layers.py), on float64 inputs the grader makes itself (no checkpoint).

Each grader compares what the reader's function returns with the reference, output by output (the first
wrong one is named), and recognises the usual mistakes by recomputing them: the reader's float64 answer
reproduces a known mistake to rounding, so each is told apart from the others, even those that differ
from it by little (eps outside the square root, or no eps at all).

>>> def softmax_backward(d_p, p):
...     return p * (d_p - (d_p * p).sum(axis=-1, keepdims=True))
>>> grade_softmax_backward(softmax_backward).passed
True
>>> print(grade_softmax_backward(lambda d_p, p: p * d_p))      # doctest: +ELLIPSIS
softmax backward: wrong. The first wrong operation is `d_s`.
  d_s  WRONG max |yours - model| = ... only the Jacobian's diagonal: p ⊙ d_p misses − p ⊙ Σ_j d_p_j p_j (every p_j depends on every score)
"""

import numpy as np

from ...grad.layers import rms_norm_backward, softmax_backward
from ...model.layers import softmax
from ..grader import Verdict, call, compare_steps, graded, recognise

# The shapes the graders use: small, so that a mistake is found by its values, not lost in rounding.
_RMS_SHAPE = (2, 5, 16)         # [B, T, D]
_SOFTMAX_SHAPE = (2, 3, 5, 5)   # [B, H, T, S]
_KNOWN = 1e-9                   # a float64 answer reproduces a known mistake to rounding


# -- RMSNorm's backward ------------------------------------------------------------------------------------


def rms_norm_inputs(seed=0, shape=_RMS_SHAPE, eps=1e-6):
    """(d_y, x, weight, eps) in float64: what rms_norm's backward receives. x is of the embeddings' scale
    (rms ≈ 0.01, the real checkpoint's are ≈ 0.016), where eps = 1e-6 is a part in 200 of mean(x²): where
    eps goes shows. Its mean is not 0, so that LayerNorm's centring would show too."""
    rng = np.random.default_rng(seed)
    x = 0.01 * (rng.standard_normal(shape) + 0.5)
    weight = 1 + 0.3 * rng.standard_normal(shape[-1])
    d_y = rng.standard_normal(shape)
    return d_y, x, weight, eps


def _rms_norm_mistakes(d_y, x, weight, eps):
    """{message: (d_x, d_w) of a known mistake}: what each wrong answer computes."""
    D = x.shape[-1]
    ms = (x * x).mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt(ms + eps)
    n = x * r
    g = d_y * weight
    d_w = (d_y * n).reshape(-1, D).sum(axis=0)

    def backward(r, g, mean=np.mean, sign=-1):      # d_x for another r, another g, sum for mean, + for −
        n = x * r
        return r * (g + sign * n * mean(g * n, axis=-1, keepdims=True))

    return {
        "d_x": {
            "r treated as a constant: d_x lacks the term − r · n · mean(g ⊙ n), r's share (r = 1/sqrt(mean(x²) "
            "+ eps) depends on every x_j)": r * g,
            "the weight is missing from d_x: the gradient reaching n is g = d_y ⊙ weight": backward(r, d_y),
            "this is the weight's gradient before its sum over positions (d_y ⊙ n), not x's: x reaches y "
            "through n = x · r, so d_x = r · (g − n · mean(g ⊙ n)) with g = d_y ⊙ weight": d_y * n,
            "a sum where the mean belongs: r's term is n · mean(g ⊙ n), the 1/D of mean(x²) carried through":
                backward(r, g, mean=np.sum),
            "the sign of r's term: d_x = r · (g − n · mean(g ⊙ n)) (a larger |x| makes r smaller)":
                backward(r, g, sign=+1),
            "eps is outside the square root: r = 1 / sqrt(mean(x²) + eps), and at this scale (rms ≈ 0.01) eps "
            "shows": _rms_eps_outside(d_y, x, weight, eps),
            "eps is missing: r = 1 / sqrt(mean(x²) + eps)": backward(1 / np.sqrt(ms), g),
            "r = 1 / sqrt(Σ x² + eps): the root *mean* square divides by D": _rms_sum_of_squares(d_y, x, weight, eps),
        },
        "d_w": {
            "d_w = Σ_rows d_y ⊙ n, with n = x / sqrt(mean(x²) + eps) (the normalised x, not x)":
                (d_y * x).reshape(-1, D).sum(axis=0),
            "d_w is a sum over the positions, not a mean: the weight serves each position, and each adds its "
            "share": d_w / (d_y.size // D),
            "d_w = Σ_rows d_y ⊙ n: the weight multiplies n, so n (not the weight) goes into its gradient":
                (d_y * weight).reshape(-1, D).sum(axis=0),
        },
    }


def _rms_eps_outside(d_y, x, weight, eps):
    """d_x of y = w ⊙ x / (sqrt(mean(x²)) + eps), the chain rule done right for that wrong forward."""
    D = x.shape[-1]
    root = np.sqrt((x * x).mean(axis=-1, keepdims=True))
    r = 1 / (root + eps)
    g = d_y * weight
    # dr/dx_j = −r² · x_j / (D · root)
    return r * g - x * (r * r / (D * root)) * (g * x).sum(axis=-1, keepdims=True)


def _rms_sum_of_squares(d_y, x, weight, eps):
    """d_x of y = w ⊙ x / sqrt(Σ x² + eps), the chain rule done right for that wrong forward."""
    r = 1 / np.sqrt((x * x).sum(axis=-1, keepdims=True) + eps)
    g = d_y * weight
    return r * g - x * r ** 3 * (g * x).sum(axis=-1, keepdims=True)


@graded("RMSNorm backward")
def grade_rms_norm_backward(fn, seed=0):
    """`fn(d_y, x, weight, eps)` -> (d_x, d_w), or a dict {"d_x": …, "d_w": …}: the backward of
    y = weight ⊙ x / sqrt(mean(x²) + eps) over the last axis, with d_y, x [B, T, D], weight [D];
    d_x [B, T, D], d_w [D]. Graded against qwen2np.grad.layers.rms_norm_backward, in float64."""
    exercise = "RMSNorm backward"
    d_y, x, weight, eps = rms_norm_inputs(seed)
    out, failed = call(exercise, fn, d_y, x, weight, eps)
    if failed:
        return failed
    if not isinstance(out, dict):
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            return Verdict(exercise, False, note=f"expected (d_x, d_w) or a dict {{'d_x': …, 'd_w': …}}, found "
                                                 f"{type(out).__name__}")
        out = {"d_x": out[0], "d_w": out[1]}
    d_x, d_w = rms_norm_backward(d_y, x, weight, eps)
    mistakes = _rms_norm_mistakes(d_y, x, weight, eps)
    hints = {step: (lambda mine, ref, known=known: recognise(mine, known, rtol=_KNOWN)) for step, known in mistakes.items()}
    verdict = compare_steps(exercise, [("d_x", d_x), ("d_w", d_w)], out, required=["d_x", "d_w"], hints=hints)
    mine_w = out.get("d_w")
    if verdict.first_wrong == "d_w" and np.ndim(mine_w) > 1 and np.shape(mine_w)[-1] == x.shape[-1]:
        verdict.note = "d_w must be summed over every position (B and T): the weight serves them all"
    return verdict


# -- softmax's backward ------------------------------------------------------------------------------------


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


def _softmax_mistakes(d_p, p):
    """{message: d_s of a known mistake}."""
    dot = (d_p * p).sum(axis=-1, keepdims=True)        # [B, H, T, 1]: one number per query
    return {
        "only the Jacobian's diagonal: p ⊙ d_p misses − p ⊙ Σ_j d_p_j p_j (every p_j depends on every score)":
            p * d_p,
        "the dot product Σ_j d_p_j p_j runs over the keys, the last axis (where softmax normalised), not the "
        "queries": p * (d_p - (d_p * p).sum(axis=-2, keepdims=True)),
        "the dot product is one number per query (per row), summed over the keys only, not over everything":
            p * (d_p - (d_p * p).sum()),
        "the sign of the second term: d_s = p ⊙ (d_p − Σ_j d_p_j p_j)": p * (d_p + dot),
        "the dot product is Σ_j d_p_j p_j, weighted by p, not Σ_j d_p_j": p * (d_p - d_p.sum(axis=-1, keepdims=True)),
        "the factor p is missing: d_s = p ⊙ (d_p − Σ_j d_p_j p_j)": d_p - dot,
    }


@graded("softmax backward")
def grade_softmax_backward(fn, seed=0):
    """`fn(d_p, p)` -> d_s: the backward of p = softmax(s) over the last axis, given the probabilities p
    and the gradient d_p reaching them, both [B, H, T, S]; d_s [B, H, T, S]. Graded against
    qwen2np.grad.layers.softmax_backward, in float64."""
    exercise = "softmax backward"
    d_p, p = softmax_inputs(seed)
    out, failed = call(exercise, fn, d_p, p)
    if failed:
        return failed
    if isinstance(out, dict):
        out = out.get("d_s")
    known = _softmax_mistakes(d_p, p)
    return compare_steps(exercise, [("d_s", softmax_backward(d_p, p))], {"d_s": out},
                         hints={"d_s": lambda mine, ref: recognise(mine, known, rtol=_KNOWN)})
