"""`generate` against transformers 5.24's `generate` on a small random Qwen2 with the same weights (fast),
plus the argument checks. The real checkpoint is in test_generation_checkpoint.py.
"""

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import GenerationError
from qwen2np.generation import GenerationConfig
from qwen2np.generation.testing import TinyCountingLM

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=5, pad_token_id=0, bos_token_id=1)

# three prompts of lengths 6, 3 and 1, left-padded with 0
IDS = np.array([[11, 12, 13, 14, 15, 16], [0, 0, 0, 21, 22, 23], [0, 0, 0, 0, 0, 30]], dtype=np.int64)
MASK = (np.arange(6)[None, :] >= np.array([0, 3, 5])[:, None]).astype(np.int64)


@pytest.fixture(scope="module")
def ours():
    return Qwen2ForCausalLM(Qwen2Config(**CONFIG), seed=0)


@pytest.fixture(scope="module")
def theirs(oracle, ours):
    import torch

    hf_config = oracle.Qwen2Config(**ours.config.to_dict())
    hf_config._attn_implementation = "eager"
    model = oracle.Qwen2ForCausalLM(hf_config).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    return model


def hf_generate(model, ids, mask=None, **kw):
    import torch

    kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    mask = None if mask is None else torch.from_numpy(mask)
    return model.generate(torch.from_numpy(ids), attention_mask=mask, **kw).numpy()


def both(ours, theirs, ids, mask=None, **kw):
    got = ours.generate(ids, attention_mask=mask, **kw)
    want = hf_generate(theirs, ids, mask, **kw)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    return got


@pytest.mark.oracle
def test_greedy_single_and_batched_left_padding(ours, theirs):
    for row in range(3):
        prompt = IDS[row : row + 1, MASK[row] == 1]
        single = both(ours, theirs, prompt, max_new_tokens=12)
        batched = ours.generate(IDS, attention_mask=MASK, max_new_tokens=12)
        # a left-padded row continues exactly as the same prompt alone
        np.testing.assert_array_equal(batched[row, 6:], single[0, prompt.shape[1]:])
    both(ours, theirs, IDS, MASK, max_new_tokens=12)


@pytest.mark.oracle
def test_eos_stops_rows_and_pads_finished_ones(ours, theirs):
    free = ours.generate(IDS, attention_mask=MASK, max_new_tokens=12)
    eos = [int(free[0, 8]), int(free[1, 10])]  # row 0 finishes at its 3rd new token, row 1 at its 5th
    out = both(ours, theirs, IDS, MASK, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert out[0, 8] == eos[0] and (out[0, 9:] == 0).all()
    # an int eos too, and the pad defaulting to eos[0] when no pad is set anywhere
    both(ours, theirs, IDS, MASK, max_new_tokens=12, eos_token_id=eos[0])


@pytest.mark.oracle
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(ours, theirs, penalty):
    both(ours, theirs, IDS, MASK, max_new_tokens=10, repetition_penalty=penalty)


@pytest.mark.oracle
def test_repetition_penalty_skips_left_padding(ours, theirs):
    # Pad with the runner-up of the last row's first step: a reward (penalty < 1) would make it win if the
    # padding counted as "seen" (transformers 4.x), but 5.24 skips the padding.
    logits = ours(IDS[2:, 5:]).logits[0, -1]
    pad = int(np.argsort(logits)[-2])
    ids = np.where(MASK == 1, IDS, pad)
    out = both(ours, theirs, ids, MASK, max_new_tokens=4, repetition_penalty=0.05, pad_token_id=pad)
    alone = ours.generate(IDS[2:, 5:], max_new_tokens=4, repetition_penalty=0.05)
    np.testing.assert_array_equal(out[2, 6:], alone[0, 1:])
    assert out[2, 6] != pad


@pytest.mark.oracle
def test_min_new_tokens_and_lengths(ours, theirs):
    free = ours.generate(IDS[:1], max_new_tokens=6)
    eos = int(free[0, 7])
    out = both(ours, theirs, IDS[:1], max_new_tokens=10, eos_token_id=eos, min_new_tokens=4)
    assert eos not in out[0, 6:10].tolist()
    assert both(ours, theirs, IDS[:1]).shape == (1, 6 + 20)  # the library default: 20 new tokens
    assert both(ours, theirs, IDS[:1], max_length=9).shape == (1, 9)


@pytest.mark.oracle
def test_mask_inferred_from_pad_when_not_given(ours, theirs):
    # pad (0) is not an eos id here, so transformers infers the mask from the pad ids
    both(ours, theirs, IDS, None, max_new_tokens=8)
    # with pad == eos it cannot, and every position counts
    both(ours, theirs, IDS, None, max_new_tokens=8, eos_token_id=0, pad_token_id=0)


def test_cache_and_no_cache_agree(ours):
    a = ours.generate(IDS, attention_mask=MASK, max_new_tokens=8)
    b = ours.generate(IDS, attention_mask=MASK, max_new_tokens=8, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_generation_config_precedence():
    lm = TinyCountingLM(generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=9))
    assert lm.generate([[1]]).tolist() == [[1, 2, 3, 4]]  # the model's generation_config
    assert lm.generate([[1]], generation_config=GenerationConfig(max_new_tokens=5)).shape == (1, 6)
    assert lm.generate([[1]], generation_config=GenerationConfig(max_new_tokens=5), max_new_tokens=2).shape == (1, 3)
    assert lm.generate([[6]], max_new_tokens=8).tolist() == [[6, 7, 8, 9]]  # eos from the model's config
    assert TinyCountingLM().generate([[1]]).shape == (1, 21)  # library default max_length=20 + prompt


def test_positions_and_masks_passed_to_the_model():
    lm = TinyCountingLM()
    lm.generate(IDS % 10, attention_mask=MASK, max_new_tokens=3)
    (ids0, mask0, pos0), (ids1, mask1, pos1), (ids2, mask2, pos2) = lm.calls
    np.testing.assert_array_equal(pos0, [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pos1[:, 0], [6, 3, 1])
    np.testing.assert_array_equal(pos2[:, 0], [7, 4, 2])
    assert mask1.shape == (3, 7) and mask2.shape == (3, 8) and (mask2[:, 6:] == 1).all()
    assert ids1.shape == (3, 1)
    lm.calls.clear()
    lm.generate([[1, 2]], max_new_tokens=2)
    assert lm.calls[0][1] is None  # an all-ones mask is dropped, as transformers does


def test_sampling_is_reproducible(ours):
    kw = dict(attention_mask=MASK, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0)
    a = ours.generate(IDS, seed=1234, **kw)
    np.testing.assert_array_equal(a, ours.generate(IDS, seed=1234, **kw))
    assert not np.array_equal(a, ours.generate(IDS, seed=1235, **kw))
    # the draws of a row depend on (seed, row, step) only: the unpadded row 0 alone gives the same tokens
    np.testing.assert_array_equal(ours.generate(IDS[:1], seed=1234, max_new_tokens=10, do_sample=True,
                                                temperature=1.5, top_k=0), a[:1])
    # top_k=1 leaves one candidate: sampling is then greedy
    greedy = ours.generate(IDS, attention_mask=MASK, max_new_tokens=6)
    np.testing.assert_array_equal(ours.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=True,
                                                top_k=1, seed=7), greedy)


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, found 0"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be a number > 0 when sampling .*, found 0.0"),
    (dict(do_sample=True, temperature=-1), "temperature"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\], found 0.0"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
    (dict(max_new_tokens=60),
     r"prompt \(6 tokens\) \+ max_new_tokens \(60\) = 66 exceeds .*max_position_embeddings=64"),
    (dict(max_length=4), "nothing to generate"),
    (dict(num_beams=4), "not implemented in qwen2np generate: num_beams=4"),
    (dict(seed=-1), "seed"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(eos_token_id=3, pad_token_id=99), "pad_token_id 99 is not a token id"),
])
def test_bad_arguments_raise_generation_error(kw, message):
    lm = TinyCountingLM()
    with pytest.raises(GenerationError, match=message):
        lm.generate(IDS % 10, attention_mask=MASK, **kw)


def test_bad_inputs_raise_clear_errors():
    lm = TinyCountingLM()
    with pytest.raises(GenerationError, match="rows of different lengths"):
        lm.generate([[1, 2], [3]])
    with pytest.raises(GenerationError, match=r"expected a \[batch, length\] array.*found shape \(2,\)"):
        lm.generate(np.array([1, 2]))
    with pytest.raises(GenerationError, match=r"input_ids\[0, 1\] = 12 is not a token id"):
        lm.generate([[1, 12]])
    with pytest.raises(GenerationError, match="attention_mask: expected shape"):
        lm.generate([[1, 2]], attention_mask=[[1]])
    with pytest.raises(GenerationError, match="at most max_position_embeddings=64"):
        lm.generate(np.ones((1, 64), dtype=np.int64))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['tempreature'\\]"):
        lm.generate([[1]], tempreature=0.5)


class BrokenLM(TinyCountingLM):
    """TinyCountingLM whose logits turn NaN (or infinite) in one row from one step on, as a float16 overflow
    or a NaN weight makes them."""

    def __init__(self, row, step, value=np.nan, **kw):
        super().__init__(**kw)
        self.row, self.step, self.value = row, step, value

    def __call__(self, input_ids, **kw):
        out = super().__call__(input_ids, **kw)
        if len(self.calls) > self.step:
            out.logits[self.row, -1, 3] = self.value
        return out


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_generate_never_picks_a_token_from_logits_that_are_not_finite(do_sample, value):
    """argmax of NaN logits is token 0 (a left-padded float16 batch generated "!" for 7 rows of 8 before
    issue 17): generate names the row and the step instead."""
    lm = BrokenLM(row=1, step=2, value=value)
    with pytest.raises(GenerationError, match=r"not finite in row 1 at step 2 \(the 3rd new token\)"):
        lm.generate([[1, 2], [3, 4]], max_new_tokens=5, do_sample=do_sample, seed=0 if do_sample else None)
    assert BrokenLM(row=1, step=9).generate([[1, 2], [3, 4]], max_new_tokens=5).shape == (2, 7)   # before: fine


def test_a_finished_row_may_have_any_logits():
    """A row that has finished is fed padding and its logits are not used: they are not checked."""
    lm = BrokenLM(row=0, step=1)
    out = lm.generate([[6, 7], [1, 2]], max_new_tokens=4, eos_token_id=8, pad_token_id=0)
    assert out[0].tolist() == [6, 7, 8, 0, 0, 0]
