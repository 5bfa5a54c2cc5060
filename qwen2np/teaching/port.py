"""A port of Qwen2's forward pass as someone porting it to another stack would write it, in one function,
with the classic porting mistakes behind switches: the gallery of what wrong looks like
(notebooks/05_porting_mistakes.ipynb).

`port_forward` computes the forward pass from the checkpoint's weights alone (it shares no code with
qwen2np's model beyond NumPy) and records every intermediate under qwen2np's names, as a dump that
`qwen2np.golden.compare.compare_dumps` compares with qwen2np's own. Without mistakes it agrees with
qwen2np within the float32 tolerance; each mistake makes a known tensor diverge first.

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> from qwen2np.golden.compare import compare_dumps
>>> from qwen2np.golden.record import record_dump
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> ids = np.array([[1, 2, 3, 4]])
>>> golden = record_dump(model, ids, include=reference_names(model.config))
>>> compare_dumps(port_forward(model.state_dict(), model.config, ids), golden).ok
True
>>> compare_dumps(port_forward(model.state_dict(), model.config, ids, mistakes=["interleaved_rope"]), golden).first_failure.name
'model.layers.0.self_attn.q_rope'
"""

import numpy as np

from ..golden.dump import new_dump
from ..inspection.names import intermediate_names

MISTAKES = {
    "interleaved_rope": "RoPE rotates neighbouring pairs (2i, 2i+1), as in the RoPE paper, instead of Qwen2's "
                        "halves (i, i + HD/2)",
    "gqa_tile": "K and V heads tiled (np.tile) instead of repeated (np.repeat): query head h reads KV head "
                "h % KV instead of h // G",
    "no_qkv_bias": "the q, k and v projections without their biases (most LLMs have none; Qwen2 has them)",
    "eps_outside_sqrt": "RMSNorm divides by sqrt(mean(x²)) + eps instead of sqrt(mean(x²) + eps)",
    "mask_minus_inf": "-inf instead of finfo(float32).min in the mask: a row with no visible key (left "
                      "padding) becomes NaN",
    "sliding_wrong_layers": "sliding windows on the layers below max_window_layers instead of from it on",
}


def reference_names(config):
    """The names the port records: every intermediate but `self_attn.head_out` (a port has no such tensor)."""
    return [n for n in intermediate_names(config.num_hidden_layers) if not n.endswith("head_out")]


def port_forward(weights, config, input_ids, attention_mask=None, *, mistakes=()):
    """The forward pass of a Qwen2ForCausalLM in float32, recorded as a dump.  input_ids [B, T]

    `weights` maps the checkpoint's names to arrays; `mistakes` are keys of MISTAKES.
    """
    unknown = [m for m in mistakes if m not in MISTAKES]
    if unknown:
        raise ValueError(f"port_forward: unknown mistakes {unknown}; known: {', '.join(MISTAKES)}")
    mistakes = set(mistakes)
    f32 = np.float32
    w = {n: np.asarray(a, dtype=f32) for n, a in weights.items()}
    ids = np.asarray(input_ids)
    B, T = ids.shape
    D, H, KV = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    HD, G, eps = config.head_dim, H // KV, config.rms_norm_eps
    rec = []

    def record(name, x):
        rec.append((name, x.copy()))
        return x

    def rms_norm(x, weight):
        if "eps_outside_sqrt" in mistakes:
            return weight * (x / (np.sqrt((x * x).mean(-1, keepdims=True)) + f32(eps)))
        return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + f32(eps)))

    # RoPE tables, halves repeated: [1, T, HD]
    theta = config.rope_parameters["rope_theta"]
    inv_freq = f32(1) / f32(theta) ** (np.arange(0, HD, 2, dtype=f32) / f32(HD))     # [HD/2]
    angles = np.arange(T, dtype=f32)[None, :, None] * inv_freq                       # [1, T, HD/2]
    cos = np.cos(np.concatenate([angles, angles], -1))
    sin = np.sin(np.concatenate([angles, angles], -1))

    def rope(x):                                                                      # [B, heads, T, HD]
        if "interleaved_rope" in mistakes:   # pairs (2i, 2i+1), each rotated by angle i
            c, s = cos[:, None, :, :HD // 2], sin[:, None, :, :HD // 2]
            even, odd = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
            return out
        half = np.concatenate([-x[..., HD // 2:], x[..., :HD // 2]], -1)               # rotate_half
        return x * cos[:, None] + half * sin[:, None]

    # masks: causal, padding, and the sliding window on the layers that slide
    mask = np.ones((B, T), dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    q_pos, k_pos = np.arange(T)[:, None], np.arange(T)[None, :]
    fill = f32(-np.inf) if "mask_minus_inf" in mistakes else np.finfo(f32).min

    def bias(sliding):
        visible = (k_pos <= q_pos) & mask[:, None, :]                                  # [B, T, S]
        if sliding:
            visible &= k_pos > q_pos - config.sliding_window
        return np.where(visible, f32(0), fill).astype(f32)[:, None]                     # [B, 1, T, S]

    x = record("model.embed_tokens", w["model.embed_tokens.weight"][ids])              # [B, T, D]
    record("model.rotary_emb.cos", cos), record("model.rotary_emb.sin", sin)
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        slides = config.use_sliding_window and (
            l < config.max_window_layers if "sliding_wrong_layers" in mistakes else l >= config.max_window_layers)
        h = record(p + "input_layernorm", rms_norm(x, w[p + "input_layernorm.weight"]))
        qkv = []
        for name in ("q_proj", "k_proj", "v_proj"):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            if "no_qkv_bias" not in mistakes:
                y = y + w[p + f"self_attn.{name}.bias"]
            qkv.append(record(p + f"self_attn.{name}", y))
        q = qkv[0].reshape(B, T, H, HD).transpose(0, 2, 1, 3)                         # [B, H, T, HD]
        k = qkv[1].reshape(B, T, KV, HD).transpose(0, 2, 1, 3)                        # [B, KV, T, HD]
        v = qkv[2].reshape(B, T, KV, HD).transpose(0, 2, 1, 3)
        q, k = record(p + "self_attn.q_rope", rope(q)), record(p + "self_attn.k_rope", rope(k))
        if "gqa_tile" in mistakes:
            k, v = np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1))                 # [B, H, S, HD], wrong order
        else:
            k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)                   # [B, H, S, HD]
        scores = record(p + "self_attn.scores", (q @ k.swapaxes(-1, -2)) * f32(HD ** -0.5))   # [B, H, T, S]
        m = record(p + "self_attn.mask", bias(slides))
        z = scores + m
        with np.errstate(invalid="ignore"):
            e = np.exp(z - z.max(-1, keepdims=True))                                   # -inf - -inf = NaN
        probs = record(p + "self_attn.probs", e / e.sum(-1, keepdims=True))
        context = record(p + "self_attn.context", (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * HD))
        attn = record(p + "self_attn.o_proj", context @ w[p + "self_attn.o_proj.weight"].T)
        x = record(p + "resid_mid", x + attn)
        h = record(p + "post_attention_layernorm", rms_norm(x, w[p + "post_attention_layernorm.weight"]))
        gate = record(p + "mlp.gate_proj", h @ w[p + "mlp.gate_proj.weight"].T)
        up = record(p + "mlp.up_proj", h @ w[p + "mlp.up_proj.weight"].T)
        act = record(p + "mlp.act", gate / (f32(1) + np.exp(-gate)))
        x = record(f"model.layers.{l}", x + record(p + "mlp.down_proj", (act * up) @ w[p + "mlp.down_proj.weight"].T))
    x = record("model.norm", rms_norm(x, w["model.norm.weight"]))
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    record("logits", x @ lm_head.T)
    return new_dump(producer="a port (qwen2np.teaching.port)", dtype="float32", input_ids=ids,
                    attention_mask=None if attention_mask is None else np.asarray(attention_mask),
                    passes=[{"start": 0, "length": T, "tensors": rec}],
                    options={"mistakes": sorted(mistakes)})
