"""RoPE tables from a config, as transformers 5.24 computes them: the second implementation the golden tools
use (recipes.py), sharing no code with qwen2np/model/rope.py.

inv_freq[i] = 1 / θ^(2i / HD), scaled by the config's `rope_parameters` (default, linear, dynamic, yarn:
/work/shared/reference/hf-qwen2-behavior.md §4.3), then cos and sin of position · inv_freq, the two halves
of a head repeating the same angles.

subtle: transformers computes inv_freq and the angles in float32; `dtype` float32 does the same, step by
step. Isolation computes them in float64 and rounds to the dump's dtype (docs/porting.md).

>>> import numpy as np
>>> from types import SimpleNamespace
>>> config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, head_dim=4,
...                          max_position_embeddings=32)
>>> cos, sin = rotary_tables(config, np.array([[0, 1]]), np.float64)     # [1, T, HD]: halves repeated
>>> cos.round(4).tolist()
[[[1.0, 1.0, 1.0, 1.0], [0.5403, 1.0, 0.5403, 1.0]]]
"""

import math

import numpy as np

from ..errors import Qwen2npError


def inverse_frequencies(rope, head_dim, max_position_embeddings, dtype, seq_len=None):
    """(inv_freq [HD/2], the factor on cos and sin) of a config's `rope_parameters`, computed in `dtype`
    the way transformers' ROPE_INIT_FUNCTIONS do (float32 there; isolation computes in float64).
    `seq_len` is the length a dynamic RoPE has seen (None: max_position_embeddings)."""
    t, kind = np.dtype(dtype).type, rope["rope_type"]
    theta, exponents = rope["rope_theta"], np.arange(0, head_dim, 2, dtype=dtype) / t(head_dim)   # [HD/2]
    if kind == "default":
        return t(1) / (t(theta) ** exponents), 1.0
    if kind == "linear":
        return t(1) / (t(theta) ** exponents) / t(rope["factor"]), 1.0
    if kind == "dynamic":   # NTK: a larger base once the sequence outgrows max_position_embeddings
        factor = rope["factor"]
        if seq_len is None:   # at init transformers computes the base in Python floats
            base = t(theta * ((factor * max_position_embeddings / max_position_embeddings) - (factor - 1))
                     ** (head_dim / (head_dim - 2)))
        else:                 # in a forward pass, with the length as a tensor, in `dtype`
            n, f = t(max(seq_len, max_position_embeddings)), t(factor)
            base = t(theta) * ((f * n / t(max_position_embeddings)) - (f - t(1))) ** t(head_dim / (head_dim - 2))
        return t(1) / (base ** exponents), 1.0
    if kind == "yarn":
        return _yarn(rope, head_dim, dtype)
    raise Qwen2npError(f"rope_type {kind!r} is not one qwen2np recomputes")


def _yarn(rope, head_dim, dtype):
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between; cos and sin scaled."""
    t, theta, factor = np.dtype(dtype).type, rope["rope_theta"], rope["factor"]
    scaling = rope.get("attention_factor")
    if scaling is None:
        def mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        scaling = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):   # the dimension whose wavelength turns `rotations` times in the original length
        original = rope["original_max_position_embeddings"]
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001   # as transformers: no division by zero
    pos_freqs = t(theta) ** (np.arange(0, head_dim, 2, dtype=dtype) / t(head_dim))             # [HD/2]
    ramp = np.clip((np.arange(head_dim // 2, dtype=dtype) - t(low)) / t(high - low), 0, 1)
    extrapolated = t(1) - ramp                       # the share of each frequency kept as it is
    inv_freq = t(1) / (t(factor) * pos_freqs) * (t(1) - extrapolated) + t(1) / pos_freqs * extrapolated
    return inv_freq.astype(dtype), scaling


def rotary_tables(config, positions, dtype):
    """cos, sin of the angles position · inv_freq, in `dtype`.  positions [B, T] -> cos, sin [B, T, HD]

    subtle: a dynamic RoPE is stateful in transformers (inv_freq grows with the longest sequence seen);
    the positions of a dump only grow, so the state at a pass is that of its own length."""
    rope = config.rope_parameters
    seq_len = int(positions.max()) + 1 if rope["rope_type"] == "dynamic" else None
    inv_freq, scaling = inverse_frequencies(rope, config.head_dim, config.max_position_embeddings, dtype,
                                            seq_len)
    freqs = positions[..., None].astype(dtype) * inv_freq.astype(dtype)     # [B, T, 1] * [HD/2] -> [B, T, HD/2]
    # subtle: the two halves repeat the angles (rotate_half below), not interleaved pairs (docs/numerics.md)
    angles = np.concatenate([freqs, freqs], axis=-1)                         # -> [B, T, HD]
    cos, sin = np.cos(angles), np.sin(angles)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)
