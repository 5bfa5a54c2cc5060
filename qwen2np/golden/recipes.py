"""Each operation of a Qwen2 forward pass, recomputed in float64 from the tensors a dump recorded as its inputs.

A second implementation, in plain NumPy: it shares no code with qwen2np/model or qwen2np/weights
(tests/test_layering.py holds it; the RoPE tables are rotary.py's), so that a bug in the model's RoPE,
masks or norms cannot hide in the check that judges them (STYLE.md, "A check shares no code with what it
checks"; tests/golden/test_recipes.py plants such bugs). isolate.py runs the recipes on a dump and judges
the results; this file only says what each operation is.

`RECIPES` maps the model's own intermediates (docs/intermediates.md) and `LAYER_RECIPES` a layer's (without
their `model.layers.{l}.` prefix; the layer's output as "") to a recipe: the dump's tensors it reads,
the function, the weights. An input is named as the operation's own tensors are (in the same layer, or
the model's, as `rotary_emb.cos`); `residual` is the residual stream entering the block (`layers.{l-1}`,
`embed_tokens` for layer 0; the last layer's output for the final `norm`); `…@*` is that tensor of every
pass so far, joined along T (what the KV cache holds). A tuple holds alternatives: the first whose `when`
tensors are recorded is used.

The operations, in the legend of docs/dimensions.md (r = round to the dump's dtype; identity in float32,
float64 and for quantized-weight ports, which compute in float32):

    embed_tokens              r(W_embed[input_ids])                              exact
    rotary_emb.cos / .sin     r(cos / sin(position · inv_freq)), positions of the pass
    input_layernorm           r(w · r(x / sqrt(mean(x²) + eps))), x = the residual stream before
    q_proj, k_proj, v_proj    r(x W_ᵀ + b)
    q_rope, k_rope            r(r(q · cos) + r(rotate_half(q) · sin))            (tables from the dump if
                                                                                  recorded, else computed)
    scores                    r(r(q_rope k_ropeᵀ) · HD^-0.5), keys of this and every earlier pass
    mask                      the pattern of allowed keys (causal, padding, sliding window): exact
    probs                     r(softmax(scores + mask))
    context                   r(probs v), values of this and every earlier pass, heads merged
    head_out                  r(context_h W_o[:, h]ᵀ) per head h
    o_proj                    r(context W_oᵀ)
    resid_mid                 r(x + o_proj)
    post_attention_layernorm  as input_layernorm, of resid_mid (or of r(x + o_proj))
    gate_proj, up_proj        r(x W_ᵀ)
    act                       r(silu(gate_proj))
    act_up                    r(act(gate_proj) · up_proj)        (a port's fused SwiGLU product, optional)
    down_proj                 r(act_up W_downᵀ), act_up = r(act · up_proj) unless recorded
    layers.{l}                r(resid_mid + down_proj)
    norm, logits              as input_layernorm; r(norm W_lm_headᵀ)

>>> import numpy as np
>>> additive_mask(batch=1, q_start=0, T=3, S=3, attention_mask=None, window=2)[0, 0] == 0
array([[ True, False, False],
       [ True,  True, False],
       [False,  True,  True]])
"""

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import Qwen2npError
from .rotary import rotary_tables
from .rounding import rounding


class NotIsolated(Qwen2npError):
    """An operation that cannot be recomputed from the dump: an input it needs is not recorded, or the
    config asks for what qwen2np does not recompute."""


@dataclass
class Context:
    """What a recipe knows besides its input tensors: the model, where the pass sits, how the port rounds."""

    config: object                    # the model's Qwen2Config
    layer: int | None = None          # the operation's layer (None: embedding, RoPE tables, final norm, logits)
    scope: str = ""                   # the layer's name in the dump ("model.layers.3")
    start: int = 0                    # the pass's first position: the length of the past
    length: int = 0                   # T, the positions the pass adds
    shape: tuple = ()                 # the shape of the recorded output
    input_ids: object = None          # [B, T] of this pass
    attention_mask: object = None     # [B, N] of the whole dump (1 token, 0 padding), or None
    r: object = rounding(None)        # round to the dump's dtype (float64 in, float64 out)
    held: object = rounding(None)     # round to the dtype the port holds its weights in
    cache: dict = field(default_factory=dict)   # whole weights in float64, kept while the caller wants

    def weight(self, w, r0=0, r1=None):
        """Rows r0:r1 of weight `w` as the port holds it, in float64. Whole weights up to 64 MB are kept in
        `cache`, so that the passes of one tensor convert each weight once."""
        whole = r0 == 0 and (r1 is None or r1 >= w.shape[0]) and w.size * 8 <= 64 << 20
        if whole and id(w) in self.cache:
            return self.cache[id(w)]
        rows = self.held(np.asarray(w[r0:r1], dtype=np.float64))
        if whole:
            self.cache[id(w)] = rows
        return rows


@dataclass(frozen=True)
class Recipe:
    inputs: tuple          # the dump's tensors it reads (see the module's docstring)
    compute: object        # compute(ctx, *inputs, *weights) -> the expected output, float64
    weights: tuple = ()    # the weights it reads, named as in the layer ("self_attn.q_proj.weight")
    when: tuple = ()       # an alternative used only when these tensors are recorded


# -- RoPE: half-split rotation ------------------------------------------------------------------------


def rotary(ctx):
    """cos, sin [1, T, HD] of the pass's positions, from the config, in float64 rounded to the dump's dtype."""
    positions = np.arange(ctx.start, ctx.start + ctx.length, dtype=np.int64)[None]   # [1, T]
    cos, sin = rotary_tables(ctx.config, positions, np.float64)
    return ctx.r(cos), ctx.r(sin)


def rope(ctx, x, heads, cos=None, sin=None):
    """Split heads and rotate them, with the dump's tables or the config's.  [B, T, heads·HD] -> [B, heads, T, HD]"""
    B, T, _ = x.shape
    HD = ctx.config.head_dim
    x = x.reshape(B, T, heads, HD).transpose(0, 2, 1, 3)                # -> [B, heads, T, HD]
    if cos is None:
        cos, sin = rotary(ctx)
    cos, sin = cos[:, None], sin[:, None]                               # [B or 1, 1, T, HD]
    half = HD // 2
    # subtle: rotate_half turns the two halves, (x1, x2) -> (-x2, x1), not interleaved pairs (docs/numerics.md)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return ctx.r(ctx.r(x * cos) + ctx.r(rotated * sin))


def q_rope(ctx, q, cos=None, sin=None):
    return rope(ctx, q, ctx.config.num_attention_heads, cos, sin)


def k_rope(ctx, k, cos=None, sin=None):
    return rope(ctx, k, ctx.config.num_key_value_heads, cos, sin)


# -- attention ----------------------------------------------------------------------------------------


def additive_mask(batch, q_start, T, S, attention_mask, window):
    """0 where a query may see a key, finfo(float64).min where not: causal, padding, sliding window.
    The T queries are sequence indices q_start …; the S keys the last S indices seen.  -> [B, 1, T, S]"""
    kv_start = q_start + T - S
    q = np.arange(q_start, q_start + T, dtype=np.int64)[:, None]      # [T, 1]
    k = np.arange(kv_start, kv_start + S, dtype=np.int64)[None, :]    # [1, S]
    allowed = k <= q
    if window is not None:
        # subtle: W keys including the query itself, as transformers 5.24 (docs/sliding-window.md)
        allowed = allowed & (k > q - window)
    if attention_mask is not None:
        keep = attention_mask[:, :q_start + T][:, kv_start:kv_start + S].astype(bool)   # [B, S]
        allowed = allowed[None, None] & keep[:, None, None, :]                         # -> [B, 1, T, S]
    allowed = np.broadcast_to(allowed, (batch, 1, T, S))
    # subtle: finfo.min, not -inf: a query with no allowed key (left padding) gets a uniform softmax
    return np.where(allowed, 0.0, np.finfo(np.float64).min)


def layer_mask(ctx, B, T, S):
    """The additive mask of the operation's layer at this pass.  -> [B, 1, T, S]"""
    sliding = ctx.config.layer_types[ctx.layer] == "sliding_attention"
    return additive_mask(B, ctx.start, T, S, ctx.attention_mask, ctx.config.sliding_window if sliding else None)


def mask(ctx):
    B, _, T, S = ctx.shape
    return layer_mask(ctx, B, T, S)


def last_positions(ctx, x, S, name):
    """The last S positions (axis 2) of the cached keys or values `x` [B, KV, past+T, HD]."""
    if x.shape[2] < S:
        raise NotIsolated(f"needs {S} cached positions of {ctx.scope}.{name}, A records {x.shape[2]}")
    return x[:, :, x.shape[2] - S:]


def scores(ctx, q, keys):
    """q [B, H, T, HD], keys [B, KV, past+T, HD] -> [B, H, T, S]"""
    B, _, T, S = ctx.shape
    H, KV, HD = ctx.config.num_attention_heads, ctx.config.num_key_value_heads, ctx.config.head_dim
    keys = last_positions(ctx, keys, S, "self_attn.k_rope")                  # [B, KV, S, HD]
    # subtle: query head h reads KV head h // G (repeat-interleave), as transformers' repeat_kv
    qg = q.reshape(B, KV, (H // KV) * T, HD)                                 # -> [B, KV, G*T, HD]
    s = ctx.r(qg @ keys.swapaxes(-1, -2)).reshape(B, H, T, S)                # -> [B, H, T, S]
    return ctx.r(s * HD ** -0.5)


def probs(ctx, s, recorded_mask=None):
    """softmax(scores + mask) over the keys, with the port's own mask as a pattern when recorded.  [B, H, T, S]"""
    B, _, T, S = ctx.shape
    allowed = (layer_mask(ctx, B, T, S) if recorded_mask is None else recorded_mask) == 0
    x = s + np.where(allowed, 0.0, np.finfo(np.float64).min)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return ctx.r(x / x.sum(axis=-1, keepdims=True))


def context(ctx, p, values):
    """probs [B, H, T, S], values [B, past+T, KV·HD] -> heads merged [B, T, H·HD]"""
    B, _, T, S = p.shape
    H, KV, HD = ctx.config.num_attention_heads, ctx.config.num_key_value_heads, ctx.config.head_dim
    values = values.reshape(B, values.shape[1], KV, HD).transpose(0, 2, 1, 3)   # -> [B, KV, past+T, HD]
    values = last_positions(ctx, values, S, "self_attn.v_proj")                # [B, KV, S, HD]
    c = p.reshape(B, KV, (H // KV) * T, S) @ values                             # -> [B, KV, G*T, HD]
    return ctx.r(c.reshape(B, H, T, HD).transpose(0, 2, 1, 3).reshape(B, T, H * HD))


def head_out(ctx, c, w_o):
    """Each head's share of o_proj.  context [B, T, H·HD] -> [B, H, T, D]"""
    B, T, _ = c.shape
    H, HD = ctx.config.num_attention_heads, ctx.config.head_dim
    wo = ctx.weight(w_o).reshape(-1, H, HD)                                   # [D, H, HD]
    return ctx.r(np.einsum("bthk,dhk->bhtd", c.reshape(B, T, H, HD), wo))


# -- norms, products, the MLP, the residual stream ----------------------------------------------------


def embedding(ctx, table):
    """r(W_embed[input_ids]).  -> [B, T, D]"""
    return ctx.r(ctx.held(np.asarray(table[ctx.input_ids], dtype=np.float64)))


def rms_norm(ctx, x, w):
    """r(w · r(x / sqrt(mean(x²) + eps))): statistics unrounded, the normalised x rounded before the
    weight, as transformers' Qwen2RMSNorm does in half precision.  [..., D] -> [..., D]"""
    variance = (x * x).mean(axis=-1, keepdims=True)                    # [..., 1]
    h = ctx.r(x / np.sqrt(variance + ctx.config.rms_norm_eps))
    return ctx.r(ctx.weight(w) * h)


def linear(ctx, x, w, b=None, rows=8192):
    """r(x Wᵀ + b), W converted a block of rows at a time.  [..., in] -> [..., out]"""
    flat = x.reshape(-1, x.shape[-1])                                  # [N, in]
    out = np.empty((flat.shape[0], w.shape[0]), dtype=np.float64)      # [N, out]
    for r0 in range(0, w.shape[0], rows):
        out[:, r0:r0 + rows] = flat @ ctx.weight(w, r0, r0 + rows).T
    if b is not None:
        out += ctx.weight(b)
    return ctx.r(out).reshape(*x.shape[:-1], w.shape[0])


def activation(ctx, x):
    """The config's hidden_act, elementwise."""
    act = ctx.config.hidden_act
    if act in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if act == "relu":
        return np.maximum(x, 0)
    raise NotIsolated(f"hidden_act {act!r} is not one qwen2np recomputes")


def act(ctx, gate):
    return ctx.r(activation(ctx, gate))


def act_up(ctx, gate, up):
    return ctx.r(activation(ctx, gate) * up)


def down_proj(ctx, a, up, w_down):
    """down_proj of r(act · up_proj), when the port records no act_up."""
    return linear(ctx, ctx.r(a * up), w_down)


def add(ctx, x, y):
    """r(x + y): the residual stream after a sublayer."""
    return ctx.r(x + y)


def norm_of_sum(ctx, x, y, w):
    """rms_norm of r(x + y): post_attention_layernorm when the port records no resid_mid."""
    return rms_norm(ctx, add(ctx, x, y), w)


def layer_output(ctx, x, o, down):
    """r(r(x + o_proj) + down_proj): the layer's output when the port records no resid_mid."""
    return add(ctx, add(ctx, x, o), down)


def cos_table(ctx):
    """The pass's cos table, in the recorded shape ([1 or B, T, HD])."""
    return np.broadcast_to(rotary(ctx)[0], ctx.shape)


def sin_table(ctx):
    return np.broadcast_to(rotary(ctx)[1], ctx.shape)


# -- the recipe of each intermediate ------------------------------------------------------------------

TABLES = ("rotary_emb.cos", "rotary_emb.sin")
ATTENTION_WEIGHTS = {p: (f"self_attn.{p}.weight", f"self_attn.{p}.bias") for p in ("q_proj", "k_proj", "v_proj")}

RECIPES = {
    "embed_tokens": Recipe((), embedding, weights=("embed_tokens.weight",)),
    "rotary_emb.cos": Recipe((), cos_table),
    "rotary_emb.sin": Recipe((), sin_table),
    "norm": Recipe(("residual",), rms_norm, weights=("norm.weight",)),
    "logits": Recipe(("norm",), linear, weights=("lm_head.weight",)),
}
LAYER_RECIPES = {
    "input_layernorm": Recipe(("residual",), rms_norm, weights=("input_layernorm.weight",)),
    **{f"self_attn.{p}": Recipe(("input_layernorm",), linear, weights=w) for p, w in ATTENTION_WEIGHTS.items()},
    "self_attn.q_rope": (Recipe(("self_attn.q_proj", *TABLES), q_rope, when=TABLES),
                         Recipe(("self_attn.q_proj",), q_rope)),
    "self_attn.k_rope": (Recipe(("self_attn.k_proj", *TABLES), k_rope, when=TABLES),
                         Recipe(("self_attn.k_proj",), k_rope)),
    "self_attn.scores": Recipe(("self_attn.q_rope", "self_attn.k_rope@*"), scores),
    "self_attn.mask": Recipe((), mask),
    "self_attn.probs": (Recipe(("self_attn.scores", "self_attn.mask"), probs, when=("self_attn.mask",)),
                        Recipe(("self_attn.scores",), probs)),
    "self_attn.context": Recipe(("self_attn.probs", "self_attn.v_proj@*"), context),
    "self_attn.head_out": Recipe(("self_attn.context",), head_out, weights=("self_attn.o_proj.weight",)),
    "self_attn.o_proj": Recipe(("self_attn.context",), linear, weights=("self_attn.o_proj.weight",)),
    "resid_mid": Recipe(("residual", "self_attn.o_proj"), add),
    "post_attention_layernorm": (
        Recipe(("resid_mid",), rms_norm, weights=("post_attention_layernorm.weight",), when=("resid_mid",)),
        Recipe(("residual", "self_attn.o_proj"), norm_of_sum, weights=("post_attention_layernorm.weight",))),
    "mlp.gate_proj": Recipe(("post_attention_layernorm",), linear, weights=("mlp.gate_proj.weight",)),
    "mlp.up_proj": Recipe(("post_attention_layernorm",), linear, weights=("mlp.up_proj.weight",)),
    "mlp.act": Recipe(("mlp.gate_proj",), act),
    "mlp.act_up": Recipe(("mlp.gate_proj", "mlp.up_proj"), act_up),
    "mlp.down_proj": (Recipe(("mlp.act_up",), linear, weights=("mlp.down_proj.weight",), when=("mlp.act_up",)),
                      Recipe(("mlp.act", "mlp.up_proj"), down_proj, weights=("mlp.down_proj.weight",))),
    "": (Recipe(("resid_mid", "mlp.down_proj"), add, when=("resid_mid",)),     # the layer's output, layers.{l}
         Recipe(("residual", "self_attn.o_proj", "mlp.down_proj"), layer_output)),
}
