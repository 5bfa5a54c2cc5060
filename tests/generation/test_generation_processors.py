"""Each logits processor equals transformers 5.24's on the same scores (hypothesis-drawn, with ties,
batches and left padding).

Exactness: repetition penalty, temperature and top-k are bit-identical. Top-p and min-p decide on
probabilities from a float32 softmax, which torch computes with its own exp and summation order; the two
agree except when a cumulative probability lands within float32 rounding of the threshold, so those
draws are skipped (`assume`), and ties straddling the top-p boundary are ordered arbitrarily by torch's
unstable sort (see `top_p_filter`), so there only the tokens with the boundary score may differ.
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwen2np.generation import logits_process as lp

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def torch_lp(oracle):
    import transformers.generation.logits_process as m

    return m


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


@st.composite
def score_batches(draw, max_v=80):
    B = draw(st.integers(1, 3))
    V = draw(st.integers(2, max_v))
    if draw(st.booleans()):  # few distinct values: many ties
        values = st.sampled_from([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0])
    else:
        values = st.floats(-30, 30, allow_nan=False, width=32)
    flat = draw(st.lists(values, min_size=B * V, max_size=B * V))
    return np.array(flat, dtype=np.float32).reshape(B, V)


@st.composite
def ids_and_mask(draw, B, V):
    S = draw(st.integers(1, 12))
    ids = np.array(draw(st.lists(st.integers(0, V + 2), min_size=B * S, max_size=B * S)), dtype=np.int64)
    pads = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    mask = np.ones((B, S), dtype=np.int64)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return ids.reshape(B, S), mask


@settings(max_examples=150)
@given(data=st.data(), penalty=st.floats(0.05, 5.0))
def test_repetition_penalty_matches(torch_lp, data, penalty):
    scores = data.draw(score_batches())
    B, V = scores.shape
    ids, mask = data.draw(ids_and_mask(B, V))
    ignore = np.argmax(mask != 0, axis=1)  # what 5.24's generate passes: the left-padding length
    import torch

    ref = torch_lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=_t(ignore))(
        _t(ids), _t(scores.copy())
    ).numpy()
    ours = lp.repetition_penalty(scores, ids, penalty, prompt_ignore_length=ignore)
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.float32
    # and without padding information, every position counts
    ref0 = torch_lp.RepetitionPenaltyLogitsProcessor(penalty)(_t(ids), _t(scores.copy())).numpy()
    np.testing.assert_array_equal(lp.repetition_penalty(scores, ids, penalty), ref0)
    del torch


@settings(max_examples=100)
@given(scores=score_batches(), t=st.floats(0.05, 5.0))
def test_temperature_matches(torch_lp, scores, t):
    ref = torch_lp.TemperatureLogitsWarper(t)(None, _t(scores)).numpy()
    ours = lp.temperature(scores, t)
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.float32


@settings(max_examples=150)
@given(scores=score_batches(), k=st.integers(1, 90))
def test_top_k_matches_with_ties(torch_lp, scores, k):
    ref = torch_lp.TopKLogitsWarper(k)(None, _t(scores)).numpy()
    np.testing.assert_array_equal(lp.top_k_filter(scores, k), ref)


def _softmax64(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


@settings(max_examples=200)
@given(scores=score_batches(), p=st.floats(0.01, 0.999))
def test_top_p_matches(torch_lp, scores, p):
    for row in scores:  # skip draws whose decision sits within rounding of the threshold
        cum = np.cumsum(np.sort(_softmax64(row)))
        assume(np.min(np.abs(cum - (1 - p))) > 1e-5)
    ref = torch_lp.TopPLogitsWarper(p)(None, _t(scores)).numpy()
    ours = lp.top_p_filter(scores, p)
    for b in range(scores.shape[0]):
        kept_ref, kept_ours = np.isfinite(ref[b]), np.isfinite(ours[b])
        assert kept_ref.sum() == kept_ours.sum()
        differ = kept_ref != kept_ours
        if differ.any():  # only a tie straddling the boundary may be resolved differently
            boundary = ours[b][kept_ours].min()
            assert np.all(scores[b][differ] == boundary)
        np.testing.assert_array_equal(ours[b][kept_ours], scores[b][kept_ours])


@settings(max_examples=150)
@given(scores=score_batches(), m=st.floats(0.0, 1.0))
def test_min_p_matches(torch_lp, scores, m):
    for row in scores:
        probs = _softmax64(row)
        ratio = probs / probs.max()
        assume(np.min(np.abs(ratio - m)) > 1e-5)
    ref = torch_lp.MinPLogitsWarper(m)(None, _t(scores)).numpy()
    np.testing.assert_array_equal(lp.min_p_filter(scores, m), ref)


def test_processor_order_matches_transformers(oracle):
    """Temperature, top-k, top-p, min-p chained: the same filter as transformers' warper list."""
    import transformers.generation.logits_process as m

    rng = np.random.default_rng(5)
    scores = (rng.standard_normal((2, 500)) * 3).astype(np.float32)
    ids = rng.integers(0, 500, size=(2, 30))
    chain = m.LogitsProcessorList(
        [m.RepetitionPenaltyLogitsProcessor(1.1), m.TemperatureLogitsWarper(0.7),
         m.TopKLogitsWarper(40), m.TopPLogitsWarper(0.8), m.MinPLogitsWarper(0.05)]
    )
    ref = chain(_t(ids), _t(scores.copy())).numpy()

    from qwen2np.generation import GenerationConfig

    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.8, min_p=0.05,
                          repetition_penalty=1.1)
    ours = lp.LogitsProcessorList(lp.build_logits_processors(gc, prompt_length=30))(ids, scores)
    np.testing.assert_array_equal(ours, ref)
