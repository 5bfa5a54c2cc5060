"""Exercises of notebook 2, part 2, on the real model: RMSNorm, RoPE, grouped-query attention without
copying K and V, a whole decoder layer from the weights; and (notebook 4) one decode step's KV-cache
update. Each is graded against the model's own intermediates of that name, recorded with a trace.
"""

import tracemalloc

import numpy as np

from ...inspection.tracing import trace
from ...model.attention import grouped_query_attention
from ...model.rope import inverse_frequencies
from ...weights.backend import to_numpy
from ...weights.store import as_array
from ..grader import RTOL, Verdict, call, compare_array, compare_steps, fail, graded, recognise, squeeze_to
from .attention import softmax64

F32 = np.float32


def layer_weights(model, layer):
    """{short name: float array} of one decoder layer ("input_layernorm.weight", "self_attn.q_proj.bias", …)."""
    prefix = f"model.layers.{layer}."
    return {n[len(prefix):]: to_numpy(as_array(w)) for n, w in model.state_dict().items() if n.startswith(prefix)}


def _record(model, input_ids, layer, *names):
    p = f"model.layers.{layer}."
    stream = "model.embed_tokens" if layer == 0 else f"model.layers.{layer - 1}"
    with trace(model, stream, "model.rotary_emb.*", *(p + n for n in names)) as t:
        model(input_ids)
    return t, stream


# -- RMSNorm -------------------------------------------------------------------------------------------------


@graded("RMSNorm")
def grade_rms_norm(fn, model, input_ids, layer=0):
    """`fn(x, w, eps)` -> RMSNorm of x [B, T, D] over its last axis, scaled by w [D]: graded as the
    `input_layernorm` of `layer` on `input_ids`."""
    exercise = "RMSNorm"
    t, stream = _record(model, input_ids, layer, "input_layernorm")
    x, w, eps = t[stream], layer_weights(model, layer)["input_layernorm.weight"], model.config.rms_norm_eps
    out, failed = call(exercise, fn, x, w, eps)
    if failed:
        return failed
    x64 = x.astype(np.float64)
    ms = (x64 * x64).mean(-1, keepdims=True)
    hints = {"input_layernorm": lambda mine, r: recognise(mine, {
        "eps is outside the square root: x / (sqrt(mean(x²)) + eps) instead of x / sqrt(mean(x²) + eps). Small "
        "vectors (the embeddings, rms ≈ 0.016 here) feel it most": w * x64 / (np.sqrt(ms) + eps),
        "the learned scale w is missing: multiply by w": x64 / np.sqrt(ms + eps),
        "the mean was subtracted: that is LayerNorm. RMSNorm only divides by the root mean square":
            w * (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(((x64 - x64.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + eps),
        "the mean of the squares runs over the positions (axis 1): it must run over the features (the last axis)":
            w * x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + eps),
        "divided by the mean of the squares, not its square root": w * x64 / (ms + eps),
    }, rtol=1e-5)}
    return compare_steps(exercise, [("input_layernorm", t[f"model.layers.{layer}.input_layernorm"], 1e-5)], out,
                         hints=hints)


# -- RoPE ----------------------------------------------------------------------------------------------------


def _rope64(x, angles, interleaved=False):
    """x [B, h, T, HD] rotated by angles [T, HD/2], in float64: halves (Qwen2) or neighbouring pairs."""
    x = x.astype(np.float64)
    c, s = np.cos(angles), np.sin(angles)
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


@graded("RoPE")
def grade_rope(fn, model, input_ids, layer=0):
    """`fn(x, positions, theta)` -> x [B, H, T, HD] rotated for `positions` [T] (Qwen2's halves), or a dict
    with "inv_freq" [HD/2], "cos" and "sin" [T, HD] (the angles' tables, halves repeated), "q_rope".
    Graded on the queries of `layer` (`self_attn.q_proj` split into heads) against `q_rope`."""
    exercise = "RoPE"
    c = model.config
    p = f"model.layers.{layer}.self_attn."
    with trace(model, "model.rotary_emb.*", p + "q_proj", p + "q_rope") as t:
        model(input_ids)
    B, T = np.asarray(input_ids).shape
    H, HD = c.num_attention_heads, c.head_dim
    x = t[p + "q_proj"].reshape(B, T, H, HD).transpose(0, 2, 1, 3)                 # [B, H, T, HD]
    theta = c.rope_parameters["rope_theta"]
    positions = np.arange(T)
    out, failed = call(exercise, fn, x, positions, theta)
    if failed:
        return failed
    inv_freq = inverse_frequencies(c.rope_parameters, HD, c.max_position_embeddings, np.float32)[0]
    given = dict(out) if isinstance(out, dict) else {"q_rope": out}
    for name, shape in [("cos", (T, HD)), ("sin", (T, HD)), ("inv_freq", (HD // 2,))]:
        if name in given:
            given[name] = squeeze_to(given[name], shape)
    pos = positions[:, None].astype(np.float64)
    inv64 = 1.0 / float(theta) ** (np.arange(0, HD, 2) / HD)
    hints = {
        "inv_freq": lambda mine, r: recognise(mine, {
            "these are θ = 10000's frequencies (Llama 2's); Qwen2.5 uses rope_theta = 1e6":
                1.0 / 10000.0 ** (np.arange(0, HD, 2) / HD),
            "θ^(i/HD) instead of θ^(2i/HD): i counts pairs, so the exponent is 2i/HD":
                1.0 / float(theta) ** (np.arange(HD // 2) / HD),
            "θ^(+2i/HD): the frequencies must fall, 1 / θ^(2i/HD)": float(theta) ** (np.arange(0, HD, 2) / HD)}, rtol=1e-4),
        "q_rope": lambda mine, r: recognise(mine, {
            "RoPE on neighbouring pairs (2i, 2i+1), as in the RoPE paper: Qwen2 pairs feature i with "
            "i + HD/2 (the two halves)": _rope64(x, pos * inv64, interleaved=True),
            "rotated the other way (by -angle): rotate_half maps (x1, x2) to (-x2, x1)": _rope64(x, -pos * inv64),
            "positions start at 1: the first token is at position 0 and is not rotated": _rope64(x, (pos + 1) * inv64),
            "rotated with θ = 10000: Qwen2.5 uses 1e6": _rope64(x, pos / 10000.0 ** (np.arange(0, HD, 2) / HD)),
        }, rtol=1e-4),
    }
    expected = [("inv_freq", inv_freq), ("cos", t["model.rotary_emb.cos"][0]), ("sin", t["model.rotary_emb.sin"][0]),
                ("q_rope", t[p + "q_rope"])]
    return compare_steps(exercise, expected, given, required=["q_rope"], hints=hints)


# -- grouped-query attention without copying K and V ---------------------------------------------------------


def attention_inputs(model, input_ids, layer):
    """q [B, H, T, HD], k and v [B, KV, S, HD], mask [B, 1, T, S] of one layer, and the model's scores,
    probs and context [B, H, T, HD], from a trace."""
    c = model.config
    s = f"model.layers.{layer}.self_attn"
    with trace(model, f"{s}.q_rope", f"{s}.k_rope", f"{s}.v_proj", f"{s}.mask", f"{s}.scores", f"{s}.probs",
               f"{s}.context") as t:
        model(input_ids)
    B, T = np.asarray(input_ids).shape
    v = t[f"{s}.v_proj"].reshape(B, T, c.num_key_value_heads, c.head_dim).transpose(0, 2, 1, 3)
    context = t[f"{s}.context"].reshape(B, T, c.num_attention_heads, c.head_dim).transpose(0, 2, 1, 3)
    return (t[f"{s}.q_rope"], t[f"{s}.k_rope"], v, t[f"{s}.mask"]), \
        [("scores", t[f"{s}.scores"]), ("probs", t[f"{s}.probs"]), ("context", context)]


def _tiled_scores(q, k):
    G = q.shape[1] // k.shape[1]
    return (q.astype(np.float64) @ np.tile(k, (1, G, 1, 1)).astype(np.float64).swapaxes(-1, -2)) / np.sqrt(q.shape[-1])


@graded("GQA without copying K and V")
def grade_gqa(fn, model, input_ids, layer=0, long_keys=4096):
    """`fn(q, k, v, mask)` -> context [B, H, T, HD] (or a dict with "scores" (before the mask), "probs",
    "context"), without copying K and V.

    Graded in two parts: the values, against the model's intermediates of `layer` on `input_ids`; then
    the memory: one query (T = 1) against `long_keys` keys of 128 features, traced with tracemalloc,
    must allocate less than half of one copy of K repeated G times (B·H·S·HD numbers), which `np.repeat`
    or `np.tile` of K and V would make twice over. (Scores and probabilities of one query need H·S
    numbers each, 1/128 of that.)"""
    exercise = "GQA without copying K and V"
    inputs, expected = attention_inputs(model, input_ids, layer)
    out, failed = call(exercise, fn, *inputs)
    if failed:
        return failed
    q, k, v, mask = inputs
    tile_note = "query head h read KV head h % KV (np.tile); it must read KV head h // G (np.repeat, or G " \
                "consecutive query heads per KV head)"
    hints = {"scores": lambda mine, r: recognise(mine, {tile_note: lambda: _tiled_scores(q, k)})}
    verdict = compare_steps(exercise, expected, out, hints=hints)
    if not verdict.passed:
        if verdict.first_wrong == "context" and not isinstance(out, dict):   # the final result only: tile?
            G = q.shape[1] // k.shape[1]
            tiled = softmax64(_tiled_scores(q, k) + mask) @ np.tile(v, (1, G, 1, 1)).astype(np.float64)
            if recognise(out, {tile_note: tiled}):
                verdict.note = tile_note
        return verdict

    B, H, KV, HD = q.shape[0], q.shape[1], k.shape[1], 128
    rng = np.random.default_rng(0)
    q1 = rng.standard_normal((B, H, 1, HD)).astype(q.dtype)
    k1, v1 = (rng.standard_normal((B, KV, long_keys, HD)).astype(q.dtype) for _ in range(2))
    mask1 = np.zeros((B, 1, 1, long_keys), dtype=q.dtype)
    repeated = B * H * long_keys * HD * q.dtype.itemsize
    tracemalloc.start()   # the inputs were made before: only what the function allocates counts
    try:
        out1, failed = call(exercise, fn, q1, k1, v1, mask1, copy=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if failed:
        return failed
    name = f"context, T=1 S={long_keys}"
    context1 = out1.get("context") if isinstance(out1, dict) else out1
    ok, detail = compare_array(context1, grouped_query_attention(q1, k1, v1, mask1, HD ** -0.5)[0])
    if not ok:
        return fail(exercise, verdict.steps, name, detail)
    steps = verdict.steps + [(name, True, detail)]
    if peak >= repeated / 2:
        return fail(exercise, steps, "memory", f"peak {peak / 2**20:.1f} MiB allocated; K repeated G times is "
                    f"{repeated / 2**20:.1f} MiB", "right values, but K and V were copied: reshape q instead "
                    "(G query heads as rows)")
    steps.append(("memory", True, f"peak {peak / 2**20:.1f} MiB allocated; K repeated G times is "
                                  f"{repeated / 2**20:.1f} MiB"))
    return Verdict(exercise, True, steps)


# -- a whole decoder layer -------------------------------------------------------------------------------------

LAYER_STEPS = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_rope",
               "self_attn.k_rope", "self_attn.scores", "self_attn.probs", "self_attn.context", "self_attn.o_proj",
               "resid_mid", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.act", "mlp.down_proj"]


@graded("a whole decoder layer")
def grade_decoder_layer(fn, model, input_ids, layer=0):
    """`fn(x, w, cos, sin, mask, config)` -> the layer's output [B, T, D] (or a dict of steps named as the
    model's intermediates under `model.layers.{layer}.`, e.g. "input_layernorm", "self_attn.q_proj", …,
    "mlp.down_proj", and "output"), from the residual stream x [B, T, D] that enters it, its weights `w`
    ({short name: array}, e.g. "self_attn.q_proj.bias"), the RoPE tables cos, sin [1, T, HD] and the
    additive mask [B, 1, T, S]."""
    exercise = "a whole decoder layer"
    p = f"model.layers.{layer}."
    stream = "model.embed_tokens" if layer == 0 else f"model.layers.{layer - 1}"
    with trace(model, stream, "model.rotary_emb.*", p + "*", p[:-1]) as t:
        model(input_ids)
    w = layer_weights(model, layer)
    args = (t[stream], w, t["model.rotary_emb.cos"], t["model.rotary_emb.sin"], t[p + "self_attn.mask"], model.config)
    out, failed = call(exercise, fn, *args)
    if failed:
        return failed
    c = model.config
    ref = {n: t[p + n] for n in LAYER_STEPS}
    ref["output"] = t[p[:-1]]
    x = t[stream].astype(np.float64)

    def minus_bias(name):
        return lambda: ref[name].astype(np.float64) - w[f"{name}.bias"]

    hints = {
        "self_attn.q_proj": lambda m, r: recognise(m, {"the bias is missing: Qwen2's q, k and v projections have "
                                                       "one (most LLMs do not)": minus_bias("self_attn.q_proj")}),
        "self_attn.k_proj": lambda m, r: recognise(m, {"the bias is missing": minus_bias("self_attn.k_proj")}),
        "self_attn.v_proj": lambda m, r: recognise(m, {"the bias is missing": minus_bias("self_attn.v_proj")}),
        "resid_mid": lambda m, r: recognise(m, {"the residual is missing: add the attention's output to the "
                                                "stream x that entered the layer": ref["self_attn.o_proj"]}),
        "post_attention_layernorm": lambda m, r: recognise(m, {
            "the second norm reads x, the stream that entered the layer: it must read resid_mid (after the "
            "attention's residual)": lambda: _norm(x, w["post_attention_layernorm.weight"], c.rms_norm_eps)}),
        "mlp.act": lambda m, r: recognise(m, {
            "SiLU of up_proj: the gate is gate_proj; act = silu(gate_proj)":
                lambda: _silu(ref["mlp.up_proj"]),
            "GELU instead of SiLU: Qwen2's hidden_act is silu, x · sigmoid(x)":
                lambda: _gelu(ref["mlp.gate_proj"]),
            "sigmoid(gate) without the product with gate: silu(x) = x · sigmoid(x)":
                lambda: 1 / (1 + np.exp(-ref["mlp.gate_proj"].astype(np.float64)))}, rtol=1e-4),
        "output": lambda m, r: recognise(m, {
            "the second residual is missing: output = resid_mid + mlp.down_proj": ref["mlp.down_proj"],
            "the output adds the MLP to x, the stream that entered: it must add it to resid_mid":
                lambda: x + ref["mlp.down_proj"]}),
    }
    expected = [(n, ref[n]) for n in LAYER_STEPS] + [("output", ref["output"])]
    return compare_steps(exercise, expected, out, hints=hints)


def _norm(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _silu(x):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-x))


def _gelu(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


# -- the KV cache, one decode step (notebook 4) ----------------------------------------------------------------


@graded("the KV-cache update")
def grade_kv_cache_step(fn, model, input_ids, layer=0):
    """`fn(cache_k, cache_v, q, k, v)` -> a dict with "keys" and "values" [B, KV, S + 1, HD] (the cache
    after appending the new position) and "context" [B, H, 1, HD] (the new query attending over them), for
    one decode step of `layer`: the prompt `input_ids[:, :-1]` is in the cache ([B, KV, S, HD], keys after
    RoPE), its last token is the new position (q [B, H, 1, HD] and k [B, KV, 1, HD] after RoPE, v
    [B, KV, 1, HD])."""
    exercise = "the KV-cache update"
    c = model.config
    s = f"model.layers.{layer}.self_attn."
    ids = np.asarray(input_ids)
    cache = model(ids[:, :-1], use_cache=True).past_key_values
    before_k, before_v = cache.layers[layer].keys.copy(), cache.layers[layer].values.copy()
    with trace(model, s + "q_rope", s + "k_rope", s + "v_proj", s + "context") as t:
        model(ids[:, -1:], past_key_values=cache)
    B = ids.shape[0]
    H, KV, HD = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    v_new = t[s + "v_proj"].reshape(B, 1, KV, HD).transpose(0, 2, 1, 3)
    args = (before_k, before_v, t[s + "q_rope"], t[s + "k_rope"], v_new)
    out, failed = call(exercise, fn, *args)
    if failed:
        return failed
    keys, values = cache.layers[layer].keys, cache.layers[layer].values
    context = t[s + "context"].reshape(B, 1, H, HD).transpose(0, 2, 1, 3)
    new_first = np.concatenate([args[3], before_k], axis=2)
    hints = {
        "keys": lambda m, r: recognise(m, {"the new key went in front: positions run along axis 2, oldest "
                                           "first, so the new one goes last": new_first}),
        "context": lambda m, r: recognise(m, {
            "the new query saw key 0 only: its causal mask is a single row [1, S] in which every key is "
            "visible (all of them are at or before it)":
                lambda: np.repeat(values[:, :, :1], H // KV, axis=1)}),
    }
    expected = [("keys", keys), ("values", values), ("context", context)]
    return compare_steps(exercise, expected, out, required=["keys", "values", "context"], hints=hints)
