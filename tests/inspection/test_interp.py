"""Interpretability: the residual stream after attention and each head's share of o_proj as named
intermediates (qwen2np/inspection/tracing.py, attention.py, modeling.py), and the helpers of qwen2np/inspection/interp.py: the
logit lens, direct logit attribution (its terms sum to the logits within 1e-12 in float64) and patching
sweeps."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen2np.model.attention
from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, trace, zero_head
from qwen2np.errors import IntermediateNameError, TraceError
from qwen2np.inspection.interp import (attribution_names, direct_logit_attribution, logit_lens, patching_sweep, stream_names,
                            unembed)
from qwen2np.inspection.tracing import Trace, listens

TINY = dict(vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


def make(dtype="float64", **overrides):
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}), dtype=dtype, seed=5)


def ids(B=1, T=6, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (B, T))


# -- the two intermediates ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resid_mid_is_the_stream_after_attention_bit_for_bit(dtype):
    model = make(dtype)
    with trace(model, "model.embed_tokens", "model.layers.?", "model.layers.*.resid_mid", "*.o_proj",
               "*.down_proj") as t:
        model(ids(2, 5))
    for l in range(3):
        before = t["model.embed_tokens"] if l == 0 else t[f"model.layers.{l - 1}"]
        mid = t[f"model.layers.{l}.resid_mid"]
        assert mid.dtype == np.dtype(dtype) and mid.shape == (2, 5, 24)
        np.testing.assert_array_equal(mid, before + t[f"model.layers.{l}.self_attn.o_proj"])
        np.testing.assert_array_equal(t[f"model.layers.{l}"], mid + t[f"model.layers.{l}.mlp.down_proj"])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-13)])
def test_head_out_sums_to_o_proj_and_each_head_is_its_own_slice(dtype, tol):
    model = make(dtype)
    H, HD = 6, 4
    with trace(model, "*.context", "*.head_out", "*.o_proj") as t:
        model(ids(2, 5), attention_mask=np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    w = model.state_dict()["model.layers.1.self_attn.o_proj.weight"].astype(np.float64)   # [D, H*HD]
    shares = t["model.layers.1.self_attn.head_out"]
    assert shares.shape == (2, H, 5, 24) and shares.dtype == np.dtype(dtype)              # [B, H, T, D]
    o = t["model.layers.1.self_attn.o_proj"]
    assert np.abs(shares.sum(axis=1) - o).max() <= tol * np.abs(o).max()
    context = t["model.layers.1.self_attn.context"].astype(np.float64)                    # [B, T, H*HD]
    for h in range(H):   # head h: its HD features through its HD columns of o_proj, by hand
        by_hand = context[..., h * HD:(h + 1) * HD] @ w[:, h * HD:(h + 1) * HD].T
        np.testing.assert_allclose(shares[:, h], by_hand, rtol=0, atol=tol * np.abs(o).max())


def test_head_out_is_only_computed_when_a_trace_asks_for_it(monkeypatch):
    """Untraced, or traced for other names, the forward pass makes the same products as before the name
    existed; asked for, one more per layer (the block-diagonal product)."""
    calls = []
    real = qwen2np.model.attention.linear
    monkeypatch.setattr(qwen2np.model.attention, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    model, x = make(), ids()

    def products(*patterns, **kw):
        calls.clear()
        with trace(model, *patterns, **kw):
            model(x)
        return len(calls)

    calls.clear()
    model(x)
    plain = len(calls)
    assert plain == 3 * 4                                           # q, k, v, o per layer
    assert products("model.layers.*.self_attn.o_proj", "*.resid_mid") == plain
    assert products("model.layers.1.self_attn.head_out") == plain + 1
    assert products(edits={"model.layers.*.self_attn.head_out": lambda a: a}) == plain + 3
    assert not listens("model.layers.0.self_attn", "head_out")


def test_listens_follows_the_trace_scope():
    model, other = make(), make()
    with Trace(model, "model.layers.0.self_attn.head_out"):
        assert not listens("model.layers.0.self_attn", "head_out")   # no forward pass of `model` running
        with trace(other, "logits") as t:   # another model's forward pass does not compute it
            other(ids())
        assert "model.layers.0.self_attn.head_out" not in t


def test_editing_head_out_replaces_o_proj_by_the_sum_of_the_shares():
    model, x = make(), ids(T=5)
    with trace(model, "logits", "*.o_proj") as base:
        model(x)
    # identity and recording: bit for bit (tests/inspection/test_trace.py holds this for every name at once)
    with trace(model, "logits", "*.head_out", edits={"*.head_out": lambda a: a}) as same:
        model(x)
    np.testing.assert_array_equal(same["logits"], base["logits"])
    # a new array with the same values: o_proj is the float sum of the shares
    with trace(model, "*.head_out", "*.o_proj", edits={"model.layers.2.self_attn.head_out": np.copy}) as t:
        model(x)
    np.testing.assert_array_equal(t["model.layers.2.self_attn.o_proj"],
                                  t["model.layers.2.self_attn.head_out"].sum(axis=1))
    np.testing.assert_allclose(t["model.layers.2.self_attn.o_proj"], base["model.layers.2.self_attn.o_proj"],
                               rtol=0, atol=1e-13)
    # zeroing head 4's share is zeroing head 4 (in probs): the same logits, up to rounding
    with trace(model, "logits", edits={"model.layers.1.self_attn.head_out": zero_head(4)}) as a:
        model(x)
    with trace(model, "logits", edits={"model.layers.1.self_attn.probs": zero_head(4)}) as b:
        model(x)
    assert np.abs(a["logits"] - base["logits"]).max() > 1e-3
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-12)


def test_a_bare_model_names_them_without_prefix():
    model = Qwen2Model(Qwen2Config(**TINY), seed=1)
    with trace(model, "layers.0.resid_mid", "layers.0.self_attn.head_out") as t:
        model(ids())
    assert t.names() == ["layers.0.self_attn.head_out", "layers.0.resid_mid"]


# -- direct logit attribution ---------------------------------------------------------------------------


@settings(max_examples=15)
@given(layers=st.integers(1, 4), kv=st.sampled_from([1, 2, 3, 6]), T=st.integers(1, 9), seed=st.integers(0, 999),
       heads=st.booleans(), position=st.integers(-9, 8), scale=st.sampled_from([0.02, 0.3, 2.0]))
def test_attribution_terms_sum_to_the_logits_within_1e_12_in_float64(layers, kv, T, seed, heads, position, scale):
    """The guarantee: in float64, Σ terms = logits within 1e-12 (absolute), for every token of the
    vocabulary, at any position, per head or per block, whatever the scale of the weights."""
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": layers, "num_key_value_heads": kv,
                                            "initializer_range": scale}), dtype="float64", seed=seed)
    position = position % T
    with trace(model, *attribution_names(model, heads=heads)) as t:
        logits = model(ids(2, T, seed)).logits                                  # [B, T, V]
    dla = direct_logit_attribution(model, t, tokens=range(TINY["vocab_size"]), position=position, batch=1)
    assert dla.terms.shape == (1 + layers * ((6 if heads else 1) + 1), TINY["vocab_size"])
    np.testing.assert_array_equal(dla.logits, logits[1, position])
    assert np.abs(dla.terms.sum(axis=0) - logits[1, position]).max() < 1e-12


def test_attribution_names_its_parts_and_maps_heads():
    model = make()
    with trace(model, *attribution_names(model)) as t:
        model(ids())
    dla = direct_logit_attribution(model, t, tokens=[3, 9])
    assert dla.names[:3] == ["model.embed_tokens", "model.layers.0.self_attn.head_out.0",
                             "model.layers.0.self_attn.head_out.1"]
    assert dla.names[-1] == "model.layers.2.mlp.down_proj"
    grid = dla.layer_head_map(model)                                              # [L, H, K]
    assert grid.shape == (3, 6, 2) and grid[2, 5, 1] == dla.terms[dla.names.index("model.layers.2.self_attn.head_out.5"), 1]
    # per head and per block agree: a layer's heads sum to its o_proj term
    with trace(model, *attribution_names(model, heads=False)) as tb:
        model(ids())
    block = direct_logit_attribution(model, tb, tokens=[3, 9])
    np.testing.assert_allclose(grid.sum(axis=1), block.terms[1::2][:3], rtol=0, atol=1e-12)


def test_attribution_in_float32_sums_to_the_logits_up_to_float32_rounding():
    model = make("float32")
    with trace(model, *attribution_names(model)) as t:
        logits = model(ids()).logits
    dla = direct_logit_attribution(model, t, tokens=range(48))
    err = np.abs(dla.terms.sum(axis=0) - logits[0, -1]).max()
    assert 0 < err < 1e-5 * np.abs(logits).max()


def test_attribution_and_lens_refuse_what_they_cannot_do():
    model = make()
    with trace(model, "logits") as t:
        model(ids())
    with pytest.raises(IntermediateNameError, match="model.layers.2 was not recorded"):
        direct_logit_attribution(model, t, tokens=[1])
    with trace(model, *attribution_names(model)) as t:
        model(ids(T=4))
    with pytest.raises(TraceError, match="position 4 is outside the T axis of length 4"):
        direct_logit_attribution(model, t, tokens=[1], position=4)
    with pytest.raises(TraceError, match=r"tokens \[48\] is outside the ids \[0, 48\)"):
        direct_logit_attribution(model, t, tokens=[48])
    with pytest.raises(TraceError, match="needs? a Qwen2ForCausalLM"):
        stream_names(Qwen2Model(Qwen2Config(**TINY), seed=1))


# -- the logit lens ---------------------------------------------------------------------------------------


def test_the_logit_lens_of_the_last_layer_is_the_models_prediction():
    model = make("float32")
    x = ids(2, 5)
    with trace(model, *stream_names(model, mid=True), "logits") as t:
        logits = model(x).logits
    lens = logit_lens(model, t, names=stream_names(model, mid=True), top_k=3, tokens=[7, 8], batch=1)
    assert lens.top_ids.shape == (7, 5, 3) and lens.token_probs.shape == (7, 5, 2)
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], logits[1].argmax(-1))
    np.testing.assert_allclose(unembed(model, t["model.layers.2"]), logits, rtol=0, atol=1e-5)
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0) and np.allclose(lens.top_probs[..., :1] >= lens.token_probs, True)
    only = logit_lens(model, t, positions=[-1])
    assert only.top_ids.shape == (4, 1, 1) and only.top_ids[-1, 0, 0] == logits[0, -1].argmax()
    with pytest.raises(TraceError, match="outside the T axis"):
        logit_lens(model, t, positions=[5])


# -- patching sweeps --------------------------------------------------------------------------------------


def test_a_patching_sweep_is_0_where_nothing_differs_and_1_where_everything_is_restored():
    model = make()
    clean = ids(T=6, seed=1)
    corrupt = clean.copy()
    corrupt[0, 3] = (clean[0, 3] + 1) % TINY["vocab_size"]        # the prompts differ at position 3 only
    with trace(model, "logits") as t:
        model(clean)
    answer = int(t["logits"][0, -1].argmax())
    sweep = patching_sweep(model, clean, corrupt, metric=lambda logits: logits[answer] - logits.mean())
    assert sweep.values.shape == (3, 6) and sweep.names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    # before position 3 the streams of both prompts are the same (causal): patching them changes nothing
    np.testing.assert_allclose(sweep.values[:, :3], 0, atol=1e-9)
    # the last layer at the last position is all the model reads: the clean answer, whole
    np.testing.assert_allclose(sweep.values[-1, -1], 1, atol=1e-9)
    # the difference itself is the embedding at position 3: patching it there restores everything
    embed = patching_sweep(model, clean, corrupt, metric=lambda logits: logits[answer] - logits.mean(),
                           name="model.embed_tokens", layers=[0])
    np.testing.assert_allclose(embed.values[0], [0, 0, 0, 1, 0, 0], atol=1e-9)


def test_a_patching_sweep_by_hand_for_one_cell():
    """One cell of the map is patch_from on the corrupted run, one prompt at a time."""
    from qwen2np.inspection.edits import patch_from

    model = make("float32")
    clean, corrupt = ids(T=5, seed=2), ids(T=5, seed=3)
    metric = lambda logits: logits[4] - logits[11]
    sweep = patching_sweep(model, clean, corrupt, metric, name="model.layers.{l}.resid_mid", layers=[1],
                           positions=[2, 4])
    with trace(model, "model.layers.1.resid_mid") as source:
        model(clean)
    with trace(model, "logits", edits=patch_from(source, "model.layers.1.resid_mid", positions=[2])) as t:
        model(corrupt)
    np.testing.assert_allclose(sweep.raw[0, 0], metric(t["logits"][0, -1].astype(np.float64)), rtol=1e-5)
    with pytest.raises(TraceError, match="must both be \\[1, T\\] with the same T"):
        patching_sweep(model, clean, corrupt[:, :4], metric)
    with pytest.raises(TraceError, match="it must differ"):
        patching_sweep(model, clean, clean, metric)


@pytest.mark.parametrize("call, message", [
    (lambda m, t: logit_lens(m, t, tokens=[-1]), "tokens \\[-1\\] is outside the ids \\[0, 32\\)"),
    (lambda m, t: logit_lens(m, t, tokens=[1.0]), "tokens: expected integers"),
    (lambda m, t: logit_lens(m, t, tokens=[32]), "outside the ids \\[0, 32\\)"),
    (lambda m, t: logit_lens(m, t, top_k=-3), "top_k: expected an integer >= 1, found -3"),
    (lambda m, t: logit_lens(m, t, top_k=0), "top_k: expected an integer >= 1"),
    (lambda m, t: logit_lens(m, t, top_k=2.0), "top_k: expected an integer >= 1"),
    (lambda m, t: logit_lens(m, t, positions=[1.7]), "positions: expected integers"),
    (lambda m, t: logit_lens(m, t, positions=[9]), "positions \\[9\\] is outside the T axis of length 3"),
    (lambda m, t: logit_lens(m, t, positions=[]), "positions is empty"),
    (lambda m, t: logit_lens(m, t, batch=1), "batch"),
    (lambda m, t: logit_lens(m, t, batch=0.0), "batch.*expected an integer"),
    (lambda m, t: logit_lens(m, t, step=5), "step"),
    (lambda m, t: logit_lens(m, t, step=0.5), "step.*expected an integer"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[1.9]), "tokens: expected integers"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[-2]), "outside the ids \\[0, 32\\)"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[]), "tokens is empty"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[1], position=1.0), "position.*expected an integer"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[1], position=3), "position 3 is outside the T axis of length 3"),
    (lambda m, t: direct_logit_attribution(m, t, tokens=[1], batch=True), "batch.*expected an integer"),
])
def test_bad_arguments_are_refused_never_coerced(call, message):
    """An index that would be silently rounded, wrapped or reinterpreted is refused with a TraceError
    naming the argument (a negative token id used to read token V-1, top_k=-3 returned V-3 tokens)."""
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), seed=0)
    with trace(model, *attribution_names(model), *stream_names(model)) as t:
        model(np.array([[1, 2, 3]]))
    with pytest.raises(TraceError, match=message):
        call(model, t)


def test_patching_sweep_refuses_fractional_positions():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), seed=0)
    with pytest.raises(TraceError, match="positions: expected integers"):
        patching_sweep(model, [[1, 2, 3]], [[1, 2, 4]], lambda logits: logits[5], positions=[1.5])
