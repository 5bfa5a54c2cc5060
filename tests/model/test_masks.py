"""Attention masks (qwen2np/model/masks.py): which keys each query sees, as an additive bias."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen2np import DynamicCache, Qwen2Config
from qwen2np.errors import ModelInputError
from qwen2np.model.attention import grouped_query_attention
from qwen2np.model.masks import (CausalSpan, attention_bias, build_attention_bias, layer_masks, packed_sequence_ids,
                                 packed_visibility, visibility)

F32 = np.dtype(np.float32)


def config(**kwargs):
    return Qwen2Config(**{**dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1), **kwargs})


def visible(bias):
    """The boolean visibility an additive bias encodes."""
    return np.asarray(bias) == 0


def test_a_query_sees_itself_and_every_earlier_key():
    v = visibility(q_start=0, q_len=5, kv_start=0, kv_len=5)
    assert np.array_equal(v, np.tril(np.ones((5, 5), bool)))
    # queries 3, 4 after 3 past positions, against keys 0..4: by index in the whole sequence
    assert np.array_equal(visibility(3, 2, 0, 5), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@given(W=st.integers(1, 6), q_start=st.integers(0, 10), q_len=st.integers(1, 8))
def test_a_sliding_window_of_W_keys_includes_the_query_itself(W, q_start, q_len):
    """subtle: W keys including the query (k > q - W), not W + 1 (docs/sliding-window.md)."""
    kv_len = q_start + q_len
    v = visibility(q_start, q_len, 0, kv_len, sliding_window=W)
    for row in range(q_len):
        q = q_start + row
        seen = np.flatnonzero(v[row])
        assert seen.tolist() == list(range(max(0, q - W + 1), q + 1))   # exactly min(q + 1, W) keys, ending at q


def test_padding_hides_a_key_from_every_query():
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 1]])
    bias = build_attention_bias(2, 0, 4, 0, 4, mask, None, None, F32)
    assert bias.shape == (2, 1, 4, 4) and bias.dtype == F32
    v = visible(bias)[:, 0]
    assert not v[0, :, 0].any() and not v[1, :, 2].any()                # the padded key, for every query
    assert np.array_equal(v[0, 1:, 1:], np.tril(np.ones((3, 3), bool)))  # the rest stays causal


def test_hidden_is_finfo_min_not_minus_infinity():
    """subtle: transformers fills with finfo(dtype).min; -inf would turn an all-hidden row into NaN."""
    v = np.array([[True, False]])
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        bias = attention_bias(v, np.dtype(dtype))
        assert bias.dtype == np.dtype(dtype)
        assert bias[0, 0] == 0 and bias[0, 1] == ml_dtypes.finfo(dtype).min and np.isfinite(bias).all()


def test_a_row_of_padding_only_attends_uniformly_instead_of_nan():
    """A left-padding query sees no key at all: every score gets finfo.min, the softmax is uniform."""
    mask = np.array([[0, 0, 1, 1]])
    bias = build_attention_bias(1, 0, 4, 0, 4, mask, None, None, F32)
    assert not visible(bias)[0, 0, 0].any()                              # query 0 sees nothing
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 4, 4), dtype=np.float32) for _ in range(3))
    _, probs = grouped_query_attention(q, k[:, :1], v[:, :1], bias, scaling=0.5)
    assert np.isfinite(probs).all()
    assert np.allclose(probs[0, :, 0], 0.25, atol=0, rtol=1e-6)          # uniform over the 4 keys


def test_packed_sequences_never_see_each_other():
    positions = np.array([[0, 1, 2, 0, 1, 0]])
    ids = packed_sequence_ids(positions)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2]]
    v = packed_visibility(positions, ids)[0]
    expected = np.zeros((6, 6), bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        expected[lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), bool))
    assert np.array_equal(v, expected)
    assert packed_sequence_ids(np.array([[4, 5, 6]])) is None            # no restart: not packed


def test_packed_sequences_are_detected_only_without_a_mask_or_a_cache():
    """As transformers: positions that restart make separate sequences only with no attention_mask and no
    cache; otherwise masks go by index in the row."""
    c = config()
    positions = np.array([[0, 1, 0, 1]])
    packed = layer_masks(c, None, positions, None, 1, 4, F32)["full_attention"]
    assert not visible(packed.bias)[0, 0, 2, :2].any() and packed.span is None
    for mask, cache in ((np.ones((1, 4), int), None), (None, DynamicCache.from_config(c))):
        plain = layer_masks(c, mask, positions, cache, 1, 4, F32)["full_attention"]
        assert np.array_equal(visible(plain.bias)[0, 0], np.tril(np.ones((4, 4), bool)))


def test_one_mask_per_layer_type_with_its_window():
    c = config(num_hidden_layers=3, use_sliding_window=True, sliding_window=2, max_window_layers=1)
    masks = layer_masks(c, None, None, None, 1, 4, F32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert np.array_equal(visible(masks["full_attention"].bias)[0, 0], visibility(0, 4, 0, 4))
    assert np.array_equal(visible(masks["sliding_attention"].bias)[0, 0], visibility(0, 4, 0, 4, 2))
    assert masks["sliding_attention"].span == CausalSpan(0, 0, 2)


def test_a_sliding_layer_with_a_cache_masks_only_the_keys_it_kept():
    c = config(num_hidden_layers=2, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    cache = DynamicCache.from_config(c)
    k = np.zeros((1, 1, 5, 4), np.float32)
    for layer in range(2):
        cache.update(k, k, layer)                      # 5 positions seen; the sliding layer kept W - 1 = 2
    masks = layer_masks(c, None, None, cache, 1, 2, F32)
    full, sliding = masks["full_attention"], masks["sliding_attention"]
    assert full.bias.shape == (1, 1, 2, 7) and sliding.bias.shape == (1, 1, 2, 4)
    assert np.array_equal(visible(sliding.bias)[0, 0], visibility(5, 2, 3, 4, 3))   # keys 3..6
    assert sliding.span == CausalSpan(5, 3, 3) and full.span == CausalSpan(5, 0, None)


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (1, 1, 3, 3)])
def test_a_custom_4d_mask_is_used_as_given(shape):
    custom = np.random.default_rng(1).standard_normal(shape)       # float64: cast to the model's dtype
    masks = layer_masks(config(), custom, None, None, 2, 3, F32)
    assert masks["full_attention"].bias.dtype == F32 and masks["full_attention"].span is None
    assert np.array_equal(masks["full_attention"].bias, custom.astype(np.float32))


@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (3, 1, 3, 3), (2, 2, 3, 3)])
def test_a_custom_4d_mask_of_another_shape_is_refused(shape):
    with pytest.raises(ModelInputError, match=r"a 4D mask must have shape \[B, 1, T, S\] = \(2, 1, 3, 3\)"):
        layer_masks(config(), np.zeros(shape, np.float32), None, None, 2, 3, F32)


@given(past=st.integers(0, 12), T=st.integers(1, 12), window=st.one_of(st.none(), st.integers(1, 6)),
       data=st.data())
def test_a_causal_span_names_exactly_the_keys_a_block_of_rows_may_see(past, T, window, data):
    """CausalSpan.keys(r0, r1) holds every key rows r0..r1-1 see, and starts at the first key row r0 sees
    and ends at the last key row r1-1 sees: a block skips only hidden keys."""
    kv_start = 0 if window is None else past - min(past, window - 1)   # what a sliding cache layer keeps
    kv_len = past + T - kv_start
    v = visibility(past, T, kv_start, kv_len, window)
    r0 = data.draw(st.integers(0, T - 1))
    r1 = data.draw(st.integers(r0 + 1, T))
    k0, k1 = CausalSpan(past, kv_start, window).keys(r0, r1)
    assert 0 <= k0 < k1 <= kv_len
    assert not v[r0:r1, :k0].any() and not v[r0:r1, k1:].any()
    assert v[r0, k0] and v[r1 - 1, k1 - 1]


@pytest.mark.oracle
@pytest.mark.parametrize("window", [None, 1, 3])
def test_visibility_is_transformers_mask_functions(oracle, window):
    import torch
    from transformers import masking_utils

    rule = (masking_utils.causal_mask_function if window is None
            else masking_utils.sliding_window_causal_mask_function(window))
    q_start, q_len, kv_start, kv_len = 4, 5, 2, 7
    theirs = np.array([[bool(rule(0, 0, torch.tensor(q_start + q), torch.tensor(kv_start + k)))
                        for k in range(kv_len)] for q in range(q_len)])
    assert np.array_equal(visibility(q_start, q_len, kv_start, kv_len, window), theirs)
