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

Each figure is measured a block at a time (`blocks`, at most `BLOCK` elements), so that measuring costs a
few blocks in float64 whatever the size of the tensor (a [1, 1024, 151936] logits tensor is 622 MB in
float32): x and y may be arrays or anything that reads a block when indexed with a tuple of slices (a
dump's `DumpTensor`, tensor_file.py, which reads the block from the file).

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
BLOCK = 1 << 20   # elements measured at a time; a block is held in float64 a few times over (8 MB each)
_NO_SCALE = -1100  # below every float64's exponent (2^-1074 is the smallest): the first value sets the scale


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


def blocks(shape, size=BLOCK):
    """Index tuples (a slice per axis) that cut an array of `shape` into C-contiguous blocks of at most
    `size` elements (more only where one element of the axes after the cut is more), in C order: the whole
    array when it fits, else single indices of the leading axes, a range of one axis, the trailing axes
    whole. Each block keeps every axis, so that a mask of the array's shape is cut the same way.

    >>> [tuple((s.start, s.stop) for s in b) for b in blocks((2, 3, 4), 8)]
    [((0, 1), (0, 2), (0, 4)), ((0, 1), (2, 3), (0, 4)), ((1, 2), (0, 2), (0, 4)), ((1, 2), (2, 3), (0, 4))]
    >>> list(blocks((2, 3), 8)), list(blocks((0, 3), 1))
    ([(slice(0, 2, None), slice(0, 3, None))], [])
    """
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) == 0:
        return
    if math.prod(shape) <= size:
        yield tuple(slice(0, n) for n in shape)
        return
    cut = next(k for k in range(len(shape)) if math.prod(shape[k + 1:]) <= size)   # the axis cut in ranges
    step = max(1, size // math.prod(shape[cut + 1:]))
    whole = tuple(slice(0, n) for n in shape[cut + 1:])
    for lead in np.ndindex(*shape[:cut]):
        for i in range(0, shape[cut], step):
            yield tuple(slice(j, j + 1) for j in lead) + (slice(i, min(i + step, shape[cut])),) + whole


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


def differences(x, y, valid=None, convert=None):
    """The Differences of x from the reference y (of x's shape) over the `valid` elements (all when None),
    a block at a time; `convert`, when given, maps each block of x and y before it is measured.

    >>> e = differences(np.array([1e3, 1e-159]), np.array([1e3, 0.0]))   # Σ err² = 1e-318: below float64's range
    >>> round(e.nmse_db), e.cosine
    (-3240, 1.0)
    """
    sums = _Sums()
    compared, one_sided = 0, False
    for index in blocks(x.shape):
        xb, yb = np.asarray(x[index]), np.asarray(y[index])
        if convert is not None:
            xb, yb = convert(xb), convert(yb)
        keep = None if valid is None else valid[index]
        xs, ys = values(xb, keep), values(yb, keep)
        compared += xs.size
        pairs = None if one_sided else finite_pairs(xs, ys)
        if pairs is None:   # inf or NaN on one side only: counted, no longer measured
            one_sided = True
            continue
        sums.add(*pairs)
    if one_sided:
        return Differences(compared, math.inf, math.inf, math.inf, math.inf, math.nan, one_sided=True)
    return sums.result(compared)


class _Sums:
    """The running figures of one comparison, fed block by block with pairs finite on both sides.

    subtle: a sum of squares or products is held scaled, Σ (a / 2^ea)·(b / 2^eb), by powers of two at
    least the largest |a| and |b| seen so far, and rescaled (exactly: by a power of two) when a block
    brings a larger value. So no sum overflows or underflows: an error of 1e-159 against values near 1e3
    gives about -3240 dB rather than log10(0), and values near 1e200 a cosine rather than inf / inf.
    """

    def __init__(self):
        self.finite = 0                       # elements measured
        self.max_abs = self.sum_abs = 0.0     # of |x - y|
        self.peak = {"x": 0.0, "y": 0.0}      # max |x|, max |y|
        self.exp = dict.fromkeys("xye", _NO_SCALE)   # the scales 2^exp of x, y and the error e = |x - y|
        self.sum = {"xx": 0.0, "yy": 0.0, "xy": 0.0, "ee": 0.0}   # the scaled sums

    def add(self, xs, ys):
        if not xs.size:
            return
        err = np.abs(xs - ys)                                                  # [n]
        peaks = {"x": float(np.abs(xs).max()), "y": float(np.abs(ys).max()), "e": float(err.max())}
        self.finite += xs.size
        self.max_abs = max(self.max_abs, peaks["e"])
        self.sum_abs += float(err.sum())
        for v in "xy":
            self.peak[v] = max(self.peak[v], peaks[v])
        for v, peak in peaks.items():
            grown = math.frexp(peak)[1]   # peak < 2^grown
            if grown > self.exp[v]:       # a larger scale: every sum holding v shrinks by 2^(old - grown) per factor
                for key in self.sum:
                    self.sum[key] = math.ldexp(self.sum[key], (self.exp[v] - grown) * key.count(v))
                self.exp[v] = grown
        x, y, e = (np.ldexp(a, -self.exp[v]) for a, v in ((xs, "x"), (ys, "y"), (err, "e")))
        # subtle: sums, not np.dot: BLAS's threaded dot stalls for milliseconds per call on a busy machine
        self.sum["xx"] += float((x * x).sum())
        self.sum["yy"] += float((y * y).sum())
        self.sum["xy"] += float((x * y).sum())
        self.sum["ee"] += float((e * e).sum())

    def log10(self, key):
        """log10 of the unscaled sum `key`."""
        return math.log10(self.sum[key]) + sum(self.exp[v] for v in key) * math.log10(2.0)

    def result(self, compared):
        if not self.finite:
            return Differences(compared, 0.0, 0.0, 0.0, None, None)
        rel = 0.0 if self.max_abs == 0 else self.max_abs / max(self.peak.values())
        nmse = None if self.max_abs == 0 else math.inf if self.peak["y"] == 0 else \
            10 * (self.log10("ee") - self.log10("yy"))
        cosine = None if self.peak["x"] == 0 or self.peak["y"] == 0 else \
            self.sum["xy"] / math.sqrt(self.sum["xx"] * self.sum["yy"])   # the scales cancel
        return Differences(compared, self.max_abs, self.sum_abs / self.finite, rel, nmse, cosine)


def distance_db(a, b):
    """NMSE of a against b in dB over the elements finite in both (-inf: equal).

    >>> round(distance_db(np.array([1.1, np.nan]), np.array([1.0, 2.0])), 6), distance_db([1.0], [1.0])
    (-20.0, -inf)
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    value = differences(a[finite], b[finite]).nmse_db
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


def ulp_shares(x, expected, dtype, valid=None):
    """(share of elements off by half an ulp or more, share off by more than 1.5 ulps, the most ulps) of
    x against `expected` (of x's shape) over the `valid` elements (all when None), a block at a time; all
    three inf when a value is inf or NaN on one side only, None when no element is finite in both."""
    measured = half = beyond = 0
    most = 0.0
    for index in blocks(np.shape(x)):
        keep = None if valid is None else valid[index]
        pairs = finite_pairs(values(np.asarray(x[index]), keep), values(np.asarray(expected[index]), keep))
        if pairs is None:
            return math.inf, math.inf, math.inf
        d = ulps(*pairs, dtype)
        if d.size:
            measured, most = measured + d.size, max(most, float(d.max()))
            half, beyond = half + int((d > 0.5).sum()), beyond + int((d > 1.5).sum())
    if not measured:
        return None
    return half / measured, beyond / measured, most


# -- logits: agreement of the distributions -----------------------------------------------------------


def logits_divergence(x, y, valid_rows=None, *, top_p):
    """(mean KL(softmax y ‖ softmax x) in nats, share of rows whose top-p nucleus is the same set) over
    the last axis, y the reference, over the rows `valid_rows` selects (all when None). The nucleus is the
    smallest set of most likely tokens whose probability reaches `top_p` (what TopPLogitsWarper keeps).

    >>> y = np.log(np.array([[0.5, 0.3, 0.2]])); x = np.log(np.array([[0.5, 0.2, 0.3]]))
    >>> kl, same = logits_divergence(x, y, top_p=0.9); round(kl, 4), same    # 0.9 needs all three
    (0.0405, 1.0)
    """
    rows = kl = same = 0
    for xr, yr in _row_blocks(x, y, valid_rows):
        lx, ly = _log_softmax(xr), _log_softmax(yr)                       # [rows, V]
        rows += len(xr)
        kl += float((np.exp(ly) * (ly - lx)).sum())
        same += sum(_nucleus(a, top_p) == _nucleus(b, top_p) for a, b in zip(lx, ly))
    if not rows:
        return None, None
    return kl / rows, same / rows


def top_k_agreement(x, y, valid_rows=None, k=TOP_K):
    """(share of rows with the same argmax, share with the same set of k best) over the last axis."""
    rows = top1 = topk = 0
    k = min(k, np.shape(x)[-1])
    for xr, yr in _row_blocks(x, y, valid_rows):
        rows += len(xr)
        top1 += int((xr.argmax(-1) == yr.argmax(-1)).sum())
        best_x = np.sort(np.argpartition(-xr, k - 1, axis=-1)[:, :k], axis=-1)
        best_y = np.sort(np.argpartition(-yr, k - 1, axis=-1)[:, :k], axis=-1)
        topk += int((best_x == best_y).all(-1).sum())
    if not rows:
        return None, None
    return top1 / rows, topk / rows


def _row_blocks(x, y, valid_rows):
    """x and y a block of whole rows at a time, as [rows, last axis], keeping only the rows `valid_rows`
    (a boolean array of x's shape but the last axis) selects."""
    V = np.shape(x)[-1]
    for index in blocks(np.shape(x), max(BLOCK, V)):   # whole rows: the cut is before the last axis
        xr, yr = np.asarray(x[index]).reshape(-1, V), np.asarray(y[index]).reshape(-1, V)
        if valid_rows is not None:
            keep = np.asarray(valid_rows[index[:-1]]).reshape(-1)
            xr, yr = xr[keep], yr[keep]
        if len(xr):
            yield xr, yr


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nucleus(log_probs, top_p):
    order = np.argsort(-log_probs, kind="stable")
    mass = np.cumsum(np.exp(log_probs[order]))
    return frozenset(order[:int(np.searchsorted(mass, top_p)) + 1].tolist())
