"""What the model tests share: a tiny config with one full and one sliding layer, prompts for it, and a
KV cache's contents to compare before and after a call."""

import numpy as np

from qwen2np import Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
            use_sliding_window=True, sliding_window=3, max_window_layers=1)


def tiny_lm():
    """A causal LM of TINY with wide random weights."""
    return Qwen2ForCausalLM(Qwen2Config(**TINY, initializer_range=0.3), seed=1)


def ids(B=2, T=6, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], (B, T))


def cache_contents(cache):
    return [(layer.seen, None if layer.keys is None else layer.keys.copy(),
             None if layer.values is None else layer.values.copy()) for layer in cache.layers]


def same_contents(a, b):
    return all(sa == sb and (ka is None and kb is None or np.array_equal(ka, kb)) and
               (va is None and vb is None or np.array_equal(va, vb)) for (sa, ka, va), (sb, kb, vb) in zip(a, b))
