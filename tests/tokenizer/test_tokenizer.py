"""qwen2np.tokenizer on its own: seed examples, pipeline stages, BPE variants held equal, round trips,
the streaming decoder, speed on a long piece, logging, and the CLI. (Comparisons with transformers are
in test_tokenizer_oracle.py; file errors in test_tokenizer_files.py.)"""

import logging
import os
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import IncrementalDecoder, Qwen2Tokenizer, Qwen2TokenizerFast
from qwen2np.errors import TokenizerInputError
from qwen2np.tokenizer import bpe as B
from qwen2np.tokenizer.bytes_level import from_byte_level, to_byte_level
from qwen2np.tokenizer.pretokenize import nfc, pretokenize
from qwen2np.tokenizer.unicode_compat import nfc_barrier_chars

# characters where tokenizers tend to differ: whitespace kinds, controls, combining marks, scripts, emoji
INTERESTING = list(
    " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200b\u2028\u2029\u202f\u3000\ufeff\x00"
    "'sStTdDmMlLvVeErR.,!?;:-_()[]{}<>|/\\\"#@$%^&*+=~`"
    "0123456789²³½¼Ⅻⅳ٣३๓①"
    "aAzZéèÉ\u0301\u0300\u0327eEıİßẞﬁ"
    "日本語中文한국어ひらがなカタカナ"
    "العربيةहिन्दीไทยעבריתΕλληνικάРусский"
    "😀🦜👍🏽👨‍👩‍👧🇫🇷🏳️‍🌈\u200d\ufe0f"
    # newer than the Rust library's Unicode tables (qwen2np.tokenizer.unicode_compat)
    "\U00012550\u0558\u0c5c\U000124f0\u0c3c\u07fd\U00011935\U00011930\u0316ﬆß"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
            "<|vision_pad|>", "<|im_end", "|>", "<"]


def texts(with_specials=True):
    """Strings biased to the interesting characters above, mixed with arbitrary text."""
    parts = [st.text(st.sampled_from(INTERESTING), max_size=12), st.text(max_size=12)]
    if with_specials:
        parts.append(st.sampled_from(SPECIALS))
    return st.lists(st.one_of(*parts), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained()


# ---------------------------------------------------------------- the seed's examples and basic API
def test_seed_examples(tok):
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok(" Hello world")["input_ids"] == [21927, 1879]
    assert tok.encode("Hello world", add_special_tokens=True) == [9707, 1879]  # Qwen2 adds no BOS/EOS


def test_sizes_and_special_tokens(tok):
    assert (tok.vocab_size, len(tok)) == (151643, 151665)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.unk_token is None and tok.bos_token_id is None
    assert tok.model_max_length == 131072 and tok.padding_side == "right"
    flags = {i: t.special for i, t in tok.added_tokens_decoder.items()}
    assert sorted(flags) == list(range(151643, 151665))
    assert [i for i, s in flags.items() if not s] == list(range(151657, 151665))  # tool_call, FIM, repo: not special
    assert tok.added_tokens_encoder["<tool_call>"] == 151657
    assert "You are Qwen, created by Alibaba Cloud" in tok.chat_template
    assert Qwen2TokenizerFast is Qwen2Tokenizer


def test_split_special_tokens_splits_only_special_ones(tok):
    text = "x<tool_call>y<|im_end|>"
    assert tok(text)["input_ids"] == [87, 151657, 88, 151645]
    split = tok(text, split_special_tokens=True)["input_ids"]
    assert split[:3] == [87, 151657, 88] and 151645 not in split
    assert tok.decode(split) == text


def test_tokens_and_conversions(tok):
    assert tok.tokenize(" Hello\n<|im_end|>") == ["ĠHello", "Ċ", "<|im_end|>"]
    assert tok.convert_tokens_to_ids("ĠHello") == 21927
    assert tok.convert_tokens_to_ids("not-a-token") is None  # no unk token
    assert tok.convert_ids_to_tokens(np.int64(1879)) == "Ġworld"
    assert tok.convert_tokens_to_string(["ĠHello", "Ċ"]) == " Hello\n"
    assert tok.get_vocab()["<|im_end|>"] == 151645 and len(tok.get_vocab()) == len(tok)


def test_batch_encoding_numpy_and_to(tok):
    enc = tok(["Hello world", "Hi"], padding=True, return_tensors="np", padding_side="left")
    assert enc.input_ids.dtype == np.int64 and enc.attention_mask.dtype == np.int64
    assert enc.input_ids.tolist() == [[9707, 1879], [151643, 13048]]
    assert enc.attention_mask.tolist() == [[1, 1], [0, 1]]
    assert enc.to("cpu") is enc
    with pytest.raises(TokenizerInputError, match="qwen2np returns NumPy"):
        tok("Hello", return_tensors="pt")
    with pytest.raises(TokenizerInputError, match="different lengths"):
        tok(["a b c", "a"], return_tensors="np")


def test_decode_forms(tok):
    ids = tok.encode("Hi<|im_end|>")
    assert tok.decode(ids) == "Hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    assert tok.decode(np.array([ids, ids])) == ["Hi<|im_end|>"] * 2
    assert tok.batch_decode([ids], skip_special_tokens=True) == ["Hi"]
    assert tok.decode(9707) == "Hello"
    assert tok.decode([], skip_special_tokens=True) == ""


def test_clean_up_is_refused_for_bpe_unless_forced(tok, caplog):
    ids = tok.encode("a , b .")
    with caplog.at_level(logging.WARNING, logger="qwen2np.tokenizer"):
        assert tok.decode(ids, clean_up_tokenization_spaces=True) == "a , b ."
    forced = Qwen2Tokenizer.from_pretrained(clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    assert forced.decode(ids, clean_up_tokenization_spaces=True) == "a, b."


def test_too_long_warns_once(caplog):
    short = Qwen2Tokenizer.from_pretrained(model_max_length=3)
    with caplog.at_level(logging.WARNING, logger="qwen2np.tokenizer"):
        short("one two three four")
        short.encode("one two three four five")
    warnings = [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]
    assert len(warnings) == 1 and "(4 > 3)" in warnings[0].getMessage()
    assert len(short("one two three four")["input_ids"]) == 4  # a warning, no truncation


def test_add_tokens_and_setters():
    t = Qwen2Tokenizer.from_pretrained()
    assert t.add_tokens(["<extra>"], special_tokens=True) == 1
    assert t.encode("a<extra>b") == [64, 151665, 65]
    t.pad_token = "<|im_end|>"
    assert t.pad_token_id == 151645
    assert t.decode([151665], skip_special_tokens=True) == ""


# ---------------------------------------------------------------- pipeline stages
def test_pretokenize_covers_text_and_digits_alone():
    text = "I'M 12½ Ⅻ\r\n\r\n  x\u3000y\x1cz"
    pieces = pretokenize(text)
    assert "".join(pieces) == text
    assert ["1", "2", "½", "Ⅻ"] == [p for p in pieces if any(c in p for c in "12½Ⅻ")]  # one numeral per piece


@given(st.text(max_size=40))
@settings(max_examples=200)
def test_byte_level_round_trip(text):
    assert from_byte_level(to_byte_level(text)) == text.encode("utf-8")


@given(st.text(max_size=60))
@settings(max_examples=300)
def test_bpe_variants_agree(text):
    """The teaching loop, the fast loop and the heap give the same tokens on Qwen's merges."""
    t = Qwen2Tokenizer.from_pretrained()
    ranks = _ranks(t)
    for piece in pretokenize(text):
        ids = list(map(t._byte_ids.__getitem__, piece.encode("utf-8")))
        naive = [t._vocab[s] for s in B.bpe_naive(to_byte_level(piece), ranks)]
        assert B.bpe_short(ids, t._merge_table) == naive
        assert B.bpe_long(ids, t._merge_table) == naive


_RANKS = {}


def _ranks(t):
    if "r" not in _RANKS:
        _RANKS["r"] = B.merge_ranks(t._merges)
    return _RANKS["r"]


def test_bpe_variants_agree_on_long_pieces(tok):
    rng = np.random.default_rng(0)
    ranks = _ranks(tok)
    letters = np.array(list("abcdefghij日本語ßé"))
    for n in (65, 200, 1000):
        piece = "".join(rng.choice(letters, n))
        ids = list(map(tok._byte_ids.__getitem__, piece.encode("utf-8")))
        naive = [tok._vocab[s] for s in B.bpe_naive(to_byte_level(piece), ranks)]
        assert B.bpe_long(ids, tok._merge_table) == naive == B.bpe_short(ids, tok._merge_table)


@pytest.mark.slow
def test_100k_piece_without_spaces_is_fast(tok):
    rng = np.random.default_rng(1)
    piece = "".join(rng.choice(np.array(list("abcdefghijklmnopqrstuvwxyz")), 100_000))
    assert pretokenize(piece) == [piece]
    t0 = time.perf_counter()
    ids = Qwen2Tokenizer.from_pretrained().encode(piece)
    elapsed = time.perf_counter() - t0
    assert tok.decode(ids) == piece
    assert elapsed < 10, f"BPE of a 100,000-character piece took {elapsed:.1f} s"


# ---------------------------------------------------------------- round trips
@given(texts(with_specials=False))
@settings(max_examples=300)
def test_decode_encode_is_nfc(text):
    """decode(encode(s)) == NFC(s). subtle: NFC as the Rust library does it, which differs from
    unicodedata's only around the ~100 combining marks newer than its tables (unicode_compat.py)."""
    tok = Qwen2Tokenizer.from_pretrained()
    assert tok.decode(tok.encode(text)) == nfc(text)
    if nfc_barrier_chars().isdisjoint(text):
        assert nfc(text) == unicodedata.normalize("NFC", text)


def test_nfc_applies_between_added_tokens(tok):
    """subtle: NFC runs on the text between added tokens, so a combining mark after '>' stays apart."""
    text = "<|im_end|>\u0338"
    assert unicodedata.normalize("NFC", text) == "<|im_end|\u226f"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


@given(texts())
@settings(max_examples=300)
def test_batch_equals_one_by_one(text):
    tok = Qwen2Tokenizer.from_pretrained()
    batch = tok([text, "x" + text], padding=True, padding_side="left")
    one = tok.encode(text)
    n = len(batch["input_ids"][0])
    assert batch["input_ids"][0][n - len(one):] == one and sum(batch["attention_mask"][0]) == len(one)


# ---------------------------------------------------------------- streaming decoder
def _ids_lists():
    added = st.integers(151643, 151664)
    single_bytes = st.integers(0, 255)  # ids 0..255 are the one-byte tokens: they cut UTF-8 sequences
    return st.lists(st.one_of(st.integers(0, 151664), added, single_bytes), max_size=30)


@given(_ids_lists(), st.booleans())
@settings(max_examples=400)
def test_streaming_equals_decode(ids, skip):
    tok = Qwen2Tokenizer.from_pretrained()
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    assert len(dec._pending) <= 3  # O(1) state: never more than one unfinished character
    assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=skip)


@given(texts())
@settings(max_examples=300)
def test_streaming_never_emits_halves(text):
    tok = Qwen2Tokenizer.from_pretrained()
    dec = IncrementalDecoder(tok)
    out = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    if "\ufffd" not in text:
        assert not any("\ufffd" in o for o in out)
    assert "".join(out) == tok.decode(tok.encode(text))


def test_streaming_emoji_and_chinese(tok):
    for text in ["Hi 🦜!", "🧑‍💻 写代码", "👨‍👩‍👧🇫🇷"]:
        dec = IncrementalDecoder(tok)
        out = [dec.push(i) for i in tok.encode(text)]
        assert "".join(out) + dec.flush() == text and all("\ufffd" not in o for o in out)
    dec = IncrementalDecoder(tok)
    assert dec.push(9284) == ""  # 'ðŁ': the first two bytes of an emoji, held back
    assert dec.flush() == "\ufffd"  # truly incomplete at the end: U+FFFD, as decode gives
    with pytest.raises(TokenizerInputError, match="token id 999999"):
        dec.push(999999)


def test_streaming_is_linear(tok):
    ids = tok.encode("日本語のテキストと English words 😀 " * 400)
    dec = IncrementalDecoder(tok)
    t0 = time.perf_counter()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    per_token = (time.perf_counter() - t0) / len(ids)
    assert text == tok.decode(ids)
    assert per_token < 50e-6, f"{per_token * 1e6:.1f} µs per token"


# ---------------------------------------------------------------- bad input
def test_bad_input_types_and_ids(tok):
    with pytest.raises(TypeError, match="int"):
        tok(123)
    with pytest.raises(TypeError, match=r"text\[1\]: expected a str, found NoneType"):
        tok(["a", None])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"hello")
    for bad in (151665, -1, 10**9):
        with pytest.raises(TokenizerInputError, match=f"token id {bad}"):
            tok.decode([9707, bad])
    with pytest.raises(TypeError, match="str"):
        tok.decode(["a"])
    with pytest.raises(TokenizerInputError, match="padding='sideways'"):
        tok("a", padding="sideways")
    with pytest.raises(TypeError, match="padding_sid"):
        tok("a", padding_sid="left")
    with pytest.raises(TokenizerInputError, match="surrogate"):
        tok.encode("a\ud800b")


def test_bad_input_does_not_corrupt_state(tok):
    before = tok.encode("Hello world 😀")
    for bad in ([9707, 10**9], ["x"]):
        with pytest.raises((TokenizerInputError, TypeError)):
            tok.decode(bad)
    with pytest.raises(TypeError):
        tok(["ok", 3])
    assert tok.encode("Hello world 😀") == before


# ---------------------------------------------------------------- command line
def test_cli_tokenize():
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    out = subprocess.run([sys.executable, "-m", "qwen2np", "tokenize", "Hello world"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "|Hello|·world|"
    assert "9707" in lines[3] and "Hello" in lines[3] and "1879" in lines[4] and "Ġworld" in lines[4]
    ids = subprocess.run([sys.executable, "-m", "qwen2np", "tokenize", " Hello world", "--ids-only"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ids.stdout.split() == ["21927", "1879"]
    missing = subprocess.run([sys.executable, "-m", "qwen2np", "tokenize", "x", "--model", "/no/such/dir"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "/no/such/dir" in missing.stderr


def test_normalization_none_skips_nfc(tmp_path):
    """A GGUF's tokenizer, as transformers builds it, has no NFC step; `normalization=None` does that."""
    raw = Qwen2Tokenizer.from_pretrained(normalization=None)
    nfc = Qwen2Tokenizer.from_pretrained()
    assert raw.encode("cafe\u0301") != nfc.encode("cafe\u0301") and raw.decode(raw.encode("cafe\u0301")) == "cafe\u0301"
    raw.save_pretrained(tmp_path)
    assert Qwen2Tokenizer.from_pretrained(tmp_path).normalization is None


@pytest.mark.checkpoint
def test_gguf_tokenizer(test_gguf):
    tok = Qwen2Tokenizer.from_pretrained(test_gguf, model_max_length=64)
    assert tok.encode("Hello world") == [9707, 1879] and tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == 64 and "You are Qwen" in tok.chat_template
    with pytest.raises(Exception, match="accepts overrides of"):
        Qwen2Tokenizer.from_pretrained(test_gguf, vocab={"a": 0})
