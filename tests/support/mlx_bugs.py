"""Porting mistakes planted in mlx-lm's Qwen2 (tests/golden/test_port_mlx.py): each a change of one module
of a loaded mlx-lm model, or a stand-in for its attention, undone on leaving the `with` block.

They are mistakes a porter makes: the wrong RoPE base (Llama's 10000 for Qwen2's 1e6), ε outside the
square root of an RMSNorm, a projection that forgets its bias, and query heads mapped to KV heads by
`h % KV` (tiling) instead of `h // G` (repeating).
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn


def _swap(parent, attr, new):
    stack = contextlib.ExitStack()
    stack.callback(setattr, parent, attr, getattr(parent, attr))
    setattr(parent, attr, new)
    return stack


def rope_theta(model, layer, theta=10000.0):
    """Layer `layer`'s RoPE with base θ (Llama's default) instead of the config's."""
    attn = model.model.layers[layer].self_attn
    return _swap(attn, "rope", nn.RoPE(attn.rope.dims, traditional=False, base=theta))


class EpsOutsideTheRoot(nn.Module):
    """RMSNorm computed as w · x / (sqrt(mean(x²)) + ε) instead of w · x / sqrt(mean(x²) + ε)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def __call__(self, x):
        h = x.astype(mx.float32)
        h = h / (mx.sqrt(mx.mean(h * h, axis=-1, keepdims=True)) + self.eps)
        return self.weight * h.astype(x.dtype)


def eps_outside_the_root(model, layer):
    block = model.model.layers[layer]
    return _swap(block, "input_layernorm", EpsOutsideTheRoot(block.input_layernorm))


class WithoutBias(nn.Module):
    """A Linear that holds its bias (the weights are intact) but forgets to add it."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def __call__(self, x):
        return x @ self.weight.T


def q_bias_forgotten(model, layer):
    attn = model.model.layers[layer].self_attn
    return _swap(attn, "q_proj", WithoutBias(attn.q_proj))


def gqa_tiled_in(layer, make_attention):
    """An attention for scripts/dump_mlx_lm.py's record_dump(attention=...): `make_attention(recorder,
    kv_of_head=...)` with query head h reading KV head h % KV in layer `layer` only."""
    scope = f"model.layers.{layer}.self_attn"

    def attention(recorder):
        return make_attention(recorder, kv_of_head=lambda s: "tile" if s == scope else "repeat")

    attention.__name__ = f"eager, GQA tiled in layer {layer}"
    return attention


def fused_gqa_tiled(layer):
    """mlx-lm's fused attention with keys and values tiled to the H query heads in layer `layer`: the
    GQA mistake where no scores or probabilities exist to dump."""
    scope = f"model.layers.{layer}.self_attn"

    def attention(recorder):
        def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
            if recorder.scope == scope:
                G = queries.shape[1] // keys.shape[1]
                keys, values = mx.tile(keys, (1, G, 1, 1)), mx.tile(values, (1, G, 1, 1))
            return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
        return sdpa

    attention.__name__ = f"fused, GQA tiled in layer {layer}"
    return attention
