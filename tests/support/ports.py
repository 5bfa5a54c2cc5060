"""Qwen2 ports as people write them, in NumPy, for the isolation tests (tests/golden/test_ports.py).

`port_dump` computes a Qwen2ForCausalLM's forward pass from its weights alone, pass by pass through its own
KV cache, the way a framework does it, and returns its dump. It shares no code with qwen2np's model or with
the golden recipes (the dump format and the fingerprint aside): a third implementation, with switches for

* the framework's rounding orders in bfloat16 / float16 (`style`): transformers', mlx-lm's (RMSNorm rounded
  once, one rounding in RoPE with float32 tables it never shows, a fused attention, g · sigmoid(g) · up
  each step rounded, the sigmoid from a rounded exp(|g|) as mlx's CPU kernel), keras-hub's (the bias added after the rounded product, RMSNorm rounded once, the queries scaled
  before the scores, silu rounded before `· up`, token-first per-head tensors);
* what it dumps and how: a fused attention (no scores or probs), token-first `[B, T, H, HD]`, scores taken
  after the mask (TransformerLens' hook_attn_scores), a context stored merged (HD, H) though computed right;
* porting mistakes (`MISTAKES`), one switch each, and weights lost in the port's conversion.
"""

import math

import ml_dtypes
import numpy as np

from qwen2np.golden.dump import new_dump
from qwen2np.golden.fingerprint import architecture, config_fingerprint, weights_fingerprint

STYLES = {
    "transformers": dict(bias="before", norm="two", rope="three", tables="rounded", attention="eager",
                         scores="product", swiglu="act", layout="head-major"),
    "mlx": dict(bias="before", norm="once", rope="one", tables="float32", attention="fused", scores="product",
                swiglu="mlx", layout="head-major"),
    "keras": dict(bias="after", norm="once", rope="three", tables="rounded", attention="eager", scores="queries",
                  swiglu="silu", layout="token-first"),
}
MISTAKES = {
    "interleaved_rope", "rope_sign", "rope_twice", "no_rope", "rope_restart", "rope_mask_positions",
    "rope_split_dims", "theta_1e4", "theta_5e5", "inv_freq_half", "interleaved_tables",
    "gqa_tile", "scale_hd", "scale_hd1", "no_scale", "keys_rotated_twice", "keys_unrotated", "cache_not_read",
    "no_causal", "no_padding_mask", "window_wider", "window_narrower", "sliding_everywhere", "sliding_nowhere",
    "sliding_swapped", "softmax_no_mask", "softmax_queries", "softmax_no_max", "mask_minus_inf", "merge_dims_first",
    "no_q_bias", "no_k_bias", "no_v_bias", "q_not_transposed", "o_not_transposed",
    "eps_outside", "llama_eps", "no_eps", "gemma_norm", "layernorm", "no_norm_weight", "parallel_block",
    "gelu", "gelu_erf", "relu", "sigmoid_only", "silu_of_up", "gate_up_swapped", "no_up",
    "no_residual", "mlp_from_input", "embed_sqrt_d", "lm_head_tied", "no_final_norm",
    "eps_outside_input_0",      # a 1e-3-level bug: eps outside the root in layer 0's input norm only
    "theta_low",                # a 1e-3-level bug: θ 0.1 % low, in every table
}


def _rounding(dtype):
    if dtype == "float32":
        return lambda x: np.asarray(x, np.float32)
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    return lambda x: np.asarray(x, np.float32).astype(half).astype(np.float32)


def port_dump(model, ids, mask=None, *, decode_steps=0, dtype="float32", style="transformers", fused=None,
              layout=None, masked_scores=False, dump_merge=False, mistakes=(), lost=(), include=None,
              fingerprint=True, producer=None):
    """The dump of a port of `model` (a qwen2np model: its config and weights only) run on ids [B, N]."""
    unknown = set(mistakes) - MISTAKES
    assert not unknown, f"unknown port mistakes {unknown}"
    how = dict(STYLES[style])
    if fused is not None:
        how["attention"] = "fused" if fused else "eager"
    if layout is not None:
        how["layout"] = layout
    m, c = set(mistakes), model.config
    r = _rounding(dtype)
    weights = _Held(model.state_dict(), r, lost)
    ids = np.asarray(ids)
    B, N = ids.shape
    mask = np.ones((B, N), np.int64) if mask is None else np.asarray(mask)
    D, H, KV, HD, L = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
    G = H // KV
    theta = c.rope_parameters["rope_theta"]
    theta = {"theta_1e4": 1e4, "theta_5e5": 5e5, "theta_low": theta * 0.999}.get(next(
        (x for x in m if x.startswith("theta_")), ""), theta)
    f32 = np.float32
    inv_freq = f32(1) / f32(theta) ** (np.arange(0, HD, 2, dtype=f32) / f32(HD))        # [HD/2]
    if "inv_freq_half" in m:
        inv_freq = r(inv_freq)
    cache = [[None, None] for _ in range(L)]
    passes, start = [], 0
    for length in [N - decode_steps] + [1] * decode_steps:
        rec = []

        def record(name, x):
            if include is None or name in include or any(name.endswith("." + i) for i in include):
                rec.append((name, x))
            return x

        def norm(x, w, index):
            x = x.astype(f32)
            eps = f32({"llama_eps": 1e-5, "no_eps": 0.0}.get(next((e for e in m if e in ("llama_eps", "no_eps")), ""),
                                                             c.rms_norm_eps))
            if "layernorm" in m:
                x = x - x.mean(-1, keepdims=True)
            ms = (x * x).mean(-1, keepdims=True)
            if "eps_outside" in m or ("eps_outside_input_0" in m and index == 0):
                h = x / (np.sqrt(ms) + eps)
            else:
                h = x / np.sqrt(ms + eps)
            if "no_norm_weight" in m:
                return r(h)
            w = (f32(1) + w) if "gemma_norm" in m else w
            return r(w * r(h)) if how["norm"] == "two" or "gemma_norm" in m else r(w * h)

        def linear(x, w, b=None, transposed=False):
            p = x @ (w if transposed else w.T)
            if b is None:
                return r(p)
            return r(r(p) + b) if how["bias"] == "after" else r(p + b)

        positions = np.arange(start, start + length)
        if "rope_restart" in m:
            positions = positions - start
        pos = np.broadcast_to(positions, (B, length))
        if "rope_mask_positions" in m:
            pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, start:start + length]
        angles = pos[..., None].astype(f32) * inv_freq                                 # [B, T, HD/2]
        angles = np.repeat(angles, 2, -1) if "interleaved_tables" in m else np.concatenate([angles, angles], -1)
        cos, sin = np.cos(angles).astype(f32), np.sin(angles).astype(f32)
        if how["tables"] == "rounded":
            cos, sin = r(cos), r(sin)
            record("model.rotary_emb.cos", cos[:1] if "rope_mask_positions" not in m else cos)
            record("model.rotary_emb.sin", sin[:1] if "rope_mask_positions" not in m else sin)

        def rope(x):                                                                   # [B, heads, T, HD]
            if "no_rope" in m:
                return x
            cs, sn = cos[:, None], sin[:, None]
            if "interleaved_rope" in m:
                cs, sn = np.repeat(cs[..., :HD // 2], 2, -1), np.repeat(sn[..., :HD // 2], 2, -1)
                turned = np.empty_like(x)
                turned[..., 0::2], turned[..., 1::2] = -x[..., 1::2], x[..., 0::2]
            else:
                turned = np.concatenate([-x[..., HD // 2:], x[..., :HD // 2]], -1)
                turned = -turned if "rope_sign" in m else turned
            y = r(r(x * cs) + r(turned * sn)) if how["rope"] == "three" else r(x * cs + turned * sn)
            return rope_again(y) if "rope_twice" in m else y

        def rope_again(y):
            m.discard("rope_twice")
            try:
                return rope(y)
            finally:
                m.add("rope_twice")

        def heads(x, n):                                                               # [B, T, n·HD] -> [B, n, T, HD]
            if "rope_split_dims" in m:
                return x.reshape(B, length, HD, n).transpose(0, 3, 1, 2)
            return x.reshape(B, length, n, HD).transpose(0, 2, 1, 3)

        def token_first(x):
            return x.transpose(0, 2, 1, 3) if how["layout"] == "token-first" else x

        emb = weights["model.embed_tokens.weight"][ids[:, start:start + length]]
        if "embed_sqrt_d" in m:
            emb = r(emb * f32(math.sqrt(D)))
        x = record("model.embed_tokens", r(emb))
        seen = start + length
        q_at, k_at = np.arange(start, seen)[:, None], np.arange(seen)[None, :]
        for l in range(L):
            p = f"model.layers.{l}."
            h = record(p + "input_layernorm", norm(x, weights[p + "input_layernorm.weight"], 0 if l == 0 else 1))
            qkv = []
            for name, n in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
                b = None if f"no_{name[0]}_bias" in m else weights[p + f"self_attn.{name}.bias"]
                transposed = name == "q_proj" and "q_not_transposed" in m
                qkv.append(record(p + f"self_attn.{name}", linear(h, weights[p + f"self_attn.{name}.weight"], b,
                                                                    transposed)))
            q = rope(heads(qkv[0], H))
            k_new = rope(heads(qkv[1], KV))
            v_new = qkv[2].reshape(B, length, KV, HD).transpose(0, 2, 1, 3)
            record(p + "self_attn.q_rope", token_first(q))
            record(p + "self_attn.k_rope", token_first(k_new))
            k_cached = heads(qkv[1], KV) if "keys_unrotated" in m else k_new
            ks = [k_cached] if cache[l][0] is None or "cache_not_read" in m else [cache[l][0], k_cached]
            vs = [v_new] if cache[l][1] is None or "cache_not_read" in m else [cache[l][1], v_new]
            cache[l] = [np.concatenate([cache[l][0], k_cached], 2) if cache[l][0] is not None else k_cached,
                        np.concatenate([cache[l][1], v_new], 2) if cache[l][1] is not None else v_new]
            k, v = np.concatenate(ks, 2), np.concatenate(vs, 2)                        # [B, KV, S, HD]
            S = k.shape[2]
            if "keys_rotated_twice" in m:
                k = _rotate_again(k, inv_freq, r, how["rope"])
            index = np.arange(H) % KV if "gqa_tile" in m else np.arange(H) // G
            k, v = k[:, index], v[:, index]                                            # [B, H, S, HD]
            kp = k_at[:, -S:]
            allowed = np.broadcast_to(kp <= q_at, (length, S)) if "no_causal" not in m else np.ones((length, S), bool)
            sliding = c.layer_types[l] == "sliding_attention"
            sliding = {"sliding_everywhere": True, "sliding_nowhere": False, "sliding_swapped": not sliding}.get(
                next((s for s in m if s.startswith("sliding_")), ""), sliding)
            if sliding and c.sliding_window:
                W = c.sliding_window + {"window_wider": 1, "window_narrower": -1}.get(
                    next((s for s in m if s.startswith("window_")), ""), 0)
                allowed = allowed & (kp > q_at - W)
            if "no_padding_mask" not in m:
                allowed = allowed[None, None] & mask[:, None, None, seen - S:seen].astype(bool)
            allowed = np.broadcast_to(allowed, (B, 1, length, S))
            fill = f32(-np.inf) if "mask_minus_inf" in m else f32(-65504.0) if dtype == "float16" else np.finfo(f32).min
            additive = np.where(allowed, f32(0), fill).astype(f32)
            scale = f32({"scale_hd": 1 / HD, "scale_hd1": (HD + 1) ** -0.5, "no_scale": 1.0}.get(
                next((s for s in m if s in ("scale_hd", "scale_hd1", "no_scale")), ""), HD ** -0.5))
            with np.errstate(invalid="ignore", over="ignore"):
                if how["attention"] == "fused":                                        # one rounding, at the end
                    z = (q @ k.swapaxes(-1, -2)) * scale + additive
                    e = np.exp(z - z.max(-1, keepdims=True))
                    ctx = (e / e.sum(-1, keepdims=True)) @ v
                else:
                    if how["scores"] == "queries":
                        s = r(r(q * scale) @ k.swapaxes(-1, -2))
                    else:
                        s = r(r(q @ k.swapaxes(-1, -2)) * scale)
                    record(p + "self_attn.scores", np.where(allowed, s, -np.inf).astype(f32) if masked_scores else s)
                    record(p + "self_attn.mask", additive)
                    z = s if "softmax_no_mask" in m else s + additive
                    if "softmax_queries" in m:
                        e = np.exp(z - z.max(-2, keepdims=True))
                        probs = r(e / e.sum(-2, keepdims=True))
                    elif "softmax_no_max" in m:
                        e = np.exp(s) * allowed
                        probs = r(e / e.sum(-1, keepdims=True))
                    else:
                        e = np.exp(z - z.max(-1, keepdims=True))
                        probs = r(e / e.sum(-1, keepdims=True))
                    record(p + "self_attn.probs", probs)
                    ctx = probs @ v
            ctx = r(ctx)                                                               # [B, H, T, HD]
            merged = ctx.transpose(0, 2, 3, 1) if "merge_dims_first" in m else ctx.transpose(0, 2, 1, 3)
            merged = merged.reshape(B, length, H * HD)
            record(p + "self_attn.context", merged.reshape(B, length, H, HD).transpose(0, 1, 3, 2).reshape(
                B, length, H * HD) if dump_merge else merged)              # dump_merge: stored (HD, H)
            o = record(p + "self_attn.o_proj", linear(merged, weights[p + "self_attn.o_proj.weight"],
                                                      transposed="o_not_transposed" in m))
            mid = record(p + "resid_mid", o if "no_residual" in m else r(x + o))
            h = record(p + "post_attention_layernorm", norm(x if "parallel_block" in m else mid,
                                                            weights[p + "post_attention_layernorm.weight"], 1))
            w_gate, w_up = weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]
            if "gate_up_swapped" in m:
                w_gate, w_up = w_up, w_gate
            gate = record(p + "mlp.gate_proj", linear(h, w_gate))
            up = record(p + "mlp.up_proj", linear(h, w_up))
            act = _activation(up if "silu_of_up" in m else gate, m, r)
            if how["swiglu"] == "act":
                record(p + "mlp.act", r(act))
                product = r(act) if "no_up" in m else r(r(act) * up)
            else:   # a fused SwiGLU: silu_of_up swaps its two arguments
                g, other = (up, gate) if "silu_of_up" in m else (gate, up)
                if how["swiglu"] == "mlx" and not {"gelu", "gelu_erf", "relu", "sigmoid_only"} & m:
                    act = g * _mlx_sigmoid(g, r)        # mlx: x · sigmoid(x), rounded before the product by up
                product = record(p + "mlp.act_up", r(act) if "no_up" in m else r(r(act) * other))
            down = record(p + "mlp.down_proj", linear(product, weights[p + "mlp.down_proj.weight"]))
            x = record(f"model.layers.{l}", r(x + down) if "mlp_from_input" in m else r(mid + down))
        final = x if "no_final_norm" in m else norm(x, weights["model.norm.weight"], 1)
        record("model.norm", final)
        head = weights["model.embed_tokens.weight"] if "lm_head_tied" in m else weights["lm_head.weight"]
        record("logits", linear(final, head))
        half = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16 if dtype == "float16" else np.float32
        passes.append({"start": start, "length": length, "tensors": [(n, t.astype(half)) for n, t in rec]})
        start += length
    description = {}
    if fingerprint:
        description = {"config": architecture(c), "config_fingerprint": config_fingerprint(c),
                       "weights_fingerprint": weights_fingerprint(weights)}
    return new_dump(producer=producer or f"a numpy port ({style})", dtype=dtype, input_ids=ids,
                    attention_mask=None if mask.all() else mask, passes=passes, model=description)


class _Held(dict):
    """The port's weights: the model's rounded to its dtype as they are read (no second copy of a real
    checkpoint's weights in memory); those in `lost` are zeros, as a conversion that lost them leaves them."""

    def __init__(self, weights, r, lost):
        super().__init__(weights)
        self.r, self.lost = r, set(lost)

    def __getitem__(self, name):
        w = np.asarray(super().__getitem__(name), np.float32)
        return np.zeros_like(w) if name in self.lost else self.r(w)


def _activation(g, m, r):
    with np.errstate(over="ignore"):
        if "gelu" in m:
            return 0.5 * g * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (g + np.float32(0.044715) * g ** 3)))
        if "gelu_erf" in m:
            return 0.5 * g * (1 + np.vectorize(math.erf, otypes=[np.float32])(g / np.float32(math.sqrt(2))))
        if "relu" in m:
            return np.maximum(g, 0)
        if "sigmoid_only" in m:
            return 1 / (1 + np.exp(-g))
        return g / (1 + np.exp(-g))


def _mlx_sigmoid(g, r):
    """sigmoid as mlx's CPU kernel computes it in half precision: exp(|g|) rounded, then 1/(1 + e) in
    float32, taken from 1 for g ≥ 0, rounded."""
    with np.errstate(over="ignore"):
        e = r(np.exp(np.abs(g)))
        y = np.float32(1) / (np.float32(1) + e)
        return r(np.where(g < 0, y, np.float32(1) - y))


def _rotate_again(k, inv_freq, r, order):
    """Keys cached after RoPE, rotated again at their positions (a port that thinks its cache is pre-RoPE)."""
    angles = np.arange(k.shape[2], dtype=np.float32)[:, None] * inv_freq
    angles = np.concatenate([angles, angles], -1)
    cos, sin = r(np.cos(angles)), r(np.sin(angles))
    half = k.shape[-1] // 2
    turned = np.concatenate([-k[..., half:], k[..., :half]], -1)
    return r(r(k * cos) + r(turned * sin)) if order == "three" else r(k * cos + turned * sin)
