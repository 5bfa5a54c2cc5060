"""Rotary position embeddings (qwen2np/model/rope.py): half-split rotation, transformers' scaling types."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen2np import Qwen2Config
from qwen2np.model.rope import RotaryEmbedding, apply_rope, inverse_frequencies, rotary_cos_sin

HD = 8
SCALINGS = {"default": None, "linear": {"type": "linear", "factor": 2.0},
            "dynamic": {"type": "dynamic", "factor": 2.0},
            "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}


def config_kwargs(rope, head_dim=HD, max_positions=32):
    kwargs = dict(vocab_size=8, hidden_size=2 * head_dim, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                  rope_theta=10000.0)
    if SCALINGS[rope] is not None:
        kwargs["rope_scaling"] = SCALINGS[rope]
    return kwargs


def test_pairs_are_split_in_halves_not_interleaved():
    """subtle: dimension i turns with dimension i + HD/2 (rotate_half), not with i + 1 (docs/numerics.md)."""
    inv_freq = np.ones(HD // 2, np.float32)
    cos, sin = rotary_cos_sin(np.array([[1]]), inv_freq, 1.0, np.float32)          # angle 1 everywhere
    x = np.zeros((1, 1, 1, HD), np.float32)
    x[..., 0] = 1                                                                    # dimension 0 alone
    y = apply_rope(x, cos, sin)[0, 0, 0]
    assert np.isclose(y[0], np.cos(1)) and np.isclose(y[HD // 2], np.sin(1))         # its partner: HD/2
    assert not np.delete(y, [0, HD // 2]).any()                                      # not dimension 1


@given(m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 40))
def test_scores_depend_only_on_the_distance_between_positions(m, n, shift):
    """What RoPE is for: q(m) · k(n) = q(m + s) · k(n + s)."""
    rng = np.random.default_rng(m * 1000 + n)
    q, k = (rng.standard_normal((1, 1, 1, HD)) for _ in range(2))
    inv_freq, _ = inverse_frequencies({"rope_type": "default", "rope_theta": 100.0}, HD, 64, np.float64)

    def score(a, b):
        ca, sa = rotary_cos_sin(np.array([[a]]), inv_freq, 1.0, np.float64)
        cb, sb = rotary_cos_sin(np.array([[b]]), inv_freq, 1.0, np.float64)
        return float((apply_rope(q, ca, sa) * apply_rope(k, cb, sb)).sum())

    assert np.isclose(score(m, n), score(m + shift, n + shift), rtol=1e-9, atol=1e-9)


def test_default_inverse_frequencies_are_theta_to_the_minus_2i_over_HD():
    inv_freq, scale = inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, HD, 32, np.float64)
    assert np.allclose(inv_freq, 10000.0 ** (-np.arange(0, HD, 2) / HD), rtol=1e-15) and scale == 1.0
    linear, _ = inverse_frequencies({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, HD, 32, np.float64)
    assert np.allclose(linear, inv_freq / 4, rtol=1e-15)                      # positions slowed 4 times


@pytest.mark.parametrize("rope", SCALINGS)
def test_cos_and_sin_have_the_shape_of_the_positions(rope):
    emb = RotaryEmbedding(Qwen2Config(**config_kwargs(rope)), np.float32)
    for positions in (np.arange(5)[None], np.array([[0, 1, 2], [4, 5, 6]])):
        cos, sin = emb(positions)
        assert cos.shape == sin.shape == (*positions.shape, HD) and cos.dtype == sin.dtype == np.float32
        assert np.array_equal(cos[..., :HD // 2], cos[..., HD // 2:])               # the halves share angles
    cos, sin = emb(np.array([[3]]))
    assert np.allclose(cos ** 2 + sin ** 2, emb.attention_scaling ** 2, rtol=1e-6)


def test_position_ids_pick_the_angles_not_the_order():
    emb = RotaryEmbedding(Qwen2Config(**config_kwargs("default")), np.float64)
    cos, sin = emb(np.array([[0, 1, 2, 3, 4, 5]]))
    left_padded, _ = emb(np.array([[0, 0, 0, 1, 2, 3]]))       # a row's positions, not its indices
    assert np.array_equal(left_padded[0, 3:], cos[0, 1:4]) and np.array_equal(left_padded[0, :3], cos[0, [0, 0, 0]])


def test_float32_tables_are_computed_in_float32_and_float64_ones_in_float64():
    """subtle: in float32, transformers computes inv_freq and the angles in float32; qwen2np's float32 does
    the same, its float64 mode computes them in float64 (docs/float64.md). Half precision: float32 tables,
    rounded."""
    c = Qwen2Config(**config_kwargs("default"))
    f32, f64 = RotaryEmbedding(c, np.float32), RotaryEmbedding(c, np.float64)
    assert f32.inv_freq.dtype == np.float32 and f64.inv_freq.dtype == np.float64
    t = np.float32                                                    # operation by operation, in float32
    assert np.array_equal(f32.inv_freq, t(1) / (t(10000.0) ** (np.arange(0, HD, 2, dtype=t) / t(HD))))
    assert not np.array_equal(f32.inv_freq.astype(np.float64), f64.inv_freq)        # float32 rounding shows
    half = RotaryEmbedding(c, np.float16)
    assert half.inv_freq.dtype == np.float32 and half(np.array([[7]]))[0].dtype == np.float16


def test_dynamic_scaling_grows_past_max_positions_and_resets():
    emb = RotaryEmbedding(Qwen2Config(**config_kwargs("dynamic")), np.float32)
    original = emb.inv_freq
    emb(np.arange(20)[None])
    assert emb.inv_freq is original                                    # within 32 positions: unchanged
    emb(np.arange(50)[None])
    assert (emb.inv_freq[1:] < original[1:]).all()                     # beyond: a larger base, slower turns
    emb(np.arange(20)[None])
    assert emb.inv_freq is original                                    # back within: reset, as transformers


@pytest.mark.oracle
@pytest.mark.parametrize("rope", SCALINGS)
def test_inverse_frequencies_and_scaling_are_transformers_bit_for_bit(oracle, rope):
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    hf_config = oracle.Qwen2Config(**config_kwargs(rope))
    theirs = Qwen2RotaryEmbedding(hf_config)
    ours = RotaryEmbedding(Qwen2Config.from_dict(hf_config.to_dict()), np.float32)
    assert np.array_equal(ours.inv_freq, theirs.inv_freq.numpy())
    assert ours.attention_scaling == theirs.attention_scaling
    positions = np.array([[0, 1, 5, 31], [2, 3, 4, 30]])
    cos, sin = ours(positions)
    their_cos, their_sin = theirs(torch.zeros(1), torch.from_numpy(positions))
    # the angles are the same float32 numbers; NumPy's cos and sin may round the last bit differently
    np.testing.assert_allclose(cos, their_cos.numpy(), rtol=0, atol=2.5e-7)
    np.testing.assert_allclose(sin, their_sin.numpy(), rtol=0, atol=2.5e-7)


@pytest.mark.oracle
def test_dynamic_growth_is_transformers_within_a_float32_rounding(oracle):
    """Past max_position_embeddings, dynamic scaling recomputes its base; transformers raises a float32 to
    the power dim / (dim - 2) given as a Python float, qwen2np to that exponent rounded to float32: the
    grown inv_freq may differ by one unit in the last place (not bit for bit, unlike every other type)."""
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    hf_config = oracle.Qwen2Config(**config_kwargs("dynamic", head_dim=32, max_positions=64))
    theirs = Qwen2RotaryEmbedding(hf_config)
    ours = RotaryEmbedding(Qwen2Config.from_dict(hf_config.to_dict()), np.float32)
    positions = np.arange(200)[None]
    ours(positions)
    theirs(torch.zeros(1), torch.from_numpy(positions))
    np.testing.assert_allclose(ours.inv_freq, theirs.inv_freq.numpy(), rtol=2.5e-7, atol=0)
    assert ours.max_seq_len_cached == theirs.max_seq_len_cached == 200
    ours(positions[:, :10])
    theirs(torch.zeros(1), torch.from_numpy(positions[:, :10]))
    assert np.array_equal(ours.inv_freq, theirs.inv_freq.numpy())          # reset: bit for bit again
