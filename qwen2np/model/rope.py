"""Rotary position embeddings (RoPE), with the scaling types of transformers 5.24: default, linear, dynamic, yarn.

Each pair of dimensions (i, i + HD/2) of a query or key is rotated by the angle position · inv_freq[i].

subtle: Qwen2 splits a head in two *halves* (rotate_half), it does not interleave even and odd
dimensions as the RoPE paper and GGML's "norm" mode do (docs/numerics.md).

subtle: in float32, transformers computes inv_freq and the angles in float32 (even for a float64
model). qwen2np's float32 mode does the same, operation for operation; its float64 mode computes them in
float64, which is more exact (docs/float64.md).

>>> import numpy as np
>>> inv_freq, scale = inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, head_dim=4,
...                                       max_position_embeddings=32, dtype=np.float32)
>>> inv_freq.tolist(), scale
([1.0, 0.009999999776482582], 1.0)
"""

import math

import numpy as np

from ..weights.backend import array_module


def _default(rope, head_dim, dtype, base=None):
    base = dtype.type(rope["rope_theta"] if base is None else base)
    exponents = np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim)   # [HD/2]
    return dtype.type(1) / (base ** exponents)


def _linear(rope, head_dim, max_position_embeddings, dtype, seq_len):
    return _default(rope, head_dim, dtype) / dtype.type(rope["factor"]), 1.0


def _dynamic(rope, head_dim, max_position_embeddings, dtype, seq_len):
    """NTK-aware scaling: the base grows with the sequence length once it passes max_position_embeddings."""
    factor, t = dtype.type(rope["factor"]), dtype.type
    seq_len = t(max(seq_len or max_position_embeddings, max_position_embeddings))
    # subtle: transformers evaluates this with the sequence length as a tensor, so in float32
    base = t(rope["rope_theta"]) * ((factor * seq_len / t(max_position_embeddings)) - (factor - t(1))) ** t(
        head_dim / (head_dim - 2)
    )
    return _default(rope, head_dim, dtype, base=base), 1.0


def _yarn(rope, head_dim, max_position_embeddings, dtype, seq_len):
    """YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp between, and scale cos/sin."""
    base, factor = rope["rope_theta"], rope["factor"]
    original_max = rope["original_max_position_embeddings"]
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension whose wavelength makes `num_rotations` turns
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does

    pos_freqs = dtype.type(base) ** (np.arange(0, head_dim, 2, dtype=dtype) / dtype.type(head_dim))  # [HD/2]
    extrapolation = dtype.type(1) / pos_freqs
    interpolation = dtype.type(1) / (dtype.type(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=dtype) - dtype.type(low)) / dtype.type(high - low), 0, 1)
    extrapolation_weight = dtype.type(1) - ramp
    inv_freq = interpolation * (dtype.type(1) - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(dtype), attention_factor


_ROPE_FUNCTIONS = {
    "default": lambda rope, hd, max_pos, dtype, seq_len: (_default(rope, hd, dtype), 1.0),
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
}


def inverse_frequencies(rope, head_dim, max_position_embeddings, dtype, seq_len=None):
    """inv_freq [HD/2] and the factor that scales cos and sin, for the config's `rope_parameters`."""
    dtype = np.dtype(dtype)
    inv_freq, attention_scaling = _ROPE_FUNCTIONS[rope["rope_type"]](
        rope, head_dim, max_position_embeddings, dtype, seq_len
    )
    return inv_freq.astype(dtype, copy=False), attention_scaling


def rotary_cos_sin(position_ids, inv_freq, attention_scaling, dtype):
    """cos and sin of the rotation angles.  position_ids [B, T] -> cos, sin [B, T, HD]"""
    xp = array_module(inv_freq)
    freqs = position_ids[..., None].astype(inv_freq.dtype) * inv_freq   # [B, T, 1] * [HD/2] -> [B, T, HD/2]
    emb = xp.concatenate([freqs, freqs], axis=-1)                        # -> [B, T, HD] (halves, not interleaved)
    cos, sin = xp.cos(emb), xp.sin(emb)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate queries or keys.  x [B, n_heads, T, HD], cos/sin [B, T, HD] -> [B, n_heads, T, HD]"""
    cos, sin = cos[:, None], sin[:, None]            # [B, 1, T, HD]: the same angles for every head
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding:
    """The rotation tables of one model. Stateless except for the `dynamic` type, which transformers
    makes stateful: it grows inv_freq when a forward sees positions beyond what it has seen, and resets
    it when a later forward is back within max_position_embeddings. qwen2np reproduces that.
    """

    def __init__(self, config, dtype, xp=np):
        self.rope = config.rope_parameters
        self.head_dim = config.head_dim
        self.max_position_embeddings = config.max_position_embeddings
        self.dtype = np.dtype(dtype)                  # of cos and sin
        # subtle: half-precision models compute the tables in float32 and round cos and sin (transformers)
        self.table_dtype = np.dtype(np.float32) if self.dtype.itemsize < 4 else self.dtype
        self.xp = xp
        inv_freq, self.attention_scaling = inverse_frequencies(
            self.rope, self.head_dim, self.max_position_embeddings, self.table_dtype
        )
        self.inv_freq = self.original_inv_freq = xp.asarray(inv_freq)
        self.max_seq_len_cached = self.max_position_embeddings

    def __call__(self, position_ids):
        """position_ids [B, T] (a NumPy array) -> cos, sin [B, T, HD]"""
        if self.rope["rope_type"] == "dynamic":
            self._dynamic_update(int(position_ids.max()) + 1)
        return rotary_cos_sin(self.xp.asarray(position_ids), self.inv_freq, self.attention_scaling, self.dtype)

    def _dynamic_update(self, seq_len):
        cached = self.max_seq_len_cached
        if seq_len > cached:  # growth
            inv_freq, self.attention_scaling = inverse_frequencies(
                self.rope, self.head_dim, self.max_position_embeddings, self.table_dtype, seq_len=seq_len
            )
            self.inv_freq = self.xp.asarray(inv_freq)
            self.max_seq_len_cached = seq_len
        if seq_len < self.max_position_embeddings and cached > self.max_position_embeddings:  # reset
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.max_position_embeddings
