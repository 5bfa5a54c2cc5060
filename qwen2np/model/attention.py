"""Grouped-query self-attention with q/k/v biases, as in transformers 5.24's eager Qwen2Attention.

Shapes: B batch, T new positions, S key positions (past + new), D hidden size, H query heads,
KV key/value heads, G = H // KV query heads per KV head, HD head dim.

In reading order: `self_attention` (projections, RoPE, the cache, o_proj), `grouped_query_attention`
(whole or in blocks), `attend` (softmax(q kᵀ · scaling + bias) v), and beside them what only some calls
need: `attend_in_blocks` for long prompts, `head_outputs` for a trace that asks for each head's share of
o_proj.
"""

import math

import numpy as np

from ..inspection.tracing import listens, recorded_rows, tap
from ..weights.backend import array_module
from ..weights.plan import BLOCK_ROWS, SCORES_BUDGET_BYTES
from .layers import accumulation_dtype, linear, softmax
from .masks import AttentionMask
from .rope import apply_rope

# When nobody asked for the [B, H, T, S] probabilities, a long forward pass is attended over in blocks of
# query rows: so that a 32k-token prompt does not need 57 GB of scores at once (SCORES_BUDGET_BYTES, set
# by the memory plan), and, when the mask is purely causal, so that each block reads only the keys it may
# see, skipping the hidden triangle (BLOCK_ROWS rows at a time). A trace that keeps some positions gets
# those rows' scores, mask and probabilities (ATTENTION_MAPS), and the blocks go on for the rest.
ATTENTION_MAPS = ("scores", "mask", "probs")


def self_attention(x, w, cos, sin, mask, cache_layer, config, scope=None, need_probs=True):
    """The attention half of a decoder layer.  x [B, T, D] -> [B, T, D], probs [B, H, T, S] (or None
    when not `need_probs` and the prompt was long enough to be attended over in blocks)

    `w` maps the checkpoint's names under `…self_attn.` (q_proj.weight, q_proj.bias, …) to arrays;
    cos, sin [B or 1, T, HD] are the rotation tables; `mask` is a masks.AttentionMask (the additive bias
    [B, 1, T, S], made whole or a block at a time); `cache_layer` (a cache.CacheLayer, or None) keeps the
    rotated keys and the values of past positions.
    """
    B, T, _ = x.shape
    H, HD = config.num_attention_heads, config.head_dim
    q, k, v = queries_keys_values(x, w, cos, sin, config, scope)
    if cache_layer is not None:  # the cache stores keys after RoPE
        k, v = cache_layer.update(k, v)                   # -> [B, KV, S, HD]
    context, probs = grouped_query_attention(q, k, v, mask, HD ** -0.5, scope, need_probs)
    context = context.transpose(0, 2, 1, 3).reshape(B, T, H * HD)   # [B, H, T, HD] -> [B, T, H*HD]
    context = tap(scope, "context", context)
    out = linear(context, w["o_proj.weight"])                        # [B, T, H*HD] -> [B, T, D]
    if listens(scope, "head_out"):   # only under a trace that asks for it: H times the work of o_proj
        out = head_outputs(context, w["o_proj.weight"], out, H, scope)
    return tap(scope, "o_proj", out), probs                          # [B, T, D]


def queries_keys_values(x, w, cos, sin, config, scope=None):
    """x [B, T, D] projected to queries, keys and values, split into heads, q and k rotated by RoPE.
    -> q [B, H, T, HD], k [B, KV, T, HD], v [B, KV, T, HD]"""
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
    return q, k, v


def grouped_query_attention(q, k, v, mask, scaling, scope=None, need_probs=True):
    """softmax(q kᵀ · scaling + mask) v, each KV head serving G consecutive query heads.

    q [B, H, T, HD], k and v [B, KV, S, HD], `mask` a masks.AttentionMask (or the additive bias
    [B, 1, T, S] itself) -> context [B, H, T, HD], probs [B, H, T, S].

    A long pass whose probabilities nobody asked for (`need_probs`, or a trace that needs them whole)
    goes in blocks of query rows (`attend_in_blocks`) and returns None for them; the rows a trace keeps
    (`Trace.positions`) are then computed again over every key, traced, and their context kept.

    >>> import numpy as np
    >>> q = np.ones((1, 2, 1, 2), dtype=np.float32); k = np.zeros((1, 1, 3, 2), dtype=np.float32)
    >>> v = np.arange(6, dtype=np.float32).reshape(1, 1, 3, 2); bias = np.zeros((1, 1, 1, 3), dtype=np.float32)
    >>> context, probs = grouped_query_attention(q, k, v, bias, scaling=1.0)
    >>> context[0, :, 0].tolist()    # equal scores: both heads average the 3 values of the one KV head
    [[2.0, 3.0], [2.0, 3.0]]
    """
    if not isinstance(mask, AttentionMask):
        mask = AttentionMask.given(mask)
    T, S = q.shape[2], k.shape[2]
    rows = rows_per_block(q, k, mask.span)
    traced = recorded_rows(scope, ATTENTION_MAPS, T)      # None, every row, or the rows a trace keeps
    if need_probs or T <= rows or (traced is not None and len(traced) == T):
        return attend(q, k, v, mask.bias, hidden_rows(mask, q), scaling, scope)
    context = attend_in_blocks(q, k, v, mask, scaling, rows)
    if traced:
        # subtle: the kept rows once more, over all S keys, as a pass made whole computes them; their
        # context replaces the blocks' (equal but for float rounding), so the trace holds what the pass used
        kept = np.asarray(traced)
        context[:, :, kept] = attend(q[:, :, kept], k, v, mask.block(kept, 0, S), hidden_rows(mask, q, kept),
                                     scaling, scope, rows=traced)[0]
    return context, None


def attend(q, k, v, bias, hidden, scaling, scope=None, rows=None):
    """softmax(q kᵀ · scaling + bias) v, whole: q [B, H, n, HD], k and v [B, KV, S, HD], bias [B, 1, n, S]
    -> context [B, H, n, HD], probs [B, H, n, S]. `hidden` [B, n] (or None) marks rows that see no key.
    The scores, mask and probabilities are traced under `scope` (none for a block of a long pass), `rows`
    saying which query rows of the pass q holds (None: all)."""
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
    scores = scores.reshape(B, H, T, S)                           # -> [B, H, T, S]
    if scope is not None:                                         # not a block of a long pass: traced
        scores = tap(scope, "scores", scores, rows)
        bias = tap(scope, "mask", bias, rows)                     # [B, 1, T, S]: 0 or finfo.min
    if scores.dtype.itemsize < 4:
        # softmax in float32, rounded once (transformers' softmax(dtype=float32)). subtle: the mask is
        # added in float32 too, as torch's sdpa kernel adds it: eager's float16 sum overflows (a score
        # below -16 plus finfo.min is -inf) and turns a row that sees no key into NaN, which then reaches
        # every real position through the padding's keys. Where eager's sum is finite, this is its result.
        probs = scores.astype(np.float32)
        probs += bias
        probs = softmax(probs, out=probs)
        if hidden is not None and hidden.any():
            # subtle: float16 gives what transformers' default attention (sdpa) gives a row that sees no
            # key: zeros (docs/masks.md); bfloat16, like float32, keeps eager's uniform row
            probs.transpose(0, 2, 1, 3)[array_module(q).asarray(hidden)] = 0      # [B, T, H, S][hidden] = 0
        probs = probs.astype(q.dtype)
    else:
        scores += bias                                            # in place: this buffer becomes probs
        probs = softmax(scores, out=scores)
    if scope is not None:
        probs = tap(scope, "probs", probs, rows)                  # [B, H, T, S]
    context = _product(probs.reshape(B, KV, G * T, S), v)         # -> [B, KV, G*T, HD]
    return context.reshape(B, H, T, HD), probs


def hidden_rows(mask, q, rows=slice(None)):
    """The query rows that see no key [B, n], where it matters: in float16 (see `attend`); else None."""
    return mask.hidden_rows(rows) if q.dtype == np.float16 else None


def maps_traced_whole(scopes, num_rows):
    """Whether a trace needs the attention maps of one of the layers `scopes` (`…layers.3.self_attn`) whole,
    for a pass of `num_rows` query rows: attention is then computed whole (the memory check counts it)."""
    for scope in scopes:
        rows = recorded_rows(scope, ATTENTION_MAPS, num_rows)
        if rows is not None and len(rows) == num_rows:
            return True
    return False


def rows_per_block(q, k, span=None):
    """Query rows per block: as many as keep the scores within SCORES_BUDGET_BYTES, and at most BLOCK_ROWS
    when a causal `span` lets each block skip the keys it may not see."""
    B, H, _, _ = q.shape
    S = k.shape[2]
    rows = max(1, SCORES_BUDGET_BYTES // (B * H * S * q.dtype.itemsize))
    return min(rows, BLOCK_ROWS) if span is not None else rows


def attend_in_blocks(q, k, v, mask, scaling, rows):
    """grouped_query_attention's context, `rows` query rows at a time: q [B, H, T, HD] -> [B, H, T, HD].

    Each block attends over the keys its rows may see (`mask.span.keys`; all S without a span), with the
    block of the mask it needs (made for the block: the whole [T, S] mask is never made). Blocks change no
    row's result beyond float rounding: a hidden key's probability is exactly 0 either way.
    """
    T, S = q.shape[2], k.shape[2]
    context = array_module(q).empty_like(q)                       # [B, H, T, HD]
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        k0, k1 = mask.span.keys(r0, r1) if mask.span is not None else (0, S)
        block = slice(r0, r1)
        context[:, :, r0:r1] = attend(q[:, :, block], k[:, :, k0:k1], v[:, :, k0:k1], mask.block(block, k0, k1),
                                      hidden_rows(mask, q, block), scaling)[0]
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
