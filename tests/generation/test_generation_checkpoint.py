"""Greedy generation on the real Qwen2.5-Coder-0.5B-Instruct checkpoint is token-for-token transformers
5.24's, one prompt at a time and batched with left padding; the issue's seed flow runs end to end.

Each model is loaded once per session (conftest's `real_model` and `hf_real_model`: transformers' own
float32 dequantization of the same GGUF, eager attention).
"""

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.oracle, pytest.mark.checkpoint]

NEW_TOKENS = 32
CHAT_PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple? Answer in two sentences.",
]
RAW_PROMPTS = ["def fibonacci(n):\n", "The three primary colors are"]


@pytest.fixture(scope="session")
def hf_tokenizer(oracle, test_gguf):
    return oracle.AutoTokenizer.from_pretrained(str(test_gguf.parent), gguf_file=test_gguf.name)


def _prompts(tokenizer):
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in CHAT_PROMPTS]
    return chat + RAW_PROMPTS


def _hf_generate(model, ids, mask=None, **kw):
    import torch

    mask = None if mask is None else torch.from_numpy(mask)
    return model.generate(torch.from_numpy(ids), attention_mask=mask, **kw).numpy()


@pytest.mark.parametrize("which", range(len(CHAT_PROMPTS) + len(RAW_PROMPTS)))
def test_greedy_matches_transformers(real_model, real_tokenizer, hf_real_model, which):
    text = _prompts(real_tokenizer)[which]
    ids = real_tokenizer([text], return_tensors="np")["input_ids"]
    ours = real_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = _hf_generate(hf_real_model, ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours.shape[1] - ids.shape[1] == NEW_TOKENS  # no prompt stops early: 32 tokens compared
    np.testing.assert_array_equal(ours, theirs)


def test_greedy_batched_left_padding_matches_transformers(real_model, real_tokenizer, hf_real_model):
    enc = real_tokenizer(_prompts(real_tokenizer), padding=True, padding_side="left", return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()  # the prompts differ in length: there is padding
    ours = real_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = _hf_generate(hf_real_model, ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(ours, theirs)


def test_seed_flow_runs_and_matches(real_model, real_tokenizer, hf_real_model, hf_tokenizer):
    """The issue's example: chat template -> tokenizer -> generate -> strip the prompt -> batch_decode."""
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]

    def flow(model, tokenizer, to_model):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer([text], return_tensors=to_model)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
        out = np.asarray(out)
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    ours = flow(real_model, real_tokenizer, "np")
    theirs = flow(hf_real_model, hf_tokenizer, "pt")
    assert ours == theirs
    assert "def " in ours[0]


def test_streamer_text_is_the_decoded_answer(real_model, real_tokenizer):
    from qwen2np import TextStreamer

    pieces = []
    text = real_tokenizer.apply_chat_template([{"role": "user", "content": "Say 你好 with an emoji."}],
                                            tokenize=False, add_generation_prompt=True)
    ids = real_tokenizer([text], return_tensors="np")["input_ids"]
    streamer = TextStreamer(real_tokenizer, skip_prompt=True, skip_special_tokens=True, on_text=pieces.append)
    out = real_model.generate(ids, max_new_tokens=16, streamer=streamer)
    assert "".join(pieces) == real_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
