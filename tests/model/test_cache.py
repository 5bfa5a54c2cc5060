"""The KV cache (qwen2np/model/cache.py): full and sliding layers, growth, mask sizes, rollback, fit checks."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qwen2np
from qwen2np import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import CacheError
from qwen2np.model.cache import CacheLayer, kv_bytes
from tiny_model import TINY, cache_contents, ids, same_contents, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def positions(start, T, B=1, KV=2, HD=4):
    """Keys whose every entry is their position in the sequence: [B, KV, T, HD]."""
    return np.broadcast_to(np.arange(start, start + T, dtype=np.float32)[None, None, :, None],
                           (B, KV, T, HD)).copy()


@given(steps=st.lists(st.integers(1, 9), min_size=1, max_size=25), window=st.one_of(st.none(), st.integers(1, 6)))
def test_a_layer_keeps_what_transformers_keeps(steps, window):
    """A full layer keeps every position; a sliding one the last W - 1, and each update returns the kept
    keys and the new ones, which the step attends over."""
    layer, seen = CacheLayer(window), 0
    for T in steps:
        keys, values = layer.update(positions(seen, T), -positions(seen, T))
        kept = seen if window is None else min(seen, window - 1)
        assert np.array_equal(keys[0, 0, :, 0], np.arange(seen - kept, seen + T))   # kept + new, in order
        assert np.array_equal(values, -keys)
        seen += T
        kept = seen if window is None else min(seen, window - 1)
        assert layer.seen == seen and np.array_equal(layer.keys[0, 0, :, 0], np.arange(seen - kept, seen))


def test_appending_is_amortized_and_copies_no_history():
    """A decode step writes one position into spare room: the kept keys stay where they are, and the
    buffer is reallocated O(log n) times for n steps."""
    layer = CacheLayer()
    layer.update(positions(0, 5), positions(0, 5))
    moves = 0
    for step in range(5, 1000):
        before = layer.keys
        layer.update(positions(step, 1), positions(step, 1))
        moves += not np.shares_memory(before, layer.keys)
    assert moves <= np.log2(1000) + 1
    assert np.array_equal(layer.keys[0, 0, :, 0], np.arange(1000))


@given(window=st.integers(1, 6), steps=st.integers(1, 200))
def test_a_sliding_layer_stays_bounded(window, steps):
    """A sliding layer keeps W - 1 positions however long it decodes: its buffer does not grow with them."""
    layer = CacheLayer(window)
    for step in range(steps):
        layer.update(positions(step, 1), positions(step, 1))
    assert layer.keys.shape[2] == min(steps, window - 1) and layer._k.shape[2] <= 64


@pytest.mark.parametrize("window", [None, 4])
def test_mask_sizes_say_which_keys_the_next_pass_attends_over(window):
    """(S, offset): the next pass of 2 positions attends over S keys, the first of them at sequence index
    `offset`: exactly the keys `update` then returns."""
    layer = CacheLayer(window)
    for T in (2, 1, 7, 1):
        S, offset = layer.get_mask_sizes(2)
        kept = layer.seen if window is None else min(layer.seen, window - 1)
        assert (S, offset) == (kept + 2, layer.seen - kept)
        state = layer.state()
        visible, _ = layer.update(positions(layer.seen, 2), positions(layer.seen, 2))
        assert visible.shape[2] == S and visible[0, 0, 0, 0] == offset
        layer.restore(state)
        layer.update(positions(layer.seen, T), positions(layer.seen, T))


def test_rollback_on_error_restores_the_cache_as_it_was():
    cache = DynamicCache(["full_attention", "sliding_attention"], sliding_window=3)
    for layer in range(2):
        cache.update(positions(0, 4), positions(0, 4), layer)
    before = cache_contents(cache)
    for error in (RuntimeError("an edit failed"), KeyboardInterrupt()):   # BaseException too: Ctrl-C
        with pytest.raises(type(error)):
            with cache.rollback_on_error():
                cache.update(positions(4, 2), positions(4, 2), 0)            # layer 0 one step ahead
                raise error
        assert same_contents(cache_contents(cache), before)
    with cache.rollback_on_error():                                          # no error: the updates stay
        for layer in range(2):
            cache.update(positions(4, 1), positions(4, 1), layer)
    assert cache.get_seq_length() == 5 and cache.layers[1].keys[0, 0, :, 0].tolist() == [3.0, 4.0]


def test_the_step_after_a_rollback_is_the_step_without_the_failed_one():
    """Restoring is counters and buffers: the positions a failed step wrote past the kept ones are
    overwritten by the next step, which then matches a cache that never saw the failure."""
    failed, clean = DynamicCache(["full_attention"]), DynamicCache(["full_attention"])
    for cache in (failed, clean):
        cache.update(positions(0, 3), positions(0, 3), 0)
    with pytest.raises(ValueError):
        with failed.rollback_on_error():
            failed.update(positions(100, 61), positions(100, 61), 0)        # grows the buffer, then fails
            raise ValueError
    for cache in (failed, clean):
        cache.update(positions(3, 2), positions(3, 2), 0)
    assert same_contents(cache_contents(failed), cache_contents(clean))


def test_cache_objects(lm):
    cache = DynamicCache.from_config(lm.config)
    out = lm(ids(1, 5), past_key_values=cache)
    assert out.past_key_values is cache
    k, v = cache[0]
    assert k.shape == (1, 2, 5, 4)               # full-attention layer: every position
    assert cache.layers[1].keys.shape[2] == 2    # sliding layer, W = 3: the last W - 1
    assert len(cache) == 2 and [pair[0].shape[2] for pair in cache] == [5, 2]
    assert kv_bytes(cache) == 2 * (5 + 2) * 2 * 4 * 4
    assert repr(cache) == "DynamicCache(seen=5, kept per layer=[5, 2])"


def test_keys_of_another_shape_are_refused_by_the_layer():
    layer = CacheLayer()
    layer.update(positions(0, 2), positions(0, 2))
    with pytest.raises(CacheError, match=r"cache holds keys of shape \[B, KV, S, HD\] = \(1, 2, 2, 4\)"):
        layer.update(positions(2, 1, KV=3), positions(2, 1, KV=3))
    assert layer.seen == 2


@pytest.mark.parametrize("other", [dict(num_hidden_layers=3, max_window_layers=1), dict(num_key_value_heads=3),
                                   dict(sliding_window=4), dict(use_sliding_window=False)],
                         ids=["layers", "KV heads", "window", "no window"])
def test_a_cache_made_for_another_config_is_refused_naming_both(lm, other):
    foreign_model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **other}), seed=0)
    cache = foreign_model(ids(1, 3)).past_key_values
    before = cache_contents(cache)
    with pytest.raises(qwen2np.errors.CacheError) as e:
        lm(ids(1, 1), past_key_values=cache)
    message = str(e.value)
    assert "this cache was made for" in message and "this model has" in message and "2 layers" in message
    assert same_contents(cache_contents(cache), before)
    empty = DynamicCache.from_config(foreign_model.config)   # an empty cache of another shape: refused too
    if other.get("num_key_value_heads") is None:
        with pytest.raises(qwen2np.errors.CacheError):
            lm(ids(1, 1), past_key_values=empty)


def test_a_cache_of_another_dtype_is_refused(lm):
    model64 = Qwen2ForCausalLM(Qwen2Config(**TINY), dtype="float64", seed=1)
    cache = model64(ids(1, 3)).past_key_values
    with pytest.raises(qwen2np.errors.CacheError, match="float64"):
        lm(ids(1, 1), past_key_values=cache)


def test_check_fits_names_both_sides():
    config = Qwen2Config(**TINY)
    cache = DynamicCache.from_config(config)
    cache.check_fits(config, 2, np.dtype(np.float32))                       # an empty cache of this model
    for layer in range(2):
        cache.update(positions(0, 3, B=2), positions(0, 3, B=2), layer)
    with pytest.raises(CacheError, match="the cache holds a batch of 2 rows, this call has 1"):
        cache.check_fits(config, 1, np.dtype(np.float32))
    with pytest.raises(CacheError) as e:
        cache.check_fits(Qwen2Config(**{**TINY, "num_key_value_heads": 3}), 2, np.dtype(np.float32))
    assert str(e.value).startswith("past_key_values: this cache was made for 2 layers, 1 sliding with a window "
                                   "of 3, KV=2, HD=4, float32; this model has 2 layers, 1 sliding with a window "
                                   "of 3, KV=3, HD=4, float32")


@pytest.mark.oracle
@given(steps=st.lists(st.integers(1, 5), min_size=1, max_size=8), window=st.integers(2, 5))
def test_updates_and_mask_sizes_are_transformers(oracle, steps, window):
    import torch

    hf_config = oracle.Qwen2Config(**{**TINY, "sliding_window": window})
    theirs = oracle.DynamicCache(config=hf_config)
    ours = DynamicCache.from_config(Qwen2Config.from_dict(hf_config.to_dict()))
    seen = 0
    for T in steps:
        for layer in range(2):
            assert ours.get_mask_sizes(T, layer) == tuple(theirs.get_mask_sizes(T, layer))
            k = positions(seen, T)
            our_keys, _ = ours.update(k, -k, layer)
            their_keys, _ = theirs.update(torch.from_numpy(k), torch.from_numpy(-k), layer)
            assert np.array_equal(our_keys, their_keys.numpy())
            assert np.array_equal(ours.layers[layer].keys, theirs.layers[layer].keys.numpy())
        seen += T
        assert ours.get_seq_length() == theirs.get_seq_length() == seen
