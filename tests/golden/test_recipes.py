"""recipes.py, the golden tools' second implementation of the forward pass: equal to the model where the
model is right, and blind to the model's code, so that a bug planted in the model's masks or RoPE is named
by isolation while it is still planted (STYLE.md, "A check shares no code with what it checks")."""

import numpy as np
import pytest

import qwen2np.model.masks as model_masks
import qwen2np.model.rope as model_rope
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.recipes import additive_mask
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation
from qwen2np.golden.rotary import rotary_tables

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)
IDS = [[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
# layers 2 and 3 slide (layer_idx >= max_window_layers) over 3 keys, fewer than the 7 positions
SLIDING = dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
}
POSITIONS = np.arange(10, 40, dtype=np.int64)[None]   # beyond max_position_embeddings (16): dynamic grows


def root_causes(isolation):
    return sorted({c.name for c in isolation.root_causes})


# -- where the model is right, the recipes agree with it --------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(ROPES))
def test_rotary_tables_equal_the_model_s(kind, dtype):
    config = Qwen2Config(**TINY, max_position_embeddings=16, rope_parameters=ROPES[kind])
    cos, sin = rotary_tables(config, POSITIONS, dtype)
    want_cos, want_sin = model_rope.RotaryEmbedding(config, dtype)(POSITIONS)
    assert cos.dtype == sin.dtype == dtype and cos.shape == (1, 30, config.head_dim)
    assert np.array_equal(cos, want_cos) and np.array_equal(sin, want_sin)


@pytest.mark.oracle
@pytest.mark.parametrize("kind", list(ROPES))
def test_rotary_tables_in_float32_are_transformers_own(oracle, kind):
    """inv_freq and the angles in float32, as transformers' Qwen2RotaryEmbedding computes them."""
    import torch

    config = oracle.Qwen2Config(**TINY, max_position_embeddings=16, rope_parameters=ROPES[kind])
    rotary = oracle.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(config)
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(POSITIONS))
    cos, sin = rotary_tables(Qwen2Config(**TINY, max_position_embeddings=16, rope_parameters=ROPES[kind]),
                             POSITIONS, np.float32)
    # measured: 1 or 2 ulps of cos and sin (NumPy's and torch's libm); 1e-6 as the float32 policy's RoPE tables
    assert np.abs(cos - want_cos.numpy()).max() <= 1e-6 and np.abs(sin - want_sin.numpy()).max() <= 1e-6


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("q_start, T, S", [(0, 5, 5), (5, 1, 6), (5, 1, 3), (6, 1, 2)])
def test_the_mask_equals_the_model_s(q_start, T, S, window):
    """Causal, padding and sliding window, with the past and with a sliding cache that kept S keys."""
    attention = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    for padding in (None, attention):
        mine = additive_mask(2, q_start, T, S, padding, window)
        kv_start = q_start + T - S
        model = model_masks.build_attention_bias(2, q_start, T, kv_start, S, None if padding is None else
                                                 padding[:, :q_start + T], None, window, np.float64)
        assert mine.dtype == np.float64 and np.array_equal(mine, model)


# -- a bug planted in the model's own code is named while it is still planted -----------------------------


def window_one_key_wider(original):
    """A sliding window of W + 1 keys: the off-by-one of older flash-attention paths (docs/sliding-window.md)."""
    def visible_keys(q, k, sliding_window=None):
        return original(q, k, None if sliding_window is None else sliding_window + 1)
    return visible_keys


def one_future_key(original):
    """A causal mask that lets each query see the key right after it."""
    def visible_keys(q, k, sliding_window=None):
        return original(q, k, sliding_window) | (k == q + 1)
    return visible_keys


@pytest.mark.parametrize("bug, layers", [(window_one_key_wider, [2, 3]), (one_future_key, [0, 1, 2, 3])])
def test_a_bug_in_the_model_s_mask_is_named(monkeypatch, bug, layers):
    """The model's mask rule (masks.visible_keys) made wrong: isolation names the masks it makes, and nothing
    else (probs are right on the mask the model used)."""
    monkeypatch.setattr(model_masks, "visible_keys", bug(model_masks.visible_keys))
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, **SLIDING), seed=5)
    isolation = isolate_dump(record_dump(model, IDS, MASK, decode_steps=2), model)     # the bug still planted
    assert root_causes(isolation) == [f"model.layers.{l}.self_attn.mask" for l in layers], \
        format_isolation(isolation, brief=True)
    assert not isolation.not_isolated


def theta_low(original):
    """RoPE with θ 0.1 % low: every angle position · inv_freq off by up to 1e-3 relative."""
    def inverse_frequencies(rope, *args, **kwargs):
        return original({**rope, "rope_theta": rope["rope_theta"] * 0.999}, *args, **kwargs)
    return inverse_frequencies


def interleaved_pairs(_):
    """rotate_half on pairs (2i, 2i+1), GPT-J's layout, with the tables of the half-split layout."""
    def rotate_half(x):
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
        return out
    return rotate_half


ROPE_ROOTS = [f"model.layers.{l}.self_attn.{n}" for l in range(4) for n in ("k_rope", "q_rope")]


@pytest.mark.parametrize("name, bug, tables, expected", [
    ("inverse_frequencies", theta_low, True, ["model.rotary_emb.cos", "model.rotary_emb.sin"]),
    ("inverse_frequencies", theta_low, False, ROPE_ROOTS),          # no tables recorded: recomputed from the config
    ("rotate_half", interleaved_pairs, True, ROPE_ROOTS),
])
def test_a_bug_in_the_model_s_rope_is_named(monkeypatch, name, bug, tables, expected):
    """The model's rope.py made wrong: isolation recomputes RoPE with its own, and names the tables (or, when
    the dump has none, q_rope and k_rope), in every pass."""
    monkeypatch.setattr(model_rope, name, bug(getattr(model_rope, name)))
    model = Qwen2ForCausalLM(Qwen2Config(**TINY), seed=5)           # built with the bug: inv_freq is made here
    include = ["*"] if tables else ["model.embed_tokens", "model.layers.*", "model.norm", "logits"]
    isolation = isolate_dump(record_dump(model, IDS, MASK, decode_steps=2, include=include), model)
    assert root_causes(isolation) == sorted(expected), format_isolation(isolation, brief=True)
    assert {c.pass_index for c in isolation.root_causes} == {0, 1, 2}
    assert not isolation.not_isolated


def test_a_dynamic_rope_past_max_position_embeddings_isolates_clean():
    """A prefill longer than max_position_embeddings: the model grows inv_freq with the sequence, so each
    pass's tables are those of its own length. (Isolation once reused one stateful RotaryEmbedding across
    names and passes, and named rotary_emb.sin, or q_rope without tables, where nothing was wrong.)"""
    config = Qwen2Config(**TINY, max_position_embeddings=4, rope_parameters=ROPES["dynamic"])
    for include in (["*"], ["model.embed_tokens", "model.layers.*", "model.norm", "logits"]):
        model = Qwen2ForCausalLM(config, seed=5)   # fresh: a dynamic RoPE remembers the longest sequence it saw
        isolation = isolate_dump(record_dump(model, IDS, MASK, decode_steps=2, include=include), model)
        assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)


# -- half precision: what a real framework computes, reproduced bit for bit -------------------------------


def test_mlx_s_sigmoid_rounds_its_exponential_first():
    """mlx's CPU kernel: σ(x) from exp(|x|) rounded to bfloat16 (found on mlx 0.32.4: every bfloat16 value
    but 2 of 65,280 reproduced, tests/golden/test_port_mlx.py holds it on the real port). At x = 0.0079 it
    gives 0.5 where σ rounded once gives 0.50390625; the order "exp" computes the first."""
    from qwen2np.golden.recipes import Context, sigmoid
    from qwen2np.golden.rounding import rounding

    ctx = Context(Qwen2Config(**TINY), r=rounding("bfloat16"))
    x = np.array([0.007873535, -0.007873535, 3.0])
    assert sigmoid(ctx, x, "exp").tolist() == [0.5, 0.498046875, 0.953125]          # mlx.core.sigmoid's
    assert sigmoid(ctx, x, "sigmoid").tolist() == [0.50390625, 0.498046875, 0.953125]


def tie_case():
    """One query, two keys, HD = 4, bfloat16: the first score's product q·k = 1 + 2⁻⁸ + 2⁻²⁰ lies 2⁻²⁰ above
    the midpoint between bfloat16's 1 and 1.0078125 (a ten-thousandth of a unit), where a float32 sum in
    another order may land on either side."""
    from qwen2np.golden.recipes import Context
    from qwen2np.golden.rounding import rounding

    config = Qwen2Config(**dict(TINY, hidden_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4))
    ctx = Context(config, layer=0, start=1, length=1, shape=(1, 1, 4), r=rounding("bfloat16"),
                  orders={"attention": "eager"})
    q = np.array([1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 4)                       # [B, H, T, HD]
    keys = np.array([[1.0, 2.0 ** -8, 2.0 ** -20, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 1, 2, 4)
    values = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 4)
    r = ctx.r
    p = r(np.exp([0.5, 0.0]) / np.exp([0.5, 0.0]).sum())     # the port's scores: 1.0 (rounded down) · 0.5, and 0
    return ctx, q, keys, values, r(p @ values[0])[None]


def test_a_fused_attention_s_score_on_a_rounding_tie_is_settled_by_the_port_s_output():
    """A correct bfloat16 port rounded that score down: its context differs from the recomputation's in
    every element. Given the port's output, the fused attention recomputes the row with the tie rounded the
    other way and finds the port's; an output no tie explains is left judged against the first."""
    import dataclasses

    from qwen2np.golden.attention import fused_context

    ctx, q, keys, values, port = tie_case()
    first = fused_context(ctx, q, keys, values)
    assert (first != port).any()
    settled = fused_context(dataclasses.replace(ctx, observed=port), q, keys, values)
    assert (settled == port).all()
    wrong = port * 2          # a bug: no rounding of any score gives it
    assert (fused_context(dataclasses.replace(ctx, observed=wrong), q, keys, values) == first).all()
