"""How far one array is from another: the figures `compare` and `isolate` report, each computed here once.

x is the array under test (dump A), y the reference (dump B, or the recomputation of an operation):

    max abs    max |x - y|
    mean abs   mean |x - y|
    rel        max |x - y| / max(max |x|, max |y|)
    NMSE dB    10 log10( Σ (x - y)² / Σ y² )          None (-inf dB) when x == y
    cosine     Σ x·y / √(Σ x² · Σ y²)
    ulps       |x - y| in units in the last place of a half-precision dtype at y
    logits     top-1 / top-k agreement, mean KL(softmax y ‖ softmax x), same top-p nucleus

docs/tolerances.md says what each is held to. NumPy and ml_dtypes only, like recipes.py
(tests/test_layering.py holds it).

>>> import numpy as np
>>> e = differences(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.3]))
>>> round(e.max_abs, 6), round(e.rel, 6), round(e.nmse_db, 2), round(e.cosine, 6)
(0.3, 0.090909, -22.47, 0.998988)
"""

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .rounding import half_dtype

TOP_K = 5   # the k of top-k agreement


@dataclass(frozen=True)
class Differences:
    """The figures of x against the reference y over the elements compared."""

    compared: int
    max_abs: float
    mean_abs: float
    rel: float
    nmse_db: float | None   # None: no error at all (-inf dB); inf: a value finite on one side only
    cosine: float | None    # None: one side is all zeros; NaN: a value finite on one side only
    one_sided: bool = False  # a value is inf or NaN on one side only: every figure is inf (cosine NaN)


def values(x, valid=None):
    """The elements of x that `valid` (a boolean array of x's shape) selects, all when None: flat, float64."""
    return np.asarray(x if valid is None else x[valid], dtype=np.float64).reshape(-1)


def finite_pairs(xs, ys):
    """(xs, ys) at the elements finite in both, or None when a value is inf or NaN on one side only.
    The same inf or NaN on both sides agrees, and is left out."""
    finite = np.isfinite(xs) & np.isfinite(ys)
    if finite.all():
        return xs, ys
    if not np.array_equal(xs[~finite], ys[~finite], equal_nan=True):
        return None
    return xs[finite], ys[finite]


def differences(x, y, valid=None):
    """The Differences of x from the reference y over the `valid` elements (all when None)."""
    xs, ys = values(x, valid), values(y, valid)
    pairs = finite_pairs(xs, ys)
    if pairs is None:   # inf or NaN on one side only
        return Differences(int(xs.size), math.inf, math.inf, math.inf, math.inf, math.nan, one_sided=True)
    xs, ys = pairs
    err = np.abs(xs - ys)
    max_abs = float(err.max()) if err.size else 0.0
    scale = max(float(np.abs(xs).max()), float(np.abs(ys).max())) if err.size else 0.0
    rel = 0.0 if max_abs == 0 else max_abs / scale
    return Differences(int(xs.size), max_abs, float(err.mean()) if err.size else 0.0, rel, nmse_db(err, ys),
                       cosine(xs, ys))


def cosine(x, y):
    """Σ x·y / √(Σ x² · Σ y²), scaled so that no sum overflows or underflows; None when either is all zeros.

    >>> cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    0.7071067811865475
    """
    px, py = float(np.abs(x).max()) if x.size else 0.0, float(np.abs(y).max()) if y.size else 0.0
    if px == 0 or py == 0:
        return None
    if not (1e-100 < px < 1e100 and 1e-100 < py < 1e100):   # squares would leave float64's range
        x, y = x / px, y / py
    # subtle: sums, not np.dot: BLAS's threaded dot stalls for milliseconds per call on a busy machine
    return float((x * y).sum() / math.sqrt(float((x * x).sum()) * float((y * y).sum())))


def nmse_db(err, ref):
    """10·log10(Σ err² / Σ ref²): None when there is no error, inf when the reference is all zeros.

    subtle: computed in log space, each sum scaled by its largest element, so that an error of 1e-159
    against values near 1e3 gives about -3240 dB instead of underflowing to log10(0).

    >>> round(nmse_db(np.array([0.1, 0.0]), np.array([1.0, 0.0])), 6)
    -20.0
    >>> round(nmse_db(np.array([1e-159]), np.array([1e3])))
    -3240
    """
    def log10_energy(v):   # log10(Σ v²) without underflow or overflow
        peak = float(np.abs(v).max())
        return 2 * math.log10(peak) + math.log10(float(((v / peak) ** 2).sum()))

    if err.size == 0 or not err.any():
        return None
    if not ref.any():
        return math.inf
    return 10 * (log10_energy(err) - log10_energy(ref))


def distance_db(a, b):
    """NMSE of a against b in dB over the elements finite in both (-inf: equal).

    >>> round(distance_db(np.array([1.1, np.nan]), np.array([1.0, 2.0])), 6), distance_db([1.0], [1.0])
    (-20.0, -inf)
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    value = nmse_db(np.abs(a[finite] - b[finite]), b[finite])
    return -np.inf if value is None else value


# -- half precision: units in the last place ----------------------------------------------------------


def ulps(x, expected, dtype):
    """|x - expected| in units in the last place of `dtype` ("bfloat16" or "float16") at `expected`
    (both float64 arrays).

    >>> ulps(np.array([1 + 2 ** -7, 2.0, 0.0]), np.array([1.0, 2.0, 2.0 ** -133]), "bfloat16").tolist()
    [1.0, 0.0, 1.0]
    """
    info = ml_dtypes.finfo(half_dtype(dtype))
    exponent = np.floor(np.log2(np.maximum(np.abs(expected), float(info.smallest_normal))))   # subnormals: one step
    return np.abs(x - expected) / np.exp2(exponent - info.nmant)


def ulp_shares(x, expected, dtype):
    """(share of elements off by half an ulp or more, share off by more than 1.5 ulps, the most ulps) of
    x against `expected` (flat float64 arrays); all three inf when a value is inf or NaN on one side only,
    None when no element is finite in both."""
    pairs = finite_pairs(x, expected)
    if pairs is None:
        return math.inf, math.inf, math.inf
    d = ulps(*pairs, dtype)
    if not d.size:
        return None
    return float((d > 0.5).mean()), float((d > 1.5).mean()), float(d.max())


# -- logits: agreement of the distributions -----------------------------------------------------------


def logits_divergence(x, y, valid_rows=None, *, top_p, block=64):
    """(mean KL(softmax y ‖ softmax x) in nats, share of rows whose top-p nucleus is the same set) over
    the last axis, y the reference. The nucleus is the smallest set of most likely tokens whose
    probability reaches `top_p` (what TopPLogitsWarper keeps).

    >>> y = np.log(np.array([[0.5, 0.3, 0.2]])); x = np.log(np.array([[0.5, 0.2, 0.3]]))
    >>> kl, same = logits_divergence(x, y, top_p=0.9); round(kl, 4), same    # 0.9 needs all three
    (0.0405, 1.0)
    """
    x, y = _paired_rows(x, y, valid_rows)
    if x.shape[0] == 0:
        return None, None
    kl, same = [], []
    for r0 in range(0, x.shape[0], block):
        lx, ly = _log_softmax(x[r0:r0 + block]), _log_softmax(y[r0:r0 + block])
        kl.append((np.exp(ly) * (ly - lx)).sum(-1))
        same.append([_nucleus(a, top_p) == _nucleus(b, top_p) for a, b in zip(lx, ly)])
    return float(np.concatenate(kl).mean()), float(np.concatenate(same).mean())


def top_k_agreement(x, y, valid_rows=None, k=TOP_K):
    """(share of rows with the same argmax, share with the same set of k best) over the last axis."""
    x, y = _paired_rows(x, y, valid_rows)
    if x.shape[0] == 0:
        return None, None
    top1 = float((x.argmax(-1) == y.argmax(-1)).mean())
    k = min(k, x.shape[-1])
    best_x = np.sort(np.argpartition(-x, k - 1, axis=-1)[:, :k], axis=-1)
    best_y = np.sort(np.argpartition(-y, k - 1, axis=-1)[:, :k], axis=-1)
    return top1, float((best_x == best_y).all(-1).mean())


def _paired_rows(x, y, valid_rows):
    """x and y as [rows, last axis], keeping only the rows `valid_rows` (a boolean mask) selects."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if valid_rows is None:
        return x, y
    rows = np.asarray(valid_rows).reshape(-1)
    return x[rows], y[rows]


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nucleus(log_probs, top_p):
    order = np.argsort(-log_probs, kind="stable")
    mass = np.cumsum(np.exp(log_probs[order]))
    return frozenset(order[:int(np.searchsorted(mass, top_p)) + 1].tolist())
