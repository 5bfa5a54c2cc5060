"""Grouped-query self-attention with q/k/v biases, as in transformers 5.24's eager Qwen2Attention.

Shapes: B batch, T new positions, S key positions (past + new), D hidden size, H query heads,
KV key/value heads, G = H // KV query heads per KV head, HD head dim.

In reading order: `self_attention` (projections, RoPE, the cache, o_proj), `grouped_query_attention`
(softmax(q kᵀ · scaling + bias) v), and beside them what only some calls need: `attend_in_blocks` for
long prompts, `head_outputs` for a trace that asks for each head's share of o_proj.
"""

import math

import numpy as np

from ..inspection.tracing import active as tracing_active
from ..inspection.tracing import listens, tap
from ..weights.backend import array_module
from ..weights.plan import SCORES_BUDGET_BYTES
from .layers import accumulation_dtype, linear, softmax
from .rope import apply_rope

# Outside a trace, and when nobody asked for the [B, H, T, S] probabilities, a long forward pass is
# attended over in blocks of query rows: so that a 32k-token prompt does not need 57 GB of scores at once
# (SCORES_BUDGET_BYTES, set by the memory plan), and, when the mask is purely causal, so that each block
# reads only the keys it may see, skipping the hidden triangle (BLOCK_ROWS rows at a time).
BLOCK_ROWS = 64


def self_attention(x, w, cos, sin, mask, cache_layer, config, scope=None, need_probs=True):
    """The attention half of a decoder layer.  x [B, T, D] -> [B, T, D], probs [B, H, T, S] (or None
    when not `need_probs` and the prompt was long enough to be attended over in blocks)

    `w` maps the checkpoint's names under `…self_attn.` (q_proj.weight, q_proj.bias, …) to arrays;
    cos, sin [B or 1, T, HD] are the rotation tables; `mask` is a masks.AttentionMask (the additive bias
    [B, 1, T, S], and its causal span if any); `cache_layer` (a cache.CacheLayer, or None) keeps the
    rotated keys and the values of past positions.
    """
    B, T, _ = x.shape
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = tap(scope, "q_proj", linear(x, w["q_proj.weight"], w["q_proj.bias"]))   # [B, T, D] -> [B, T, H*HD]
    k = tap(scope, "k_proj", linear(x, w["k_proj.weight"], w["k_proj.bias"]))   # [B, T, D] -> [B, T, KV*HD]
    v = tap(scope, "v_proj", linear(x, w["v_proj.weight"], w["v_proj.bias"]))   # [B, T, D] -> [B, T, KV*HD]
    # subtle: heads are contiguous slices of the projection: head h owns features h*HD:(h+1)*HD
    q = q.reshape(B, T, H, HD).transpose(0, 2, 1, 3)      # -> [B, H, T, HD]
    k = k.reshape(B, T, KV, HD).transpose(0, 2, 1, 3)     # -> [B, KV, T, HD]
    v = v.reshape(B, T, KV, HD).transpose(0, 2, 1, 3)     # -> [B, KV, T, HD]
    q = tap(scope, "q_rope", apply_rope(q, cos, sin))     # [B, H, T, HD]
    k = tap(scope, "k_rope", apply_rope(k, cos, sin))     # [B, KV, T, HD]
    if cache_layer is not None:  # the cache stores keys after RoPE
        k, v = cache_layer.update(k, v)                   # -> [B, KV, S, HD]
    context, probs = grouped_query_attention(q, k, v, mask.bias, HD ** -0.5, scope, need_probs, mask.span)
    context = context.transpose(0, 2, 1, 3).reshape(B, T, H * HD)   # [B, H, T, HD] -> [B, T, H*HD]
    context = tap(scope, "context", context)
    out = linear(context, w["o_proj.weight"])                        # [B, T, H*HD] -> [B, T, D]
    if listens(scope, "head_out"):   # only under a trace that asks for it: H times the work of o_proj
        out = head_outputs(context, w["o_proj.weight"], out, H, scope)
    return tap(scope, "o_proj", out), probs                          # [B, T, D]


def grouped_query_attention(q, k, v, bias, scaling, scope=None, need_probs=True, span=None):
    """softmax(q kᵀ · scaling + bias) v, each KV head serving G consecutive query heads.

    q [B, H, T, HD], k and v [B, KV, S, HD], bias [B, 1, T, S] -> context [B, H, T, HD], probs [B, H, T, S]
    (None when a long pass went in blocks: `attend_in_blocks`). `span` (a masks.CausalSpan, or None) says
    the mask is causal with no padding, so that blocks of rows can skip the keys they may not see.

    >>> import numpy as np
    >>> q = np.ones((1, 2, 1, 2), dtype=np.float32); k = np.zeros((1, 1, 3, 2), dtype=np.float32)
    >>> v = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2); bias = np.zeros((1, 1, 1, 3), dtype=np.float32)
    >>> context, probs = grouped_query_attention(q, k, v, bias, scaling=1.0)
    >>> context[0, :, 0].tolist()    # equal scores: both heads average the 3 values of the one KV head
    [[2.0, 3.0], [2.0, 3.0]]
    """
    rows = rows_per_block(q, k, span)
    if q.shape[2] > rows and not need_probs and not tracing_active():
        return attend_in_blocks(q, k, v, bias, scaling, rows, span), None
    B, H, T, HD = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    # subtle: query head h reads KV head h // G (repeat-interleave, not tile). Stacking the G query heads
    # of one KV head as rows of one matrix reads each K and V once and copies neither (transformers'
    # repeat_kv materialises G copies).
    qg = q.reshape(B, KV, G * T, HD)                              # [B, H, T, HD] -> [B, KV, G*T, HD]
    if math.frexp(scaling)[0] == 0.5:
        # a power of two (HD = 16, 64, 256) scales exactly, so scaling q (T·HD numbers) instead of the
        # scores (T·S numbers) gives bitwise the same scores as transformers' (q kᵀ) · scaling
        scores = _product(qg * qg.dtype.type(scaling), k.swapaxes(-1, -2))   # -> [B, KV, G*T, S]
    else:
        scores = _product(qg, k.swapaxes(-1, -2))                 # -> [B, KV, G*T, S]
        if scores.dtype.itemsize < 4:   # subtle: torch rounds the product, then scales in float32 and rounds
            scores = (scores.astype(np.float32) * np.float32(scaling)).astype(q.dtype)
        else:
            scores *= scaling                                     # after the product, as transformers
    scores = tap(scope, "scores", scores.reshape(B, H, T, S))     # -> [B, H, T, S]
    bias = tap(scope, "mask", bias)                               # [B, 1, T, S]: 0 or finfo.min
    scores += bias                                                # in place: this buffer becomes probs
    if scores.dtype.itemsize < 4:   # softmax in float32, rounded once (transformers' softmax(dtype=float32))
        probs = softmax(scores.astype(np.float32)).astype(q.dtype)
    else:
        probs = softmax(scores, out=scores)
    probs = tap(scope, "probs", probs)                            # [B, H, T, S]
    context = _product(probs.reshape(B, KV, G * T, S), v)         # -> [B, KV, G*T, HD]
    return context.reshape(B, H, T, HD), probs


def rows_per_block(q, k, span=None):
    """Query rows per block: as many as keep the scores within SCORES_BUDGET_BYTES, and at most BLOCK_ROWS
    when a causal `span` lets each block skip the keys it may not see."""
    B, H, _, _ = q.shape
    S = k.shape[2]
    rows = max(1, SCORES_BUDGET_BYTES // (B * H * S * q.dtype.itemsize))
    return min(rows, BLOCK_ROWS) if span is not None else rows


def attend_in_blocks(q, k, v, bias, scaling, rows, span=None):
    """grouped_query_attention's context, `rows` query rows at a time: q [B, H, T, HD] -> [B, H, T, HD].

    Each block attends over the keys its rows may see (`span.keys`; all S without a span). Blocks change
    no row's result beyond float rounding: a hidden key's probability is exactly 0 either way.
    """
    T, S = q.shape[2], k.shape[2]
    context = array_module(q).empty_like(q)                       # [B, H, T, HD]
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        k0, k1 = span.keys(r0, r1) if span is not None else (0, S)
        context[:, :, r0:r1] = grouped_query_attention(q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                       bias[:, :, r0:r1, k0:k1], scaling)[0]
    return context


def head_outputs(context, o_proj, out, num_heads, scope):
    """Each head's share of o_proj, traced as `head_out` [B, H, T, D]; returns the attention output [B, T, D]:
    `out` as it was, unless an edit replaced head_out.

    Head h's share is its HD features of context through its HD input columns of o_proj. Row h of `alone`
    keeps head h's features and zeros elsewhere, so that the product is linear() on the weight as the model
    holds it; the zeros add exactly nothing.
    """
    B, T, _ = context.shape
    H = num_heads
    HD = context.shape[-1] // H
    alone = array_module(context).zeros((B, H, T, H * HD), dtype=context.dtype)   # [B, H, T, H*HD]
    for h in range(H):
        alone[:, h, :, h * HD:(h + 1) * HD] = context[:, :, h * HD:(h + 1) * HD]
    head_out = linear(alone, o_proj)                                  # -> [B, H, T, D]
    edited = tap(scope, "head_out", head_out)
    if edited is head_out:
        return out
    # subtle: an edit of head_out replaces the attention output: o_proj becomes the sum over heads of what
    # the edit returned. Recording alone (or an edit that returns its argument) changes nothing: o_proj
    # stays the product of self_attention, bit for bit (docs/intermediates.md)
    acc = accumulation_dtype(edited.dtype)                            # half precision: summed in float32
    return edited.astype(acc, copy=False).sum(axis=1).astype(edited.dtype)   # [B, H, T, D] -> [B, T, D]


def _product(a, b):
    """a @ b; half-precision operands are widened exactly to float32, multiplied, and the result rounded
    once, as torch's CPU matmul does for bfloat16 and float16."""
    acc = accumulation_dtype(a.dtype)
    if acc == a.dtype:
        return a @ b
    return (a.astype(acc) @ b.astype(acc)).astype(a.dtype)
