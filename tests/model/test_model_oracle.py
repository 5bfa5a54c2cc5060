"""qwen2np against transformers 5.24.0 live, on configs, inputs and masks drawn by hypothesis.

Each example builds a tiny transformers model (eager attention, float32) with wide random weights,
copies its weights into qwen2np, and compares outputs where the attention mask is 1.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, trace

pytestmark = pytest.mark.oracle

ATOL = 1e-5  # relative to the largest magnitude of the tensor compared (at least 1): float32 noise grows
             # with the width and the weights drawn, and hypothesis draws both


@st.composite
def configs(draw):
    kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3, 7]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    heads = kv * group
    layers = draw(st.integers(1, 3))
    c = dict(vocab_size=draw(st.integers(16, 80)), hidden_size=heads * head_dim,
             intermediate_size=draw(st.integers(4, 40)), num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=draw(st.sampled_from([16, 64])),
             rope_theta=draw(st.sampled_from([10000.0, 1e6, 500.0])), tie_word_embeddings=draw(st.booleans()),
             rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), pad_token_id=0)
    if draw(st.booleans()):
        c.update(use_sliding_window=True, sliding_window=draw(st.integers(2, 6)),
                 max_window_layers=draw(st.integers(0, layers)))
    rope = draw(st.sampled_from(["default", "linear", "dynamic", "yarn"]))
    if rope == "linear":
        c["rope_scaling"] = {"type": "linear", "factor": draw(st.sampled_from([2.0, 4.0]))}
    elif rope == "dynamic":
        c["rope_scaling"] = {"type": "dynamic", "factor": draw(st.sampled_from([2.0, 3.0]))}
    elif rope == "yarn":
        c["rope_scaling"] = {"type": "yarn", "factor": draw(st.sampled_from([2.0, 4.0])),
                             "original_max_position_embeddings": draw(st.sampled_from([4, 8, 16]))}
    if draw(st.booleans()):
        c["head_dim"] = head_dim * 2  # an explicit head_dim different from hidden_size // heads
    return c


@st.composite
def batches(draw, vocab_size):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    ids = np.array(draw(st.lists(st.lists(st.integers(1, vocab_size - 1), min_size=T, max_size=T),
                                 min_size=B, max_size=B)), dtype=np.int64)
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):  # left padding of a drawn length; at least one real token per row
        pad = draw(st.integers(0, T - 1))
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask


def transformers_twin(oracle, config_kwargs, seed):
    """A transformers model with wide random weights, and the qwen2np model holding the same weights."""
    import torch

    hf_config = oracle.Qwen2Config(**config_kwargs)
    model = oracle.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=gen)) if name.endswith("norm.weight")
                    else 0.15 * torch.randn(p.shape, generator=gen))
    config = Qwen2Config.from_dict(hf_config.to_dict())
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = Qwen2ForCausalLM._from_params(config, Qwen2ForCausalLM._params_from_checkpoint(config, params, {}, "oracle"),
                                         "float32")
    return model, ours


def masked_max_error(a, b, keep):
    """Max abs error over the kept positions, divided by max(1, the largest magnitude of b there)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.broadcast_to(keep, a.shape)
    return float(np.abs(a - b)[keep].max() / max(1.0, np.abs(b[keep]).max()))


@settings(max_examples=30)
@given(data=st.data())
def test_forward_matches_transformers(oracle, data):
    import torch

    config = data.draw(configs())
    hf, ours = transformers_twin(oracle, config, seed=data.draw(st.integers(0, 2**31)))
    ids, mask = data.draw(batches(config["vocab_size"]))
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels),
                 output_hidden_states=True, output_attentions=True)
    with trace(ours, "model.layers.*.self_attn.scores") as t:
        out = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
    keep = mask.astype(bool)
    assert masked_max_error(out.logits, ref.logits.numpy(), keep[..., None]) <= ATOL
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert masked_max_error(a, b.numpy(), keep[..., None]) <= ATOL
    for layer, (a, b) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        # subtle: a probability's float32 error is its scores' error, which grows with the scores' size (a
        # softmax moves p by at most half the largest change of its inputs): the bound scales with them
        scores = t[f"model.layers.{layer}.self_attn.scores"][np.broadcast_to(keep[:, None, :, None], a.shape[:3] + (1,))[..., 0]]
        assert masked_max_error(a, b.numpy(), keep[:, None, :, None]) <= ATOL * max(1.0, float(np.abs(scores).max()))
    if np.isfinite(ref.loss.item()):
        assert abs(float(out.loss) - ref.loss.item()) <= ATOL * max(1.0, abs(ref.loss.item()))


@settings(max_examples=15)
@given(data=st.data())
def test_cached_decoding_equals_full_forward(oracle, data):
    """Prefill then one token at a time through the cache gives the logits of one full forward pass,
    in qwen2np and in transformers alike; the cache grows by one position per step (sliding layers cap
    at W - 1)."""
    import torch

    config = data.draw(configs())
    config.pop("rope_scaling", None)  # dynamic RoPE is stateful across calls: covered by the goldens
    hf, ours = transformers_twin(oracle, config, seed=data.draw(st.integers(0, 2**31)))
    ids, mask = data.draw(batches(config["vocab_size"]))
    T = ids.shape[1]
    prefix = data.draw(st.integers(1, T))
    full = ours(ids, attention_mask=mask, use_cache=False).logits
    out = ours(ids[:, :prefix], attention_mask=mask[:, :prefix])
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(prefix, T):
        out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
        assert cache.get_seq_length() == t + 1
        for layer in cache.layers:
            kept = t + 1 if layer.window is None else min(t + 1, layer.window - 1)
            assert layer.keys.shape[2] == kept
        steps.append(out.logits)
    incremental = np.concatenate(steps, axis=1)
    keep = mask.astype(bool)[..., None]
    assert masked_max_error(incremental, full, keep) <= ATOL
    with torch.no_grad():  # and transformers' own cached decoding agrees
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert masked_max_error(incremental, ref, keep) <= ATOL


@settings(max_examples=20)
@given(data=st.data())
def test_batch_equals_rows_one_by_one(oracle, data):
    """A left-padded batch with positions from the mask gives each row what the row gives alone."""
    config = data.draw(configs())
    config.pop("rope_scaling", None)
    _, ours = transformers_twin(oracle, config, seed=data.draw(st.integers(0, 2**31)))
    ids, mask = data.draw(batches(config["vocab_size"]))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    batch = ours(ids, attention_mask=mask, position_ids=positions).logits
    for b in range(ids.shape[0]):
        real = mask[b].astype(bool)
        alone = ours(ids[b:b + 1, real]).logits[0]
        assert masked_max_error(batch[b, real], alone, np.ones_like(alone, bool)) <= ATOL


def test_bare_model_matches_transformers(oracle):
    import torch

    kwargs = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2)
    hf_config = oracle.Qwen2Config(**kwargs)
    torch.manual_seed(0)
    hf = oracle.Qwen2Model._from_config(hf_config, attn_implementation="eager").eval()
    params = {k: v.numpy() for k, v in hf.state_dict().items()}
    config = Qwen2Config(**kwargs)
    ours = Qwen2Model._from_params(config, Qwen2Model._params_from_checkpoint(config, params, {}, "oracle"), "float32")
    ids = np.array([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert np.abs(ours(ids).last_hidden_state - ref).max() <= ATOL
