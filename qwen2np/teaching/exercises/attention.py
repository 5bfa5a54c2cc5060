"""Exercises of notebook 2, part 1: attention from zero, on small arrays the grader makes itself (so that
no checkpoint is needed): the softmax, the causal and padded masks, one attention head, several heads.

The references are written here again in plain float64 NumPy; the masks are qwen2np's own
(`qwen2np.model.masks`), which transformers' tests hold.

>>> import numpy as np
>>> def naive(x):                       # no max subtracted: exp(1000) overflows
...     with np.errstate(over="ignore", invalid="ignore"):
...         return np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
>>> verdict = grade_softmax(naive)
>>> verdict.passed, verdict.first_wrong
(False, 'large scores')
"""

import numpy as np

from ...model.masks import attention_bias, build_attention_bias, visibility
from ..grader import Verdict, call, compare_array, compare_steps, fail, graded, recognise

F32 = np.float32
LOWEST = np.finfo(np.float32).min


def softmax64(z, axis=-1):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _rng():
    return np.random.default_rng(2024)


# -- softmax ------------------------------------------------------------------------------------------------


@graded("softmax")
def grade_softmax(fn):
    """`fn(x)` -> the softmax of `x` along its last axis (each row sums to 1), for float32 scores of any
    shape, including huge scores and rows that the mask hides (finfo.min)."""
    exercise = "softmax"
    rng = _rng()
    cases = [
        ("one row", np.array([[1.0, 2.0, 3.0, 0.5]], dtype=F32)),
        ("rows [2, 3, 5]", rng.standard_normal((2, 3, 5)).astype(F32) * 3),
        ("large scores", np.array([[1000.0, 1001.0, 1002.0]], dtype=F32)),
        ("masked keys", np.array([[0.5, LOWEST, LOWEST], [0.5, 1.5, LOWEST]], dtype=F32)),
        ("a row all masked", np.full((1, 4), LOWEST, dtype=F32)),
    ]
    steps = []
    for name, x in cases:
        out, failed = call(exercise, fn, x)
        if failed:
            return failed
        ref = softmax64(x)
        ok, detail = compare_array(out, ref)
        if not ok:
            hint = recognise(out, {
                "you normalised along the first axis: softmax runs along the last axis (axis=-1), one "
                "probability distribution per row": lambda: softmax64(x, axis=0),
                "each row must sum to 1: divide by the sum of its exponentials": lambda: np.exp(x - x.max(-1, keepdims=True)),
            })
            with np.errstate(over="ignore", invalid="ignore"):
                if not hint and not np.isfinite(np.asarray(out, dtype=np.float64)).all() and np.abs(x).max() > 80:
                    hint = ("exp(1000) overflows to inf, and inf / inf is NaN: subtract each row's maximum before "
                            "exp (softmax does not change)")
            return fail(exercise, steps, name, detail + (f". {hint}" if hint else ""))
        steps.append((name, True, detail))
    return Verdict(exercise, True, steps)


# -- the causal mask and the padded mask -------------------------------------------------------------------


def _mask_hints(out, T, S, attention_mask=None):
    past = S - T
    vis = visibility(past, T, 0, S)                                               # [T, S]

    def bias(v):
        return attention_bias(v, np.dtype(F32))

    def padded(v):
        if attention_mask is None:
            return bias(v)
        keep = attention_mask.astype(bool)
        return bias(v[None, None] & keep[:, None, None, :])

    return recognise(out, {
        "you used -inf: a query that sees no key (a padding row) then gets exp(-inf - -inf) = NaN; hide "
        "with np.finfo(np.float32).min": lambda: np.where(padded(vis) == 0, F32(0), F32(-np.inf)),
        "this is a boolean picture of what is visible: the mask is *added* to the scores, 0 where a key is "
        "visible and finfo.min where it is hidden": lambda: padded(vis).astype(bool) == False,   # noqa: E712
        "keys after the query are visible and earlier ones hidden: the triangle is the wrong way round "
        "(key j is visible to query i when j <= i)": lambda: padded(vis.T) if S == T else None,
        "a query must see itself: key j is visible to query i when j <= i, the diagonal included":
            lambda: padded(np.arange(S)[None, :] < np.arange(past, S)[:, None]),
        f"your triangle starts at key 0, as if S == T: with {past} cached keys before these {T} queries, "
        f"query i sits at position {past} + i and sees keys 0 … {past} + i":
            lambda: padded(np.arange(S)[None, :] <= np.arange(T)[:, None]) if past else None,
        "padding hides the padded *queries* (rows) here; it must hide the padded *keys* (columns): a real "
        "token must not read a padding token": lambda: None if attention_mask is None else
            bias(vis[None, None] & attention_mask.astype(bool)[:, None, :, None]),
        "the causal part is missing: only padding is hidden, so a query reads the future":
            lambda: None if attention_mask is None else
            bias(np.broadcast_to(attention_mask.astype(bool)[:, None, None, :], (len(attention_mask), 1, T, S))),
        "the padding part is missing: padded keys must be hidden from every query":
            lambda: None if attention_mask is None else bias(np.broadcast_to(vis, (len(attention_mask), 1, T, S))),
    }, rtol=0)


@graded("the causal mask")
def grade_causal_mask(fn):
    """`fn(T, S)` -> the additive causal mask [T, S] (float32) of T new queries, the last T of S positions
    (S - T of them cached before): 0 where query i may see key j, np.finfo(np.float32).min elsewhere."""
    exercise = "the causal mask"
    steps = []
    for T, S in [(4, 4), (1, 5), (3, 7)]:
        out, failed = call(exercise, fn, T, S)
        if failed:
            return failed
        ref = attention_bias(visibility(S - T, T, 0, S), np.dtype(F32))
        ok, detail = compare_array(out, ref, rtol=0)
        name = f"T={T}, S={S}"
        if not ok:
            hint = _mask_hints(out, T, S)
            return fail(exercise, steps, name, detail + (f". {hint}" if hint else ""))
        steps.append((name, True, detail))
    return Verdict(exercise, True, steps)


@graded("the padded mask")
def grade_padded_mask(fn):
    """`fn(attention_mask)` -> the additive mask [B, 1, T, T] of a batch whose attention_mask [B, T] has 0
    on padding (left or right): causal, and no query sees a padded key."""
    exercise = "the padded mask"
    steps = []
    for name, m in [("left padding", np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),
                    ("right padding", np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))]:
        out, failed = call(exercise, fn, m)
        if failed:
            return failed
        B, T = m.shape
        ref = build_attention_bias(B, 0, T, 0, T, m, None, None, F32)
        ok, detail = compare_array(out, ref, rtol=0)
        if not ok:
            hint = _mask_hints(out, T, T, m)
            return fail(exercise, steps, name, detail + (f". {hint}" if hint else ""))
        steps.append((name, True, detail))
    return Verdict(exercise, True, steps)


# -- one head, then several -------------------------------------------------------------------------------------


def toy_head_inputs(T=5, D=8, HD=4):
    """x [T, D] and the weights w_q, w_k, w_v [D, HD] of one toy head (float32, seeded)."""
    rng = _rng()
    x = rng.standard_normal((T, D)).astype(F32)
    w_q, w_k, w_v = (rng.standard_normal((D, HD)).astype(F32) * F32(0.8) for _ in range(3))
    return x, w_q, w_k, w_v


def head_steps(x, w_q, w_k, w_v):
    """The reference steps of one causal head, in float64: [(name, array)]."""
    x, w_q, w_k, w_v = (np.asarray(a, dtype=np.float64) for a in (x, w_q, w_k, w_v))
    T, HD = x.shape[0], w_q.shape[1]
    q, k, v = x @ w_q, x @ w_k, x @ w_v                                   # [T, HD] each
    scores = q @ k.T / np.sqrt(HD)                                       # [T, T]
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)
    probs = softmax64(np.where(hidden, LOWEST, scores))                  # [T, T]
    return [("q", q), ("k", k), ("v", v), ("scores", scores), ("probs", probs), ("context", probs @ v)]


@graded("one attention head")
def grade_attention_head(fn):
    """`fn(x, w_q, w_k, w_v)` -> the context [T, HD] of one causal head (or a dict of the steps "q", "k",
    "v", "scores" (scaled, before the mask), "probs", "context"), for x [T, D] and weights [D, HD]."""
    exercise = "one attention head"
    x, w_q, w_k, w_v = toy_head_inputs()
    out, failed = call(exercise, fn, x, w_q, w_k, w_v)
    if failed:
        return failed
    expected = head_steps(x, w_q, w_k, w_v)
    ref = dict(expected)
    T, HD = x.shape[0], w_q.shape[1]
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)
    hints = {
        "scores": lambda mine, r: recognise(mine, {
            "not divided by √HD: without it the scores grow with the head dim and the softmax saturates":
                ref["q"] @ ref["k"].T,
            "this is k qᵀ: row i must be query i's scores against every key, q kᵀ": r.T,
            "divided by HD: the scale is 1/√HD": r / np.sqrt(HD)}),
        "probs": lambda mine, r: recognise(mine, {
            "query i reads keys after i: the future leaks. Hide them (add the causal mask) before the softmax":
                softmax64(ref["scores"]),
            "normalised along the first axis: each *row* (one query) must sum to 1":
                softmax64(np.where(hidden, LOWEST, ref["scores"]), axis=0),
            "the mask was applied after the softmax: the rows no longer sum to 1":
                np.where(hidden, 0, softmax64(ref["scores"]))}),
        "context": lambda mine, r: recognise(mine, {"this is probsᵀ v: row i must be Σ_j probs[i, j] v[j]":
                                                    ref["probs"].T @ ref["v"]}),
    }
    return compare_steps(exercise, expected, out, hints=hints)


def toy_heads_inputs(T=6, D=12, H=3):
    """x [T, D] and w_q, w_k, w_v, w_o [D, D] of a toy H-head attention (float32, seeded)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, D)).astype(F32)
    ws = [rng.standard_normal((D, D)).astype(F32) * F32(0.5) for _ in range(4)]
    return (x, *ws, H)


def heads_steps(x, w_q, w_k, w_v, w_o, H):
    x, w_q, w_k, w_v, w_o = (np.asarray(a, dtype=np.float64) for a in (x, w_q, w_k, w_v, w_o))
    T, D = x.shape
    HD = D // H

    def split(y):                                                        # [T, H*HD] -> [H, T, HD]
        return y.reshape(T, H, HD).transpose(1, 0, 2)

    q, k, v = split(x @ w_q), split(x @ w_k), split(x @ w_v)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(HD)                      # [H, T, T]
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)
    probs = softmax64(np.where(hidden, LOWEST, scores))
    context = (probs @ v).transpose(1, 0, 2).reshape(T, H * HD)          # [H, T, HD] -> [T, D]
    return [("q_heads", q), ("scores", scores), ("probs", probs), ("context", context), ("out", context @ w_o)]


@graded("several heads")
def grade_multi_head(fn):
    """`fn(x, w_q, w_k, w_v, w_o, H)` -> the output [T, D] of H causal heads of HD = D / H features each,
    merged and projected by w_o (or a dict of the steps "q_heads" [H, T, HD], "scores", "probs",
    "context" [T, D] (the heads side by side), "out")."""
    exercise = "several heads"
    args = toy_heads_inputs()
    out, failed = call(exercise, fn, *args)
    if failed:
        return failed
    x, w_q, _, _, _, H = args
    T, D = x.shape
    expected = heads_steps(*args)
    ref = dict(expected)
    probs_v = ref["probs"] @ (x.astype(np.float64) @ args[3].astype(np.float64)).reshape(T, H, D // H).transpose(1, 0, 2)
    hints = {
        "q_heads": lambda mine, r: recognise(mine, {
            "you reshaped [T, H·HD] straight to [H, T, HD]: that cuts the rows of positions into heads. "
            "Head h owns the features h·HD … (h+1)·HD - 1 of every position: reshape to [T, H, HD], then "
            "transpose to [H, T, HD]": (x.astype(np.float64) @ w_q).reshape(H, T, D // H)}),
        "context": lambda mine, r: recognise(mine, {
            "you reshaped [H, T, HD] straight to [T, D]: transpose to [T, H, HD] first, so that each "
            "position gets its H heads side by side": probs_v.reshape(T, D)}),
    }
    return compare_steps(exercise, expected, out, hints=hints)
