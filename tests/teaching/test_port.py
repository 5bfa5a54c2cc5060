"""qwen2np/teaching/port.py, the port of notebook 5's gallery: without mistakes it agrees with qwen2np, and
each mistake diverges first exactly where the gallery says."""

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.record import record_dump
from qwen2np.teaching.port import MISTAKES, port_forward, reference_names

TINY = dict(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


def tiny(**overrides):
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}), seed=7)


# -- the port of the gallery ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sliding():
    """A model whose upper layers slide (W = 3 from layer 2 on), and its golden dump of a padded batch."""
    model = tiny(use_sliding_window=True, sliding_window=3, max_window_layers=2, initializer_range=0.2)
    ids = np.array([[0, 0, 3, 17, 5, 9, 30, 2], [4, 8, 15, 16, 23, 42, 1, 7]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    return model, ids, mask, record_dump(model, ids, mask, include=reference_names(model.config), fingerprint=None)


def test_the_port_agrees_with_qwen2np_without_mistakes(sliding):
    model, ids, mask, golden = sliding
    c = compare_dumps(port_forward(model.state_dict(), model.config, ids, mask), golden)
    assert c.ok and not c.only_in_a and not c.only_in_b and len(c.tensors) == len(reference_names(model.config))


@pytest.mark.parametrize("mistake, first", [
    ("interleaved_rope", "model.layers.0.self_attn.q_rope"),
    ("gqa_tile", "model.layers.0.self_attn.scores"),
    ("mask_minus_inf", "model.layers.1.self_attn.probs"),
    ("sliding_wrong_layers", "model.layers.0.self_attn.mask"),
])
def test_each_mistake_diverges_first_where_it_is(sliding, mistake, first):
    """(The bias and eps mistakes need the real checkpoint's large biases and small norms to show; the
    gallery notebook shows them there.)"""
    model, ids, mask, golden = sliding
    c = compare_dumps(port_forward(model.state_dict(), model.config, ids, mask, mistakes=[mistake]), golden)
    assert c.first_failure is not None and c.first_failure.name == first
    if mistake == "mask_minus_inf":
        assert c.first_failure.rel == float("inf")


def test_the_bias_and_eps_mistakes_on_weights_that_show_them(sliding):
    model, ids, mask, golden = sliding
    weights = dict(model.state_dict())
    weights["model.layers.0.self_attn.q_proj.bias"] = np.full_like(weights["model.layers.0.self_attn.q_proj.bias"], 3.0)
    moved = tiny(use_sliding_window=True, sliding_window=3, max_window_layers=2, initializer_range=0.2, rms_norm_eps=0.05)
    moved.load_state_dict(weights)
    golden = record_dump(moved, ids, mask, include=reference_names(moved.config), fingerprint=None)
    for mistake, first in [("no_qkv_bias", "model.layers.0.self_attn.q_proj"),
                           ("eps_outside_sqrt", "model.layers.0.input_layernorm")]:
        c = compare_dumps(port_forward(weights, moved.config, ids, mask, mistakes=[mistake]), golden)
        assert c.first_failure.name == first, mistake
    with pytest.raises(ValueError, match="unknown mistakes \\['typo'\\]"):
        port_forward(weights, moved.config, ids, mistakes=["typo"])
    assert set(MISTAKES) == {"interleaved_rope", "gqa_tile", "no_qkv_bias", "eps_outside_sqrt", "mask_minus_inf",
                             "sliding_wrong_layers"}
