"""Hostile input to the tokenizer's public API: wrong types, None, bad ids, bad settings, misuse of the
streaming decoder. Each is refused with a one-line qwen2np error naming what and where (TokenizerTypeError
for a wrong type: also a TypeError), and leaves the tokenizer as it was. Bad files: test_tokenizer_files.py
and test_tokenizer_json.py."""

import numpy as np
import pytest

from qwen2np import IncrementalDecoder, Qwen2Tokenizer
from qwen2np.errors import Qwen2npError, TokenizerInputError, TokenizerTypeError
from qwen2np.tokenizer import AddedToken


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained()


def _set(name, value):
    def call(tok):
        setattr(tok, name, value)
    return call


CASES = [
    # -- encoding
    ("call None", lambda t: t(None), TokenizerTypeError, r"tokenizer call: expected `text` \(a str or a list of str\), found None"),
    ("encode bytes", lambda t: t.encode(b"x"), TokenizerTypeError, r"text: expected a str or a list of str, found bytes"),
    ("encode ints", lambda t: t.encode([1, 2]), TokenizerTypeError, r"text\[0\]: expected a str, found int"),
    ("nested list", lambda t: t([["a"]]), TokenizerTypeError, r"text\[0\]: expected a str, found list"),
    ("text_pair int", lambda t: t("a", text_pair=5), TokenizerTypeError, r"text_pair: expected a str or a list of str, found int"),
    ("tokenize None", lambda t: t.tokenize(None), TokenizerTypeError, r"expected `text`"),
    ("max_length -1", lambda t: t("abc", truncation=True, max_length=-1), TokenizerInputError, r"max_length: expected an int >= 0 or None, found -1"),
    ("max_length str", lambda t: t("abc", truncation=True, max_length="5"), TokenizerTypeError, r"max_length: expected an int or None, found str '5'"),
    ("max_length float", lambda t: t("abc", max_length=2.5), TokenizerTypeError, r"max_length: expected an int or None, found float 2.5"),
    ("max_length bool", lambda t: t("abc", max_length=True), TokenizerTypeError, r"max_length: expected an int or None, found bool"),
    ("pad_to_multiple_of -2", lambda t: t(["a", "bb"], padding=True, pad_to_multiple_of=-2), TokenizerInputError, r"pad_to_multiple_of: expected an int >= 0"),
    ("pad_to_multiple_of str", lambda t: t(["a"], padding=True, pad_to_multiple_of="2"), TokenizerTypeError, r"pad_to_multiple_of: expected an int or None"),
    ("unknown kwarg", lambda t: t("a", padding_sid="left"), TokenizerTypeError, r"unexpected keyword argument\(s\) \['padding_sid'\]"),
    ("surrogate", lambda t: t.encode("a\ud800b"), TokenizerInputError, r"lone surrogate U\+D800 at index 1"),
    # -- decoding
    ("decode None", lambda t: t.decode(None), TokenizerTypeError, r"token_ids: expected an int, found NoneType"),
    ("decode str", lambda t: t.decode("abc"), TokenizerTypeError, r"token_ids: expected an int, found str"),
    ("decode [None]", lambda t: t.decode([9707, None]), TokenizerTypeError, r"token_ids\[1\]: expected an int, found NoneType"),
    ("decode [1.5]", lambda t: t.decode([1.5]), TokenizerTypeError, r"token_ids\[0\]: expected an int, found float"),
    ("decode -1", lambda t: t.decode([9707, -1]), TokenizerInputError, r"token id -1: not in the vocabulary \(expected 0 <= id < 151665"),
    ("decode 2**70", lambda t: t.decode([2**70]), TokenizerInputError, r"token id 1180591620717411303424: not in the vocabulary"),
    ("decode float array", lambda t: t.decode(np.array([1.0, 2.0])), TokenizerTypeError, r"expected integer ids in at most 2 dimensions, found an array of dtype float64"),
    ("decode 3-D array", lambda t: t.decode(np.zeros((1, 1, 2), np.int64)), TokenizerTypeError, r"shape \(1, 1, 2\)"),
    ("decode ragged", lambda t: t.decode([[1], 2]), TokenizerTypeError, r"token_ids\[1\]: expected a list of ids like token_ids\[0\], found int"),
    ("decode dict", lambda t: t.decode({"ids": [1]}), TokenizerInputError, r"a dict must hold 'input_ids'; found the keys \['ids'\]"),
    ("decode set", lambda t: t.decode({1, 2}), TokenizerTypeError, r"token_ids: expected an int, found set"),
    ("decode generator", lambda t: t.decode(i for i in [1]), TokenizerTypeError, r"token_ids: expected an int, found generator"),
    ("batch_decode None", lambda t: t.batch_decode(None), TokenizerTypeError, r"batch_decode: expected a list of sequences or an array, found NoneType"),
    ("convert_ids_to_tokens None", lambda t: t.convert_ids_to_tokens(None), TokenizerTypeError, r"token id: expected an int, found NoneType"),
    ("convert_ids_to_tokens -5", lambda t: t.convert_ids_to_tokens([-5]), TokenizerInputError, r"token id -5"),
    ("convert_tokens_to_ids 5", lambda t: t.convert_tokens_to_ids(5), TokenizerTypeError, r"convert_tokens_to_ids: expected a token string or a list of them, found int"),
    ("convert_tokens_to_ids [5]", lambda t: t.convert_tokens_to_ids(["a", 5]), TokenizerTypeError, r"convert_tokens_to_ids: tokens\[1\]: expected a str"),
    ("convert_tokens_to_string", lambda t: t.convert_tokens_to_string(["a", None]), TokenizerTypeError, r"convert_tokens_to_string: tokens\[1\]: expected a str"),
    ("strict errors", lambda t: Qwen2Tokenizer.from_pretrained(errors="strict").decode([9707, 9284]), TokenizerInputError, r"decode with errors='strict': bytes 5..6 of the decoded tokens are not valid UTF-8"),
    # -- the streaming decoder
    ("IncrementalDecoder(None)", lambda t: IncrementalDecoder(None), TokenizerTypeError, r"IncrementalDecoder: expected a qwen2np Qwen2Tokenizer, found NoneType"),
    ("push None", lambda t: IncrementalDecoder(t).push(None), TokenizerTypeError, r"token id: expected an int, found NoneType"),
    ("push list", lambda t: IncrementalDecoder(t).push([1, 2]), TokenizerTypeError, r"token id: expected an int, found list"),
    ("push -1", lambda t: IncrementalDecoder(t).push(-1), TokenizerInputError, r"token id -1: not in the vocabulary"),
    # -- settings and vocabulary
    ("padding_side", _set("padding_side", "up"), TokenizerInputError, r"padding_side: expected 'left' or 'right', found 'up'"),
    ("model_max_length str", _set("model_max_length", "x"), TokenizerTypeError, r"model_max_length: expected a non-negative integer or None, found str 'x'"),
    ("model_max_length nan", _set("model_max_length", float("nan")), TokenizerInputError, r"found nan"),
    ("errors bogus", _set("errors", "bogus"), TokenizerInputError, r"errors: expected the name of a codec error handler"),
    ("normalization", _set("normalization", "NFD"), TokenizerInputError, r"normalization: expected 'NFC' or None, found 'NFD'"),
    ("eos_token int", _set("eos_token", 5), TokenizerTypeError, r"eos_token: expected a str or AddedToken, found int"),
    ("pad_token_id str", _set("pad_token_id", "x"), TokenizerTypeError, r"token id: expected an int, found str"),
    ("eos_token_id -1", _set("eos_token_id", -1), TokenizerInputError, r"token id -1: not in the vocabulary"),
    ("add_tokens None", lambda t: t.add_tokens(None), TokenizerTypeError, r"add_tokens: expected a str, an AddedToken or a list of them, found NoneType"),
    ("add_tokens [ok, 5]", lambda t: t.add_tokens(["<ok>", 5]), TokenizerTypeError, r"add_tokens: new_tokens\[1\]: expected a str or AddedToken, found int"),
    ("AddedToken(5)", lambda t: AddedToken(5), TokenizerTypeError, r"AddedToken content: expected a str, found int"),
    ("save_pretrained(None)", lambda t: t.save_pretrained(None), TokenizerTypeError, r"save_pretrained: expected a folder path, found NoneType"),
    # -- construction
    ("from_pretrained(5)", lambda t: Qwen2Tokenizer.from_pretrained(5), TokenizerTypeError, r"from_pretrained: expected a path"),
    ("model_max_length inf", lambda t: Qwen2Tokenizer.from_pretrained(model_max_length=float("inf")), TokenizerInputError, r"model_max_length: .* found inf"),
    ("chat_template [1]", lambda t: Qwen2Tokenizer(vocab={"a": 0}, merges=[], chat_template=[1]), TokenizerTypeError, r"chat_template: expected a str"),
    ("added_tokens_decoder list", lambda t: Qwen2Tokenizer(added_tokens_decoder=[1]), TokenizerTypeError, r"added_tokens_decoder: expected a dict"),
    ("added_tokens_decoder key", lambda t: Qwen2Tokenizer(added_tokens_decoder={"x": "<a>"}), TokenizerInputError, r"added_tokens_decoder: key 'x': expected a non-negative integer id"),
    ("added_tokens_decoder ''", lambda t: Qwen2Tokenizer(added_tokens_decoder={5: ""}), TokenizerInputError, r"added_tokens_decoder\[5\]: expected a non-empty token"),
    ("additional_special_tokens [None]", lambda t: Qwen2Tokenizer(additional_special_tokens=["<a>", None]), TokenizerTypeError, r"additional_special_tokens\[1\]: expected a str or AddedToken, found NoneType"),
    ("tokenizer_file=5", lambda t: Qwen2Tokenizer(tokenizer_file=5), TokenizerTypeError, r"tokenizer_file: expected a path, found int"),
    ("ignore_merges 'yes'", lambda t: Qwen2Tokenizer(ignore_merges="yes"), TokenizerTypeError, r"ignore_merges: expected True or False, found str"),
]


@pytest.mark.parametrize("name, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_error(tok, name, call, error, message):
    before = (tok.encode("Hello world 😀<|im_end|>"), tok.padding_side, tok.model_max_length, tok.errors,
              tok.eos_token, tok.pad_token, len(tok), tok.normalization)
    with pytest.raises(error, match=message) as info:
        call(tok)
    assert isinstance(info.value, Qwen2npError) and "\n" not in str(info.value)
    if isinstance(info.value, TokenizerTypeError):
        assert isinstance(info.value, TypeError)  # `except TypeError` still catches a wrong type
    after = (tok.encode("Hello world 😀<|im_end|>"), tok.padding_side, tok.model_max_length, tok.errors,
             tok.eos_token, tok.pad_token, len(tok), tok.normalization)
    assert after == before  # refused: nothing changed


def test_streaming_decoder_survives_refused_pushes(tok):
    ids = tok.encode("Hi 🦜!")  # the parrot's four bytes come in three tokens
    dec = IncrementalDecoder(tok)
    out = [dec.push(ids[0]), dec.push(ids[1]), dec.push(ids[2])]
    assert out[-1] == ""  # an unfinished character, held back
    for bad in (None, -1, "7", 10**9):
        with pytest.raises(Qwen2npError):
            dec.push(bad)
    out += [dec.push(i) for i in ids[3:]] + [dec.flush()]
    assert "".join(out) == "Hi 🦜!"  # the held bytes survived the refused pushes


def test_accepted_edge_values(tok):
    """What transformers accepts, qwen2np accepts with the same result."""
    assert tok.convert_tokens_to_ids(None) is None
    assert tok([], padding=True) == {"input_ids": [], "attention_mask": []}
    assert tok(["a", "bb"], padding=True, pad_to_multiple_of=0)["input_ids"] == [[64], [6066]]
    assert tok.decode(np.int64(9707)) == tok.decode([np.int32(9707)]) == "Hello"
    assert tok.batch_decode(np.array([[9707], [1879]])) == ["Hello", " world"]
    fresh = Qwen2Tokenizer.from_pretrained()
    assert fresh.add_tokens([""]) == 0 and fresh.add_tokens(["<new>", "<new>"]) == 1 and len(fresh) == len(tok) + 1
