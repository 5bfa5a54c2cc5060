"""How each known porting mistake computes, on a port's own inputs: the replays of catalogue.py.

Each function here makes, or is, a recipe-like `compute(ctx, *inputs, *weights)` that recomputes one
operation the way a port with that mistake computes it, with the building blocks of recipes.py and
attention.py (so in the port's rounding orders, through `ctx.order`). A compute returns None where the
mistake cannot differ from the right answer (a θ equal to the config's, a transposed weight that is not
square). Plain NumPy, like recipes.py (tests/test_layering.py).

>>> import numpy as np
>>> pairs(np.array([1.0, 2.0, 3.0, 4.0])).tolist()      # (x0, x1) -> (-x1, x0), pair by pair
[-2.0, 1.0, -4.0, 3.0]
"""

from types import SimpleNamespace

import numpy as np

from . import attention as att
from . import recipes as rec
from .rotary import rotary_tables


def theta(config):
    return config.rope_parameters["rope_theta"]


# -- RoPE ---------------------------------------------------------------------------------------------

OTHER_THETAS = {10000.0: "θ = 10000 (the RoPE paper's, Llama 2's)", 500000.0: "θ = 500000 (Llama 3's)",
                1000000.0: "θ = 1e6 (Qwen2.5's)"}


def rope_tables(ctx, theta=None, positions=None, interleaved=False, half_inv_freq=False, half_angles=False,
                default_rope=False):
    """cos, sin [1 or B, T, HD] as a port with this mistake computes them (rounded to the dump's dtype);
    `positions` [T] or [B, T]. None when the mistake does not apply to the config's RoPE."""
    rope = {**ctx.config.rope_parameters, **({"rope_theta": theta} if theta else {})}
    if default_rope:
        if rope["rope_type"] == "default":
            return None
        rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    positions = np.asarray(ctx.positions if positions is None else positions)
    positions = positions if positions.ndim == 2 else positions[None]                # [1 or B, T]
    HD = ctx.config.head_dim
    if half_inv_freq or half_angles or interleaved:
        if rope["rope_type"] != "default":
            return None
        inv = 1.0 / rope["rope_theta"] ** (np.arange(0, HD, 2) / HD)                   # [HD/2]
        inv = ctx.r(inv) if half_inv_freq else inv
        angles = positions[..., None] * inv                                            # [B, T, HD/2]
        angles = ctx.r(angles) if half_angles else angles
        angles = np.repeat(angles, 2, axis=-1) if interleaved else np.concatenate([angles, angles], -1)
        return ctx.r(np.cos(angles)), ctx.r(np.sin(angles))
    config = SimpleNamespace(head_dim=HD, max_position_embeddings=ctx.config.max_position_embeddings,
                             rope_parameters=rope)
    cos, sin = rotary_tables(config, positions, np.float64)
    return ctx.r(cos), ctx.r(sin)


def table(which, positions=None, **how):
    """The RoPE table `which` (0: cos, 1: sin) of a port with this mistake, in the recorded shape."""
    def compute(ctx):
        p = None if positions is None else positions(ctx)
        if positions is not None and p is None:
            return None
        made = rope_tables(ctx, positions=p, **how)
        if made is None:
            return None
        return np.broadcast_to(made[which], ctx.shape) if made[which].shape[0] == 1 else made[which]
    return compute


def restarting(ctx):
    """Positions counted from 0 in every forward pass: the cache's offset never added."""
    return ctx.positions - ctx.start


def from_mask(ctx):
    """Positions from the attention mask (cumsum − 1, as `generate` does) instead of the plain forward's."""
    if ctx.attention_mask is None or ctx.attention_mask.all():
        return None
    return np.clip(np.cumsum(ctx.attention_mask, axis=1) - 1, 0, None)[:, ctx.positions]   # [B, T]


def pairs(x):
    """x rotated pair by pair, (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]): with tables holding angle i at 2i and 2i+1,
    x·cos + pairs(x)·sin is RoPE on neighbouring pairs (GPT-J's layout)."""
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def roped(heads, *, rotate="half", theta=None, positions=None, twice=False, none=False, split="heads-first"):
    """A RoPE replay: q_proj or k_proj [B, T, heads·HD] (and the recorded tables) -> [B, heads, T, HD]."""
    def compute(ctx, x, cos=None, sin=None):
        n = getattr(ctx.config, heads)
        B, T, _ = x.shape
        x = x.reshape(B, T, -1, n).transpose(0, 3, 1, 2) if split == "dims-first" else att.split_heads(x, n)
        if none:
            return ctx.r(x)
        if rotate == "pairs":
            half = x.shape[-1] // 2
            made = rope_tables(ctx, interleaved=True) if cos is None else (
                np.repeat(cos[..., :half], 2, -1), np.repeat(sin[..., :half], 2, -1))
            return None if made is None else att.rotate_with(ctx, x, made[0], made[1], pairs)
        if theta is not None or positions is not None or cos is None:
            p = None if positions is None else positions(ctx)
            if positions is not None and p is None:
                return None
            cos, sin = rope_tables(ctx, theta=theta, positions=p)
        turn = (lambda y: -att.rotate_half(y)) if rotate == "sign" else att.rotate_half
        y = att.rotate_with(ctx, x, cos, sin, turn)
        return att.rotate_with(ctx, y, cos, sin) if twice else y
    return compute


def token_first(heads):
    """Right values stored token-first [B, T, heads, HD] when T = heads (the shapes agree)."""
    def compute(ctx, x, cos=None, sin=None):
        y = att.rope(ctx, x, getattr(ctx.config, heads), cos, sin)
        return y.transpose(0, 2, 1, 3) if y.shape[1] == y.shape[2] else None
    return compute


def restore_token_first(ctx, x):
    return x.transpose(0, 2, 1, 3)


# -- attention ----------------------------------------------------------------------------------------

SCALES = {"1/HD": lambda HD: 1 / HD, "1/sqrt(HD+1)": lambda HD: (HD + 1) ** -0.5, "none": lambda HD: 1.0}


def kv_index(ctx, tiled):
    """The KV head of each query head: h % KV when `tiled` (np.tile), else the right one (None)."""
    return att.tile_heads(ctx.config.num_attention_heads, ctx.config.num_key_value_heads) if tiled else None


def rotate_cached(ctx, k):
    """Keys cached after RoPE and rotated again at use (a port that believes its cache holds them unrotated)."""
    cos, sin = rope_tables(ctx, positions=np.arange(k.shape[2]))
    return att.rotate_with(ctx, k, cos, sin)


def scores(scale=None, tile=False, keys="rope"):
    def compute(ctx, q, k):
        s = SCALES[scale](ctx.config.head_dim) if scale else None
        if keys == "twice":
            k = rotate_cached(ctx, k)
        elif keys == "proj":
            k = att.split_heads(k, ctx.config.num_key_value_heads)
        return att.scores(ctx, q, k, s, kv_index(ctx, tile))
    return compute


def probs(how):
    def compute(ctx, s, recorded_mask=None):
        B, _, T, S = ctx.shape
        allowed = att.allowed_keys(ctx, B, T, S, recorded_mask)
        with np.errstate(invalid="ignore", over="ignore"):
            if how == "no mask":
                return att.softmax(ctx, s)
            if how == "queries":
                x = s + np.where(allowed, 0.0, att.MASKED)
                return ctx.r(att.softmax(ctx, x.swapaxes(-1, -2)).swapaxes(-1, -2))
            e = np.exp(s) * allowed                                # "no max": exp of the raw scores
            return ctx.r(e / e.sum(-1, keepdims=True))
    return compute


def mask(how):
    def compute(ctx):
        B, _, T, S = ctx.shape
        W, sliding = ctx.config.sliding_window, ctx.config.layer_types[ctx.layer] == "sliding_attention"
        if how == "no causal":      # the padding and the window's far edge, no upper bound
            q, k = ctx.positions[:, None], np.arange(ctx.start + T - S, ctx.start + T)[None, :]
            keep = k > q - W if sliding else np.ones((T, S), bool)
            if ctx.attention_mask is not None:
                keep = keep & ctx.attention_mask[:, ctx.start + T - S:ctx.start + T].astype(bool)[:, None, None, :]
            return np.where(np.broadcast_to(keep, (B, 1, T, S)), 0.0, att.MASKED)
        if how == "no padding":
            return att.additive_mask(B, ctx.start, T, S, None, W if sliding else None)
        if W is None:
            return None
        window = {"wider": W + 1 if sliding else None, "narrower": W - 1 if sliding else None,
                  "everywhere": W, "nowhere": None, "swapped": None if sliding else W}[how]
        return att.layer_mask(ctx, B, T, S, window)
    return compute


def context(tile=False, merge="heads-first"):
    def compute(ctx, p, v):
        return att.context(ctx, p, v, kv_index(ctx, tile), merge)
    return compute


def fused(scale=None, tile=False, keys="rope", full=False, cache=True):
    """A fused attention's replay (the context from q_rope, the cached k_rope and v_proj, and the mask)."""
    def compute(ctx, q, k, v, recorded_mask=None):
        s = SCALES[scale](ctx.config.head_dim) if scale else None
        if keys == "twice":
            k = rotate_cached(ctx, k)
        if full:        # the full causal mask on a sliding layer
            if ctx.config.layer_types[ctx.layer] != "sliding_attention":
                return None
            return att.fused_context(ctx, q, k, v, None, s, kv_index(ctx, tile), window=None)
        if not cache:   # the keys and values of this pass only
            if ctx.start == 0:
                return None
            return att.fused_context(ctx, q, k, v, None, s, kv_index(ctx, tile), S=q.shape[2])
        return att.fused_context(ctx, q, k, v, recorded_mask, s, kv_index(ctx, tile))
    return compute


def nan_rows(base):
    """A mask of −inf: a query that sees no key (left padding) gets a NaN row, which reaches the keys and values
    of the next layer and, through 0 · NaN, every query of that sequence. `base` computes the rest."""
    def compute(ctx, *inputs):
        if ctx.attention_mask is None or ctx.attention_mask.all():
            return None
        out = np.array(base(ctx, *inputs), dtype=np.float64)
        out[~ctx.attention_mask.astype(bool).all(axis=1)] = np.nan                     # the padded sequences
        return out
    return compute


def merged_dims_first(ctx, x):
    """A context merged (H, HD) as it would be merged (HD, H).  [B, T, H·HD] -> [B, T, HD·H]"""
    B, T, _ = x.shape
    return x.reshape(B, T, ctx.config.num_attention_heads, -1).transpose(0, 1, 3, 2).reshape(B, T, -1)


def restore_merge(ctx, x):
    """A context stored merged (HD, H) back to (H, HD)."""
    B, T, _ = x.shape
    return x.reshape(B, T, -1, ctx.config.num_attention_heads).transpose(0, 1, 3, 2).reshape(B, T, -1)


# -- norms, products, the MLP -------------------------------------------------------------------------


def norm(how):
    def compute(ctx, x, w):
        eps = ctx.config.rms_norm_eps
        if how == "skipped":
            return x
        if how == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        ms = (x * x).mean(-1, keepdims=True)
        if how == "eps outside":
            return rec.scale_normalised(ctx, x / (np.sqrt(ms) + eps), w)
        with np.errstate(divide="ignore", invalid="ignore"):   # no eps on a row of zeros: NaN, not a match
            h = x / np.sqrt(ms + {"llama eps": 1e-5, "no eps": 0.0}.get(how, eps))
        if how == "1 + w":
            return ctx.r((1 + ctx.weight(w)) * ctx.r(h))
        if how == "no weight":
            return ctx.r(h)
        return rec.scale_normalised(ctx, h, w)
    return compute


def linear(how):
    def compute(ctx, x, w, b=None):
        if how == "no bias":
            return rec.linear(ctx, x, w, None)
        W = ctx.weight(w)
        if W.shape[0] != W.shape[1]:
            return None
        return rec.add_bias(ctx, x @ W, b)           # x W instead of x Wᵀ
    return compute


def act(kind=None, of_up=False):
    def compute(ctx, g, up=None):
        x = up if of_up else g
        with np.errstate(over="ignore"):
            if kind == "sigmoid":
                return ctx.r(1 / (1 + np.exp(-x)))
            return ctx.r(rec.activation(ctx, x, kind))
    return compute


def act_up(kind=None, swapped=False):
    def compute(ctx, g, u):
        g, u = (u, g) if swapped else (g, u)
        with np.errstate(over="ignore"):
            return ctx.r(rec.activation(ctx, g, kind) * u)
    return compute


def square(heads):
    """Whether a projection of `heads` heads is square (only then can its weight be used untransposed)."""
    return lambda config: getattr(config, heads) * config.head_dim == config.hidden_size
