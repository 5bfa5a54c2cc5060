"""The real checkpoint (Qwen2.5-Coder-0.5B-Instruct, GGUF) against transformers 5.24.0 on the same weights."""

import numpy as np
import pytest

pytestmark = [pytest.mark.oracle, pytest.mark.checkpoint, pytest.mark.slow]

PROMPT = ("def quicksort(items):\n    \"\"\"Sort a list with the quicksort algorithm.\"\"\"\n"
          "    if len(items) <= 1:\n        return items\n    pivot = items[len(items) // 2]\n"
          "    left = [x for x in items if x < pivot]\n")


@pytest.fixture(scope="module")
def prompt_ids(real_tokenizer):
    ids = real_tokenizer(PROMPT)["input_ids"]
    ids = (ids * 4)[:64]
    assert len(ids) == 64
    return np.array([ids])


def test_logits_match_transformers(real_model, hf_real_model, prompt_ids):
    """float32 logits within 1e-3 max abs of transformers, and the same top-1 token at every position."""
    import torch

    with torch.no_grad():
        ref = hf_real_model(torch.from_numpy(prompt_ids)).logits.numpy()
    out = real_model(prompt_ids).logits
    assert out.shape == ref.shape == (1, 64, real_model.config.vocab_size)
    err = np.abs(out - ref).max()
    assert err <= 1e-3, f"max abs error {err:.3g}"
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_cached_decoding_on_the_real_checkpoint(real_model, prompt_ids):
    """Prefill 60 tokens, decode 4 one at a time: the logits of a single full forward pass."""
    full = real_model(prompt_ids, use_cache=False).logits[:, -4:]
    out = real_model(prompt_ids[:, :60])
    cache = out.past_key_values
    steps = [real_model(prompt_ids[:, t:t + 1], past_key_values=cache).logits for t in range(60, 64)]
    assert cache.get_seq_length() == 64
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-3
