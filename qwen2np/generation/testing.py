"""A tiny stand-in language model for the doctests and tests of `generate`.

`TinyCountingLM` predicts `(last token + 1) % vocab_size` and checks, on every call, the contract that
`generate` must keep with a real model: the attention mask covers past + new positions, position ids
continue from the previous call, and the cache grows by exactly the new tokens.

>>> lm = TinyCountingLM()
>>> lm.generate([[1, 2]], max_new_tokens=3).tolist()
[[1, 2, 3, 4, 5]]
"""

from types import SimpleNamespace

import numpy as np

from .config import GenerationConfig
from .utils import GenerationMixin


class _Cache:
    def __init__(self):
        self.length = 0
        self.positions = None  # [B, S] the positions seen so far

    def get_seq_length(self):
        return self.length


class TinyCountingLM(GenerationMixin):
    def __init__(self, vocab_size=10, max_position_embeddings=64, generation_config=None):
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.generation_config = generation_config or GenerationConfig()
        self.calls = []  # (input_ids, attention_mask, position_ids) of every forward call

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=True, logits_to_keep=0):
        B, T = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        assert input_ids.dtype == np.int64
        if attention_mask is not None:
            assert attention_mask.shape == (B, past + T), (attention_mask.shape, past, T)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + T, dtype=np.int64), (B, T))
        assert position_ids.shape == (B, T)
        if past_key_values is not None and past:
            previous = past_key_values.positions[:, -1:]
            assert (position_ids[:, :1] == previous + 1).all(), "positions must continue"
        self.calls.append((input_ids.copy(), None if attention_mask is None else attention_mask.copy(),
                           position_ids.copy()))
        V = self.config.vocab_size
        logits = np.zeros((B, T, V), dtype=np.float32)
        nxt = (input_ids + 1) % V  # [B, T]
        logits[np.arange(B)[:, None], np.arange(T)[None, :], nxt] = 5.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        cache = None
        if use_cache:
            cache = past_key_values or _Cache()
            cache.length = past + T
            cache.positions = position_ids if cache.positions is None else np.concatenate(
                [cache.positions, position_ids], axis=1)
        return SimpleNamespace(logits=logits, past_key_values=cache)
