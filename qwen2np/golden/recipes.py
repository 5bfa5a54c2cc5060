"""Each operation of a Qwen2 forward pass, recomputed in float64 from the tensors a dump recorded as its inputs.

A second implementation, in plain NumPy: it shares no code with qwen2np/model or qwen2np/weights
(tests/test_layering.py holds it; the RoPE tables are rotary.py's, the attention attention.py's), so that
a bug in the model's RoPE, masks or norms cannot hide in the check that judges them (STYLE.md, "A check
shares no code with what it checks"; tests/golden/test_recipes.py plants such bugs). isolate.py runs the
recipes on a dump and judges the results; this file only says what each operation is.

`RECIPES` maps the model's own intermediates (docs/intermediates.md) and `LAYER_RECIPES` a layer's (without
their `model.layers.{l}.` prefix; the layer's output as "") to a recipe: the dump's tensors it reads,
the function, the weights. An input is named as the operation's own tensors are (in the same layer, or
the model's, as `rotary_emb.cos`); `residual` is the residual stream entering the block (`layers.{l-1}`,
`embed_tokens` for layer 0; the last layer's output for the final `norm`); `…@*` is that tensor of every
pass so far, joined along T (what the KV cache holds). A tuple holds alternatives: the first whose `when`
tensors are recorded is used.

The operations, in the legend of docs/dimensions.md (r = round to the dump's dtype; identity in float32,
float64 and for quantized-weight ports, which compute in float32), in transformers' rounding order:

    embed_tokens              r(W_embed[input_ids])                              exact
    rotary_emb.cos / .sin     r(cos / sin(position · inv_freq)), positions of the pass
    input_layernorm           r(w · r(x / sqrt(mean(x²) + eps))), x = the residual stream before
    q_proj, k_proj, v_proj    r(x W_ᵀ + b)
    q_rope, k_rope            r(r(q · cos) + r(rotate_half(q) · sin))            (tables from the dump if
                                                                                  recorded, else computed)
    scores                    r(r(q_rope k_ropeᵀ) · HD^-0.5), keys of this and every earlier pass
    mask                      the pattern of allowed keys (causal, padding, sliding window): exact
    probs                     r(softmax(scores + mask))
    context                   r(probs v), values of this and every earlier pass, heads merged;
                              without probs (a fused kernel): r(softmax(q_rope k_ropeᵀ · HD^-0.5 + mask) v)
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

Where a half-precision port may legitimately round in another order (the bias after the product's
rounding, RMSNorm rounded once, RoPE rounded once, …), a recipe lists the order `families` it belongs
to; orders.py names them, and the functions here and in attention.py follow `ctx.order(family)`.

>>> import numpy as np
>>> additive_mask(batch=1, q_start=0, T=3, S=3, attention_mask=None, window=2)[0, 0] == 0
array([[ True, False, False],
       [ True,  True, False],
       [False,  True,  True]])
"""

import math
from dataclasses import dataclass, field

import numpy as np

from . import attention
from .attention import NotIsolated, fused_context, head_out, k_rope, mask, probs, q_rope, rotary, scores
from .rounding import rounding

__all__ = ["NotIsolated", "Context", "Recipe", "RECIPES", "LAYER_RECIPES", "additive_mask", "rms_norm", "linear"]
additive_mask = attention.additive_mask


@dataclass
class Context:
    """What a recipe knows besides its input tensors: the model, where the pass sits, how the port rounds."""

    config: object                    # the model's Qwen2Config
    layer: int | None = None          # the operation's layer (None: embedding, RoPE tables, final norm, logits)
    scope: str = ""                   # the layer's name in the dump ("model.layers.3")
    start: int = 0                    # the pass's first position: the length of the past
    length: int = 0                   # T, the positions the pass adds
    shape: tuple = ()                 # the shape of the recorded output
    input_ids: object = None          # [B, T] of this pass (of the kept positions)
    attention_mask: object = None     # [B, N] of the whole dump (1 token, 0 padding), or None
    r: object = rounding(None)        # round to the dump's dtype (float64 in, float64 out)
    held: object = rounding(None)     # round to the dtype the port holds its weights in
    cache: dict = field(default_factory=dict)   # whole weights in float64, kept while the caller wants
    kept: object = None               # the positions the dump kept of this pass (--positions), None: all
    orders: dict = field(default_factory=dict)  # rounding-order family -> the port's order (orders.py)
    observed: object = None           # the port's own output, float64 (the fused attention settles ties by it)

    @property
    def positions(self):
        """The absolute positions along the recorded T axis.  -> [T] int64"""
        if self.kept is not None:
            return np.asarray(self.kept, dtype=np.int64)
        return np.arange(self.start, self.start + self.length, dtype=np.int64)

    @property
    def whole(self):
        """Whether the recorded T axis holds every position of the pass."""
        return self.kept is None or list(self.kept) == list(range(self.start, self.start + self.length))

    def order(self, family):
        """The port's rounding order in `family` (orders.py); transformers' order unless the caller set one."""
        return self.orders.get(family, "")

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
    families: tuple = ()   # the rounding-order families where a half-precision port may differ (orders.py)
    rowwise: bool = False  # position by position (a product, a norm, …): the passes may be computed as one


# -- norms, products, the MLP, the residual stream ----------------------------------------------------


def embedding(ctx, table):
    """r(W_embed[input_ids]).  -> [B, T, D]"""
    return ctx.r(ctx.held(np.asarray(table[ctx.input_ids], dtype=np.float64)))


def rms_norm(ctx, x, w, eps=None):
    """r(w · r(x / sqrt(mean(x²) + eps))): statistics unrounded, the normalised x rounded before the
    weight, as transformers' Qwen2RMSNorm does in half precision (order "norm": or rounded once, after
    the weight).  [..., D] -> [..., D]"""
    variance = (x * x).mean(axis=-1, keepdims=True)                    # [..., 1]
    eps = ctx.config.rms_norm_eps if eps is None else eps
    return scale_normalised(ctx, x / np.sqrt(variance + eps), w)


def scale_normalised(ctx, h, w):
    """The weight times the normalised h, rounded as the port rounds (order "norm")."""
    if ctx.order("norm") == "once":
        return ctx.r(ctx.weight(w) * h)
    return ctx.r(ctx.weight(w) * ctx.r(h))


def product(ctx, x, w, rows=8192):
    """x Wᵀ in float64, unrounded, W converted a block of rows at a time.  [..., in] -> [..., out]"""
    flat = x.reshape(-1, x.shape[-1])                                  # [N, in]
    out = np.empty((flat.shape[0], w.shape[0]), dtype=np.float64)      # [N, out]
    for r0 in range(0, w.shape[0], rows):
        out[:, r0:r0 + rows] = flat @ ctx.weight(w, r0, r0 + rows).T
    return out.reshape(*x.shape[:-1], w.shape[0])


def add_bias(ctx, p, b=None):
    """r(p + b): the product's bias, added before its rounding (order "bias": or after it, as keras-hub)."""
    if b is None:
        return ctx.r(p)
    if ctx.order("bias") == "after":
        return ctx.r(ctx.r(p) + ctx.weight(b))
    return ctx.r(p + ctx.weight(b))


def linear(ctx, x, w, b=None):
    """r(x Wᵀ + b).  [..., in] -> [..., out]"""
    return add_bias(ctx, product(ctx, x, w), b)


def activation(ctx, x, act=None):
    """The config's hidden_act (or `act`), elementwise; SiLU rounded as the port rounds (order "silu")."""
    act = act or ctx.config.hidden_act
    if act in ("silu", "swish"):
        if ctx.order("silu") in ("sigmoid", "exp"):   # x · sigmoid(x) in half precision: the sigmoid rounded first
            return x * sigmoid(ctx, x, ctx.order("silu"))
        return x / (1 + np.exp(-x))
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if act == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if act == "relu":
        return np.maximum(x, 0)
    raise NotIsolated(f"hidden_act {act!r} is not one qwen2np recomputes")


def sigmoid(ctx, x, order="sigmoid"):
    """σ(x) rounded to the port's dtype: 1 / (1 + exp(−x)) rounded once ("sigmoid"), or as mlx's CPU kernel
    computes it ("exp"): e = r(exp(|x|)), then 1 − 1/(1 + e) for x ≥ 0 and 1/(1 + e) below, rounded."""
    if order == "exp":
        # subtle: mlx rounds exp(|x|) to the half dtype before dividing: at x = 0.0079 in bfloat16, exp(x) =
        # 1.00791 becomes 1.0078125, and σ comes out 0.5 where σ rounded once is 0.50390625
        e = ctx.r(np.exp(np.abs(x)))
        return ctx.r(np.where(x < 0, 1 / (1 + e), 1 - 1 / (1 + e)))
    return ctx.r(1 / (1 + np.exp(-x)))


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def act(ctx, gate):
    with np.errstate(over="ignore"):
        return ctx.r(activation(ctx, gate))


def act_up(ctx, gate, up):
    """r(act(gate) · up): one rounding (a fused SwiGLU), or the activation rounded first (order "swiglu")."""
    with np.errstate(over="ignore"):
        order = ctx.order("swiglu")
        if order == "silu":
            return ctx.r(ctx.r(activation(ctx, gate)) * up)
        if order in ("sigmoid", "exp"):
            return ctx.r(ctx.r(gate * sigmoid(ctx, gate, order)) * up)
        return ctx.r(activation(ctx, gate) * up)


def down_proj(ctx, a, up, w_down):
    """down_proj of r(act · up_proj), when the port records no act_up (order "swiglu_product": unrounded)."""
    return linear(ctx, a * up if ctx.order("swiglu_product") == "exact" else ctx.r(a * up), w_down)


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
CACHE = ("self_attn.q_rope", "self_attn.k_rope@*", "self_attn.v_proj@*")   # a fused kernel's inputs

RECIPES = {
    "embed_tokens": Recipe((), embedding, weights=("embed_tokens.weight",)),
    "rotary_emb.cos": Recipe((), cos_table),
    "rotary_emb.sin": Recipe((), sin_table),
    "norm": Recipe(("residual",), rms_norm, weights=("norm.weight",), families=("norm",), rowwise=True),
    "logits": Recipe(("norm",), linear, weights=("lm_head.weight",), rowwise=True),
}
LAYER_RECIPES = {
    "input_layernorm": Recipe(("residual",), rms_norm, weights=("input_layernorm.weight",), families=("norm",),
                              rowwise=True),
    **{f"self_attn.{p}": Recipe(("input_layernorm",), linear, weights=w, families=("bias",), rowwise=True)
       for p, w in ATTENTION_WEIGHTS.items()},
    "self_attn.q_rope": (Recipe(("self_attn.q_proj", *TABLES), q_rope, when=TABLES, families=("rope",)),
                         Recipe(("self_attn.q_proj",), q_rope, families=("rope", "rope_tables"))),
    "self_attn.k_rope": (Recipe(("self_attn.k_proj", *TABLES), k_rope, when=TABLES, families=("rope",)),
                         Recipe(("self_attn.k_proj",), k_rope, families=("rope", "rope_tables"))),
    "self_attn.scores": Recipe(("self_attn.q_rope", "self_attn.k_rope@*"), scores, families=("scores",)),
    "self_attn.mask": Recipe((), mask),
    "self_attn.probs": (Recipe(("self_attn.scores", "self_attn.mask"), probs, when=("self_attn.mask",),
                               families=("softmax",)),
                        Recipe(("self_attn.scores",), probs, families=("softmax",))),
    # with probs, the product by the values; without (a fused kernel: nothing between q, k, v and the
    # context to dump), the whole attention from the port's queries, cached keys and values, and its mask
    "self_attn.context": (Recipe(("self_attn.probs", "self_attn.v_proj@*"), attention.context,
                                 when=("self_attn.probs",)),
                          Recipe((*CACHE, "self_attn.mask"), fused_context, when=("self_attn.mask",),
                                 families=("attention",)),
                          Recipe(CACHE, fused_context, families=("attention",))),
    "self_attn.head_out": Recipe(("self_attn.context",), head_out, weights=("self_attn.o_proj.weight",)),
    "self_attn.o_proj": Recipe(("self_attn.context",), linear, weights=("self_attn.o_proj.weight",), rowwise=True),
    "resid_mid": Recipe(("residual", "self_attn.o_proj"), add, rowwise=True),
    "post_attention_layernorm": (
        Recipe(("resid_mid",), rms_norm, weights=("post_attention_layernorm.weight",), when=("resid_mid",),
               families=("norm",), rowwise=True),
        Recipe(("residual", "self_attn.o_proj"), norm_of_sum, weights=("post_attention_layernorm.weight",),
               families=("norm",), rowwise=True)),
    "mlp.gate_proj": Recipe(("post_attention_layernorm",), linear, weights=("mlp.gate_proj.weight",), rowwise=True),
    "mlp.up_proj": Recipe(("post_attention_layernorm",), linear, weights=("mlp.up_proj.weight",), rowwise=True),
    "mlp.act": Recipe(("mlp.gate_proj",), act, families=("silu",), rowwise=True),
    "mlp.act_up": Recipe(("mlp.gate_proj", "mlp.up_proj"), act_up, families=("swiglu",), rowwise=True),
    "mlp.down_proj": (Recipe(("mlp.act_up",), linear, weights=("mlp.down_proj.weight",), when=("mlp.act_up",),
                             rowwise=True),
                      Recipe(("mlp.act", "mlp.up_proj"), down_proj, weights=("mlp.down_proj.weight",),
                             families=("swiglu_product",), rowwise=True)),
    "": (Recipe(("resid_mid", "mlp.down_proj"), add, when=("resid_mid",), rowwise=True),   # the layer's output
         Recipe(("residual", "self_attn.o_proj", "mlp.down_proj"), layer_output, rowwise=True)),
}
