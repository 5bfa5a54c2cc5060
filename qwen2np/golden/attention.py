"""Attention recomputed from a dump: RoPE, masks, scores, softmax, context, and the fused kernel's whole.

Part of the golden tools' second implementation of the forward pass (recipes.py holds the table of
operations; this file the attention's): plain NumPy in float64, sharing no code with qwen2np/model, so
that a bug in the model's RoPE or masks cannot hide in the check that judges them. Each function takes a
recipes.Context (the config, where the pass sits, how the port rounds) and the dump's tensors.

Where a half-precision port may round in more than one legitimate order (orders.py lists the families),
the function asks `ctx.order(family)`; transformers' order is the default. The keyword arguments that
change the math (`kv_index`, `scale`, `rotate`, `merge`) are the correct ones by default; catalogue.py
replays known porting mistakes through them.

Shapes in the legend of docs/dimensions.md (`S`: the keys a query attends over).

>>> import numpy as np
>>> additive_mask(batch=1, q_start=0, T=3, S=3, attention_mask=None, window=2)[0, 0] == 0
array([[ True, False, False],
       [ True,  True, False],
       [False,  True,  True]])
>>> repeat_heads(4, 2).tolist(), tile_heads(4, 2).tolist()     # the KV head of each query head
([0, 0, 1, 1], [0, 1, 0, 1])
"""

import numpy as np

from ..errors import Qwen2npError
from .rotary import rotary_tables

MASKED = np.finfo(np.float64).min


class NotIsolated(Qwen2npError):
    """An operation that cannot be recomputed from the dump: an input it needs is not recorded, or the
    config asks for what qwen2np does not recompute."""


# -- RoPE: half-split rotation ------------------------------------------------------------------------


def rotary(ctx):
    """cos, sin [1, T, HD] at the pass's positions, from the config, in float64, rounded to the dump's dtype
    unless the port keeps its tables in float32 (order "rope_tables")."""
    cos, sin = rotary_tables(ctx.config, ctx.positions[None], np.float64)
    if ctx.order("rope_tables") == "float32":
        return cos, sin
    return ctx.r(cos), ctx.r(sin)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the head dimension."""
    half = x.shape[-1] // 2
    # subtle: the halves turn, not interleaved pairs (2i, 2i+1) (docs/numerics.md)
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def split_heads(x, heads):
    """[B, T, heads·HD] -> [B, heads, T, HD]"""
    B, T, _ = x.shape
    return x.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)


def rope(ctx, x, heads, cos=None, sin=None, rotate=rotate_half):
    """Split heads and rotate them, with the dump's tables or the config's.  [B, T, heads·HD] -> [B, heads, T, HD]"""
    x = split_heads(x, heads)
    if cos is None:
        cos, sin = rotary(ctx)
    return rotate_with(ctx, x, cos, sin, rotate)


def rotate_with(ctx, x, cos, sin, rotate=rotate_half):
    """x·cos + rotate(x)·sin, rounded as the port rounds (order "rope").  x [B, heads, T, HD], tables [B|1, T, HD]"""
    cos, sin = cos[:, None], sin[:, None]                               # [B or 1, 1, T, HD]
    if ctx.order("rope") == "one":
        return ctx.r(x * cos + rotate(x) * sin)
    return ctx.r(ctx.r(x * cos) + ctx.r(rotate(x) * sin))


def q_rope(ctx, q, cos=None, sin=None):
    return rope(ctx, q, ctx.config.num_attention_heads, cos, sin)


def k_rope(ctx, k, cos=None, sin=None):
    return rope(ctx, k, ctx.config.num_key_value_heads, cos, sin)


# -- masks --------------------------------------------------------------------------------------------


def additive_mask(batch, q_start, T, S, attention_mask, window, queries=None):
    """0 where a query may see a key, MASKED (finfo(float64).min) where not: causal, padding, sliding window.
    The T queries are sequence indices q_start … (or `queries`); the S keys the last S indices seen.
    -> [B, 1, T, S]"""
    q = np.arange(q_start, q_start + T, dtype=np.int64) if queries is None else np.asarray(queries, np.int64)
    seen = int(q.max()) + 1 if queries is not None else q_start + T
    kv_start = seen - S
    k = np.arange(kv_start, seen, dtype=np.int64)[None, :]            # [1, S]
    q = q[:, None]                                                     # [T, 1]
    allowed = k <= q
    if window is not None:
        # subtle: W keys including the query itself, as transformers 5.24 (docs/sliding-window.md)
        allowed = allowed & (k > q - window)
    if attention_mask is not None:
        keep = attention_mask[:, :seen][:, kv_start:seen].astype(bool)                 # [B, S]
        allowed = allowed[None, None] & keep[:, None, None, :]                         # -> [B, 1, T, S]
    allowed = np.broadcast_to(allowed, (batch, 1, len(q), S))
    # subtle: finfo.min, not -inf: a query with no allowed key (left padding) gets a uniform softmax
    return np.where(allowed, 0.0, MASKED)


def layer_mask(ctx, B, T, S, window="config"):
    """The additive mask of the operation's layer at this pass ([B, 1, T, S]); `window` another sliding window."""
    if window == "config":
        sliding = ctx.config.layer_types[ctx.layer] == "sliding_attention"
        window = ctx.config.sliding_window if sliding else None
    return additive_mask(B, ctx.start, T, S, ctx.attention_mask, window,
                         queries=None if ctx.whole else ctx.positions)


def mask(ctx):
    B, _, T, S = ctx.shape
    return layer_mask(ctx, B, T, S)


def allowed_keys(ctx, B, T, S, recorded_mask=None):
    """Boolean [B, 1, T, S]: the port's own mask as a pattern when recorded (0 = allowed), else the layer's."""
    if recorded_mask is None:
        return layer_mask(ctx, B, T, S) == 0
    allowed = recorded_mask == 0
    if allowed.shape[-1] < S:   # a cache that keeps fewer keys (a sliding layer): the older ones hidden
        hidden = np.zeros((*allowed.shape[:-1], S - allowed.shape[-1]), dtype=bool)
        allowed = np.concatenate([hidden, allowed], axis=-1)
    return np.broadcast_to(allowed, (B, 1, T, S))


# -- scores, softmax, context -------------------------------------------------------------------------


def repeat_heads(H, KV):
    """The KV head each query head reads: h // G (repeat-interleave, transformers' repeat_kv)."""
    return np.arange(H) // (H // KV)


def tile_heads(H, KV):
    """h % KV: what np.tile makes (a porting mistake, catalogue.py)."""
    return np.arange(H) % KV


def last_positions(x, S, what):
    """The last S positions (axis 2) of the cached keys or values `x` [B, KV, past+T, HD]."""
    if x.shape[2] < S:
        raise NotIsolated(f"needs {S} cached positions of {what}, A records {x.shape[2]}")
    return x[:, :, x.shape[2] - S:]


def per_query_head(x, kv_index):
    """[B, KV, S, HD] -> [B, H, S, HD]: the KV head each query head reads."""
    return x[:, kv_index]


def scores(ctx, q, keys, scale=None, kv_index=None, S=None):
    """q [B, H, T, HD], keys [B, KV, past+T, HD] -> [B, H, T, S], rounded as the port rounds (order "scores")."""
    S = ctx.shape[-1] if S is None else S
    scale = ctx.config.head_dim ** -0.5 if scale is None else scale
    product, finish = score_product(ctx, q, keys_per_head(ctx, keys, S, kv_index), scale)
    return finish(ctx.r(product))


def score_product(ctx, q, k, scale):
    """The scores before their first rounding, and what follows it (order "scores"): q [B, H, T, HD], k
    [B, H, S, HD] -> ([B, H, T, S], finish), the scores being finish(ctx.r(product))."""
    order = ctx.order("scores")
    if order == "queries":          # the queries scaled first (mlx's attention, keras-hub)
        return ctx.r(q * scale) @ k.swapaxes(-1, -2), _same
    if order == "once":             # one rounding of the scaled product
        return (q @ k.swapaxes(-1, -2)) * scale, _same
    return q @ k.swapaxes(-1, -2), lambda s: ctx.r(s * scale)


def _same(x):
    return x


def softmax(ctx, x):
    """softmax over the keys, rounded as the port rounds (order "softmax": float32, or in half precision)."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        if ctx.order("softmax") == "half":
            e = ctx.r(e)
            return ctx.r(e / ctx.r(e.sum(axis=-1, keepdims=True)))
        return ctx.r(e / e.sum(axis=-1, keepdims=True))


def probs(ctx, s, recorded_mask=None):
    """softmax(scores + mask), with the port's own mask as a pattern when recorded.  [B, H, T, S]"""
    B, _, T, S = ctx.shape
    return softmax(ctx, s + np.where(allowed_keys(ctx, B, T, S, recorded_mask), 0.0, MASKED))


def keys_per_head(ctx, keys, S, kv_index=None):
    """keys [B, KV, past+T, HD] -> the last S positions of the KV head each query head reads [B, H, S, HD]"""
    H, KV = ctx.config.num_attention_heads, ctx.config.num_key_value_heads
    k = last_positions(keys, S, f"{ctx.scope}.self_attn.k_rope")
    return per_query_head(k, repeat_heads(H, KV) if kv_index is None else kv_index)


def values_per_head(ctx, values, S, kv_index=None):
    """values [B, past+T, KV·HD] -> the last S positions of the KV head each query head reads [B, H, S, HD]"""
    H, KV = ctx.config.num_attention_heads, ctx.config.num_key_value_heads
    v = split_heads(values, KV)                                                   # [B, KV, past+T, HD]
    v = last_positions(v, S, f"{ctx.scope}.self_attn.v_proj")
    return per_query_head(v, repeat_heads(H, KV) if kv_index is None else kv_index)


def merge_heads(c, merge="heads-first"):
    """[B, H, T, HD] -> [B, T, H·HD], head h at features h·HD … (or, as a mistake, "dims-first": (HD, H))"""
    B, H, T, HD = c.shape
    if merge == "dims-first":
        return c.transpose(0, 2, 3, 1).reshape(B, T, H * HD)
    return c.transpose(0, 2, 1, 3).reshape(B, T, H * HD)


def context(ctx, p, values, kv_index=None, merge="heads-first"):
    """probs [B, H, T, S], values [B, past+T, KV·HD] -> heads merged [B, T, H·HD]"""
    v = values_per_head(ctx, values, p.shape[-1], kv_index)                        # [B, H, S, HD]
    return merge_heads(ctx.r(p @ v), merge)


def fused_context(ctx, q, keys, values, recorded_mask=None, scale=None, kv_index=None, mask_fill=MASKED,
                  window="config", S=None):
    """The attention of a fused kernel (scaled_dot_product_attention, mlx.fast, flash): q [B, H, T, HD], keys
    [B, KV, past+T, HD], values [B, past+T, KV·HD] -> [B, T, H·HD], over every key seen so far, the port's mask
    (recorded) or the layer's. Rounded as the port rounds (order "attention"): once at the output (a kernel
    that accumulates in float32), or as transformers' eager attention, or with the queries scaled first, or
    with only the probabilities rounded (JAX)."""
    B, H, T, HD = q.shape
    if S is None:   # every key seen so far (a sliding layer's window is in the mask)
        S = ctx.start + ctx.length if ctx.whole else int(ctx.positions.max()) + 1
    order = ctx.order("attention")
    ordered = {"eager": "product", "queries": "queries"}.get(order, None)
    inside = _Ordered(ctx, scores=ordered, softmax="float32") if ordered else _Exact(ctx)
    if recorded_mask is None and window != "config":
        allowed = layer_mask(ctx, B, T, S, window) == 0
    else:
        allowed = allowed_keys(ctx, B, T, S, recorded_mask)
    k = keys_per_head(ctx, keys, S, kv_index)                                     # [B, H, S, HD]
    v = values_per_head(ctx, values, S, kv_index)                                 # [B, H, S, HD]
    product, finish = score_product(inside, q, k, HD ** -0.5 if scale is None else scale)

    def attend(s, allowed, v):      # scores [..., S], allowed keys [..., S], values [..., S, HD] -> [..., HD]
        with np.errstate(invalid="ignore"):
            p = softmax(_Ordered(ctx, softmax="float32") if ordered else _Exact(ctx),
                        s + np.where(allowed, 0.0, mask_fill))
        if ordered:                 # the probabilities rounded, then the product by V
            return ctx.r(p @ v)
        if order == "probs":        # JAX: float32 inside, the probabilities rounded to the values' dtype
            return ctx.r(ctx.r(p) @ v)
        return p @ v                # one rounding, at the output

    c = attend(finish(inside.r(product)), allowed, v)                            # [B, H, T, HD]
    if ordered and ctx.observed is not None:
        c = settle_ties(ctx, product, finish, allowed, v, c, attend)
    return merge_heads(c) if ordered or order == "probs" else ctx.r(merge_heads(c))


# a score within this share of a unit in the last place of a rounding midpoint may round either way in a
# port: a float32 dot product of HD terms summed in another order moves it by up to ~1e-3 units (bfloat16)
TIE = 0.01


def settle_ties(ctx, product, finish, allowed, v, c, attend):
    """The context c [B, H, T, HD] with each row that differs from the port's (ctx.observed) recomputed with
    one score that lay on a rounding tie rounded the other way, where that makes the row the port's.

    subtle: a half-precision score within 1e-5 of a unit in the last place from a midpoint rounds up in one
    float32 sum and down in another; at a score of 52 a bfloat16 unit is 0.25, exp(0.25) moves that key's
    probability by 28 %, and the row of the context by up to 16 units. Each is a legitimate result, so
    the port's row is matched against both. Only rows that differ are searched, one tie at a time."""
    B, H, T, HD = c.shape
    observed = ctx.observed.reshape(B, T, H, HD).transpose(0, 2, 1, 3)          # [B, H, T, HD]
    rounded = ctx.r(product)
    other = ctx.r(2 * product - rounded)       # the neighbour on the other side of the midpoint
    gap = np.abs(other - rounded)
    with np.errstate(invalid="ignore", divide="ignore"):
        tie = (gap > 0) & (np.abs(np.abs(product - rounded) / gap - 0.5) < TIE)
    c = c.copy()
    rows = (c != observed).any(axis=-1) & tie.any(axis=-1)                      # [B, H, T]
    for b, h, t in zip(*np.nonzero(rows)):
        best = np.count_nonzero(c[b, h, t] != observed[b, h, t])
        for j in np.flatnonzero(tie[b, h, t]):
            s = rounded[b, h, t].copy()
            s[j] = other[b, h, t, j]
            row = attend(finish(s), allowed[b, 0, t], v[b, h])
            off = np.count_nonzero(row != observed[b, h, t])
            if off < best:
                best, c[b, h, t] = off, row
    return c


class _Exact:
    """ctx without rounding: the inside of a fused kernel, which rounds only its output."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def r(self, x):
        return x

    def order(self, family):
        return self._ctx.order(family) if family not in ("scores", "softmax") else "exact"


class _Ordered:
    """ctx with some families' orders fixed (the eager steps inside the "attention" family)."""

    def __init__(self, ctx, **orders):
        self._ctx, self._orders = ctx, orders

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def order(self, family):
        return self._orders.get(family) or self._ctx.order(family)


def head_out(ctx, c, w_o):
    """Each head's share of o_proj.  context [B, T, H·HD] -> [B, H, T, D]"""
    B, T, _ = c.shape
    H, HD = ctx.config.num_attention_heads, ctx.config.head_dim
    wo = ctx.weight(w_o).reshape(-1, H, HD).transpose(1, 2, 0)                  # [D, H, HD] -> [H, HD, D]
    return ctx.r(c.reshape(B, T, H, HD).transpose(0, 2, 1, 3) @ wo[None])      # [B, H, T, HD] @ [1, H, HD, D]
