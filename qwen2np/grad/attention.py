"""The backward pass of grouped-query self-attention with RoPE, beside its forward (qwen2np/model/attention.py).

`attention_forward` is the model's `self_attention` (the same functions, called in the same order, so
the same bits) keeping what the backward needs; `attention_backward` runs it backwards:

    o_proj  ->  context  ->  probs, v  ->  scores (softmax)  ->  q_rope, k_rope  ->  RoPE  ->  q, k, v projections

Shapes: B batch, T positions, S key positions (= T: no cache when training), D hidden size, H query heads,
KV key/value heads, G = H // KV, HD head dim.

>>> import numpy as np
>>> from qwen2np.model.rope import apply_rope
>>> x = np.array([[[1.0, 2.0, 3.0, 4.0]]])                  # [B, H, T, HD] = [1, 1, 1, 4]
>>> cos, sin = np.full((1, 1, 4), 0.6), np.full((1, 1, 4), 0.8)
>>> y = apply_rope(x, cos, sin)                             # a rotation: lengths are kept
>>> d_x = rope_backward(y, cos, sin)                        # the inverse rotation, for L = |y|² / 2
>>> np.allclose(d_x, x)
True
"""

from dataclasses import dataclass

import numpy as np

from ..inspection.tracing import tap
from ..model.attention import grouped_query_attention, queries_keys_values
from ..model.layers import linear
from ..model.rope import rotate_half
from .layers import linear_backward, softmax_backward


@dataclass
class AttentionSaved:
    """What the attention backward needs of its forward."""

    x: object          # [B, T, D]     the normalised input of q, k and v
    q: object          # [B, H, T, HD]  queries after RoPE
    k: object          # [B, KV, S, HD] keys after RoPE
    v: object          # [B, KV, S, HD]
    probs: object      # [B, H, T, S]
    context: object    # [B, T, H*HD]  the input of o_proj


def attention_forward(x, w, cos, sin, mask, config, scope):
    """self_attention (qwen2np/model/attention.py) without a cache, keeping what the backward needs.

    x [B, T, D] -> [B, T, D], AttentionSaved. `w` maps the names under `…self_attn.` to arrays."""
    B, T, _ = x.shape
    H, HD = config.num_attention_heads, config.head_dim
    q, k, v = queries_keys_values(x, w, cos, sin, config, scope)   # [B, H, T, HD], [B, KV, T, HD] ×2
    context, probs = grouped_query_attention(q, k, v, mask.bias, HD ** -0.5, scope)   # probs [B, H, T, S]
    context = tap(scope, "context", context.transpose(0, 2, 1, 3).reshape(B, T, H * HD))
    out = tap(scope, "o_proj", linear(context, w["o_proj.weight"]))                   # -> [B, T, D]
    return out, AttentionSaved(x, q, k, v, probs, context)


def rope_backward(d_y, cos, sin):
    """Backward of y = x ⊙ cos + rotate_half(x) ⊙ sin.  d_y [B, n_heads, T, HD], cos/sin [B, T, HD] -> d_x

    rotate_half is the linear map R: (x1, x2) -> (-x2, x1); its transpose is Rᵀ: (u1, u2) -> (u2, -u1),
    which is −R. So d_x = d_y ⊙ cos + Rᵀ(d_y ⊙ sin) = d_y ⊙ cos − rotate_half(d_y ⊙ sin): the rotation
    by the opposite angle.
    """
    cos, sin = cos[:, None], sin[:, None]            # [B, 1, T, HD]: the same angles for every head
    return d_y * cos - rotate_half(d_y * sin)


def attention_core_backward(d_context, s, scaling, scope):
    """Backward of context = softmax(q kᵀ · scaling + mask) v, grouped.

    d_context [B, H, T, HD] -> d_q [B, H, T, HD], d_k and d_v [B, KV, S, HD].

    subtle: query head h reads KV head h // G, so the gradient of a KV head is the sum over its G query
    heads. Stacking those G heads as rows of one matrix (as the forward does) makes the products below
    do that sum: d_v = pᵀ d_context and d_k = d_sᵀ q run over all G·T rows at once.
    """
    B, H, T, HD = s.q.shape
    KV, S = s.k.shape[1], s.k.shape[2]
    G = H // KV
    dc = d_context.reshape(B, KV, G * T, HD)                      # [B, H, T, HD] -> [B, KV, G*T, HD]
    p = s.probs.reshape(B, KV, G * T, S)                          # [B, KV, G*T, S]
    qg = s.q.reshape(B, KV, G * T, HD)                            # [B, KV, G*T, HD]
    d_p = dc @ s.v.swapaxes(-1, -2)                               # [B, KV, G*T, HD] @ [B, KV, HD, S] -> [B, KV, G*T, S]
    d_p = tap(scope, "probs.grad", d_p.reshape(B, H, T, S)).reshape(B, KV, G * T, S)
    d_v = p.swapaxes(-1, -2) @ dc                                 # [B, KV, S, G*T] @ [B, KV, G*T, HD] -> [B, KV, S, HD]
    # the mask is a constant added to the scores: the scores' gradient is that of scores + mask
    d_s = softmax_backward(d_p, p)                                # [B, KV, G*T, S]
    d_s = tap(scope, "scores.grad", d_s.reshape(B, H, T, S)).reshape(B, KV, G * T, S)
    d_q = (d_s @ s.k) * d_s.dtype.type(scaling)                   # [B, KV, G*T, S] @ [B, KV, S, HD] -> [B, KV, G*T, HD]
    d_k = (d_s.swapaxes(-1, -2) @ qg) * d_s.dtype.type(scaling)   # [B, KV, S, G*T] @ [B, KV, G*T, HD] -> [B, KV, S, HD]
    return d_q.reshape(B, H, T, HD), d_k, d_v


def attention_backward(d_out, s, w, cos, sin, config, scope, need):
    """The attention half of a decoder layer, backwards.  d_out [B, T, D] -> d_x [B, T, D], and
    {name under `…self_attn.`: gradient} for the weights `need(name)` asks for."""
    B, T, D = d_out.shape
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    grads = {}
    d_out = tap(scope, "o_proj.grad", d_out)
    d_context, grads["o_proj.weight"], _ = linear_backward(d_out, s.context, w["o_proj.weight"],
                                                           need_weight=need("o_proj.weight"))   # -> [B, T, H*HD]
    d_context = tap(scope, "context.grad", d_context)
    d_context = d_context.reshape(B, T, H, HD).transpose(0, 2, 1, 3)          # -> [B, H, T, HD]
    d_q, d_k, d_v = attention_core_backward(d_context, s, HD ** -0.5, scope)
    d_q = tap(scope, "q_rope.grad", d_q)                                       # [B, H, T, HD]
    d_k = tap(scope, "k_rope.grad", d_k)                                       # [B, KV, S, HD]
    d_q = rope_backward(d_q, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, H * HD)    # -> [B, T, H*HD]
    d_k = rope_backward(d_k, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, KV * HD)   # -> [B, T, KV*HD]
    d_v = d_v.transpose(0, 2, 1, 3).reshape(B, T, KV * HD)                     # -> [B, T, KV*HD]
    d_x = np.zeros_like(s.x)
    for name, d_y in (("q_proj", d_q), ("k_proj", d_k), ("v_proj", d_v)):     # x feeds all three: sum
        d_y = tap(scope, f"{name}.grad", d_y)
        d_part, grads[f"{name}.weight"], grads[f"{name}.bias"] = linear_backward(
            d_y, s.x, w[f"{name}.weight"], bias=need(f"{name}.bias"), need_weight=need(f"{name}.weight"))
        d_x += d_part                                                          # [B, T, D]
    return d_x, {n: g for n, g in grads.items() if g is not None}
