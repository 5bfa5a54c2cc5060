"""The real test checkpoint (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) against transformers 5.24.

* every tensor qwen2np loads is bitwise equal to transformers' `from_pretrained(dir, gguf_file=name)`
  (which also shows that qwen2 Q/K rows are not permuted);
* the config dict is the one transformers builds from the same metadata;
* `Qwen2Tokenizer.from_pretrained(path.gguf)` builds the tokenizer transformers builds from the same file;
* `qwen2np convert` writes a folder that transformers loads to the same tensors and tokenizer, and that
  qwen2np loads memory-mapped.
"""

import json
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import Qwen2Tokenizer
from qwen2np.weights.store import load_checkpoint
from qwen2np.io.safetensors_file import is_memory_mapped

pytestmark = [pytest.mark.oracle, pytest.mark.checkpoint, pytest.mark.slow]

CORPUS = [
    "Hello world",
    " Hello world",
    "Write a Python function that reverses a string.",
    "def reverse(s: str) -> str:\n    return s[::-1]\n\n\nprint(reverse('abc'))\r\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * 1234567;\n}",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "[PAD151665] is plain text here, as is <|not_a_token|>.",
    "中文分词测试：今天天气很好。日本語のテキスト。한국어 텍스트",
    "مرحبا بالعالم — नमस्ते दुनिया — สวัสดีชาวโลก",
    "emoji 👩‍👩‍👧‍👦 🇫🇷🇯🇵 👍🏽 and symbols ² ½ Ⅻ ①",
    "   leading spaces\n\n\n  trailing   \t\t tabs \u00a0nbsp\u3000ideographic\u2028line\x85nel\x1c\x1f",
    "DON'T WON'T I'M YOU'RE they'll she'd It's",
    "1234567890 3.14159 1e-6 0x1F",
    "",
]
# subtle: transformers builds the GGUF tokenizer without NFC; these are not NFC and encode differently
# from the original Qwen2 tokenizer (docs/checkpoints.md)
NOT_NFC = ["cafe\u0301", "A\u030a and \u212b", "\u1100\u1161\u11a8 hangul jamo", "e\u0301\u0301 x\u0327"]


@pytest.fixture(scope="module")
def hf_model(hf_real_model):
    """transformers' `from_pretrained(dir, gguf_file=name)` of the real GGUF, float32. conftest.py runs that
    load once and keeps what transformers dequantized as a safetensors folder (a minute saved per run)."""
    return hf_real_model


@pytest.fixture(scope="module")
def hf_tokenizer(oracle, test_gguf):
    return oracle.AutoTokenizer.from_pretrained(test_gguf.parent, gguf_file=test_gguf.name)


@pytest.fixture(scope="module")
def converted(test_gguf, tmp_path_factory):
    from qwen2np.cli import main

    out = tmp_path_factory.mktemp("converted")
    assert main(["convert", str(test_gguf), str(out)]) == 0
    return out


def _assert_same_tensors(ours, state, bitwise=True):
    assert sorted(ours) == sorted(state)
    for name, theirs in state.items():
        theirs = theirs.detach().numpy()
        assert ours[name].shape == theirs.shape, name
        assert ours[name].dtype == theirs.dtype == np.float32, name
        assert np.array_equal(ours[name].view(np.uint32), theirs.view(np.uint32)), name


def test_tensors_are_bitwise_those_of_transformers(hf_model, test_gguf):
    ckpt = load_checkpoint(test_gguf)
    _assert_same_tensors(ckpt.tensors, hf_model.state_dict())
    assert len(ckpt.tensors) == 291 and "lm_head.weight" in ckpt.tensors  # untied in this file


def test_config_is_the_one_transformers_builds(oracle, test_gguf):
    ours = load_checkpoint(test_gguf).config
    theirs = oracle.AutoConfig.from_pretrained(test_gguf.parent, gguf_file=test_gguf.name)
    written = json.loads(theirs.to_json_string(use_diff=True))
    written.pop("transformers_version")
    assert ours == written
    assert ours["tie_word_embeddings"] is False and ours["vocab_size"] == 151936


def test_tokenizer_matches_transformers(hf_tokenizer, test_gguf):
    ours = Qwen2Tokenizer.from_pretrained(test_gguf)
    assert ours.get_vocab() == hf_tokenizer.get_vocab()
    assert len(ours) == len(hf_tokenizer) == 151936
    assert ours.vocab_size == hf_tokenizer.vocab_size
    theirs_added = {i: (t.content, t.special) for i, t in hf_tokenizer.added_tokens_decoder.items()}
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == theirs_added
    for attr in ("eos_token", "pad_token", "bos_token", "unk_token", "eos_token_id", "pad_token_id",
                 "bos_token_id", "chat_template", "model_max_length"):
        assert getattr(ours, attr) == getattr(hf_tokenizer, attr), attr
    for text in CORPUS + NOT_NFC:
        assert ours(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    assert ours("cafe\u0301")["input_ids"] != ours("caf\u00e9")["input_ids"]  # no NFC, as transformers
    ids = list(range(151640, 151670)) + [9707, 1879, 220]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
       form=st.sampled_from([None, "NFC", "NFD"]))
def test_tokenizer_matches_transformers_on_random_text(hf_tokenizer, test_gguf, text, form):
    text = unicodedata.normalize(form, text) if form else text
    assert _ours(test_gguf)(text)["input_ids"] == hf_tokenizer(text)["input_ids"]


_cache = {}


def _ours(path):
    if path not in _cache:
        _cache[path] = Qwen2Tokenizer.from_pretrained(path)
    return _cache[path]


def test_converted_folder_loads_in_transformers_with_the_same_tensors(oracle, hf_model, converted):
    import torch

    model = oracle.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    _assert_same_tensors({k: v.numpy() for k, v in model.state_dict().items()}, hf_model.state_dict())
    assert model.config.tie_word_embeddings is False


def test_converted_folder_loads_in_qwen2np_memory_mapped(hf_model, converted):
    ckpt = load_checkpoint(converted)
    _assert_same_tensors(ckpt.tensors, hf_model.state_dict())
    assert all(is_memory_mapped(t) for t in ckpt.tensors.values())
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"] and ckpt.config["dtype"] == "float32"
    # only what the GGUF states: no sampling defaults, eos is the GGUF's single id
    assert ckpt.generation_config == {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}


def test_converted_tokenizer_matches_the_gguf_one(oracle, hf_tokenizer, converted):
    folder = oracle.AutoTokenizer.from_pretrained(converted)
    assert folder.get_vocab() == hf_tokenizer.get_vocab()
    assert {i: (t.content, t.special) for i, t in folder.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in hf_tokenizer.added_tokens_decoder.items()}
    for attr in ("eos_token", "pad_token", "bos_token", "chat_template"):
        assert getattr(folder, attr) == getattr(hf_tokenizer, attr), attr
    for text in CORPUS:  # NFC text: the folder's tokenizer NFC-normalizes, the GGUF one does not
        assert folder(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
