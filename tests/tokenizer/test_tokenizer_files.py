"""Reading tokenizer files: missing or malformed vocab.json, merges.txt, tokenizer.json and
tokenizer_config.json raise TokenizerFileError naming the file and the line or key; good small files load."""

import json

import pytest

from qwen2np import Qwen2Tokenizer
from qwen2np.errors import TokenizerFileError
from qwen2np.tokenizer.bytes_level import bytes_to_unicode

BYTES = list(bytes_to_unicode().values())  # the 256 one-character tokens


def tiny_vocab(*extra):
    vocab = {ch: i for i, ch in enumerate(BYTES)}
    for token in extra:
        vocab[token] = len(vocab)
    return vocab


def write_folder(path, vocab=None, merges="#version: 0.2\nh e\nhe l\n", config=None, raw_vocab=None):
    path.mkdir(exist_ok=True)
    vocab = tiny_vocab("he", "hel") if vocab is None else vocab
    (path / "vocab.json").write_text(raw_vocab if raw_vocab is not None else json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_bytes(merges.encode("utf-8") if isinstance(merges, str) else merges)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (path / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return path


def test_tiny_folder_loads_lf_and_crlf(tmp_path):
    for name, merges in (("lf", "#version: 0.2\nh e\nhe l\n"), ("crlf", "#version: 0.2\r\nh e\r\nhe l\r\n")):
        tok = Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / name, merges=merges))
        assert tok.tokenize("hello") == ["hel", "l", "o"]
        assert tok.decode(tok.encode("hello <|endoftext|>")) == "hello <|endoftext|>"
        assert tok.eos_token_id == 258  # <|endoftext|> appended after the 258 vocabulary tokens


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):  # resolved like a model path
        Qwen2Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerFileError, match=r"empty: expected tokenizer.json, or vocab.json and merges.txt"):
        Qwen2Tokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(TokenizerFileError, match=r"missing.json: file not found"):
        Qwen2Tokenizer(vocab_file=str(tmp_path / "missing.json"), merges_file=str(tmp_path / "m.txt"))


def test_vocab_bad_json_names_line(tmp_path):
    folder = write_folder(tmp_path / "v", raw_vocab='{\n"a": 0,\n"b": 1,,\n}')
    with pytest.raises(TokenizerFileError, match=r"vocab.json: line 3 column \d+: not valid JSON"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_vocab_duplicates_and_types(tmp_path):
    dup_key = '{"a": 0, "b": 1, "a": 2}'
    with pytest.raises(TokenizerFileError, match=r"vocab.json: key 'a': appears twice"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "k", raw_vocab=dup_key, merges=""))
    dup_id = tiny_vocab("he")
    dup_id["hel"] = dup_id["he"]
    with pytest.raises(TokenizerFileError, match=r"vocab.json: tokens 'he' and 'hel' both have id 256"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "i", vocab=dup_id))
    bad = tiny_vocab()
    bad["x y"] = "7"
    with pytest.raises(TokenizerFileError, match=r"vocab.json: key 'x y': expected a non-negative integer id, found '7'"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "t", vocab=bad, merges=""))
    with pytest.raises(TokenizerFileError, match=r"vocab.json: expected a JSON object"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "l", raw_vocab="[1, 2]", merges=""))


@pytest.mark.parametrize("merges, message", [
    ("#version: 0.2\nh e\nhe  l\n", r"merges.txt: line 3: expected two tokens separated by one space"),
    ("#version: 0.2\nh e\n\nhe l\n", r"merges.txt: line 3: expected two tokens"),
    ("#version: 0.2\nh e\nhe Ω\n", r"merges.txt: line 3: merge 'he Ω': token 'Ω' is not in the vocabulary"),
    ("#version: 0.2\nh e\ne l\n", r"merges.txt: line 3: merge 'e l' makes 'el', which is not in the vocabulary"),
    ("#version: 0.2\nh e\nhe l\nh e\n", r"merges.txt: line 4: merge 'h e' appears twice \(first at line 2\)"),
    ("h e\r\nhe\r\n", r"merges.txt: line 2: expected two tokens separated by one space, found 'he'"),
])
def test_merges_errors_name_line(tmp_path, merges, message):
    with pytest.raises(TokenizerFileError, match=message):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "m", merges=merges))


def test_merges_not_utf8(tmp_path):
    with pytest.raises(TokenizerFileError, match=r"merges.txt: line 2: expected UTF-8 text, found the invalid byte 0xFF \(byte offset 15\)"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "u", merges=b"#version: 0.2\nh\xff e\n"))


@pytest.mark.parametrize("config, message", [
    ('{"model_max_length": "big"}', r"tokenizer_config.json: key 'model_max_length': expected a number, found 'big'"),
    ('{"split_special_tokens": "no"}', r"key 'split_special_tokens': expected true or false"),
    ('{"added_tokens_decoder": {"x": {"content": "<a>"}}}', r"key 'added_tokens_decoder': expected non-negative integer ids as keys, found 'x'"),
    ('{"added_tokens_decoder": {"-1": {"content": "<a>"}}}', r"key 'added_tokens_decoder': expected non-negative integer ids as keys, found '-1'"),
    ('{"added_tokens_decoder": {"300": {"content": 5}}}', r"key 'added_tokens_decoder.300': key 'content': expected a non-empty string"),
    ('{"added_tokens_decoder": {"300": {"content": ""}}}', r"key 'added_tokens_decoder.300': key 'content': expected a non-empty string, found ''"),
    ('{"model_max_length": 1e999}', r"key 'model_max_length': expected a non-negative integer or None, found inf"),
    ('{"model_max_length": -1}', r"key 'model_max_length': expected a non-negative integer or None, found -1"),
    ('{"errors": "bogus"}', r"key 'errors': expected the name of a codec error handler \('replace', 'strict', 'ignore', ...\), found 'bogus'"),
    ('{"normalization": "NFKC"}', r"key 'normalization': expected 'NFC' or None, found 'NFKC'"),
    ('{"ignore_merges": "yes"}', r"key 'ignore_merges': expected true or false, found 'yes'"),
    ('{"added_tokens_decoder": {"300": {"content": "<a>", "special": "yes"}}}', r"key 'special': expected true or false"),
    ('{"eos_token": 42}', r"key 'eos_token': expected a token string"),
    ('{"additional_special_tokens": "<a>"}', r"key 'additional_special_tokens': expected a list of tokens"),
    ('{"chat_template": 3}', r"key 'chat_template': expected a string or a list"),
    ('{"padding_side": 1}', r"key 'padding_side': expected 'left' or 'right'"),
    ('{"eos_token": "<a>",\n "pad_token": }', r"tokenizer_config.json: line 2 column 15: not valid JSON"),
])
def test_config_errors_name_key(tmp_path, config, message):
    with pytest.raises(TokenizerFileError, match=message):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "c", config=config))


def test_config_special_tokens_and_added_tokens(tmp_path):
    config = {"added_tokens_decoder": {"300": {"content": "<a>", "special": False, "normalized": False}},
              "eos_token": {"content": "<e>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "__type": "AddedToken"},
              "pad_token": None, "unk_token": None, "model_max_length": 7, "padding_side": "left"}
    tok = Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "s", config=config))
    assert tok.convert_tokens_to_ids("<a>") == 300 and not tok.added_tokens_decoder[300].special
    assert tok.eos_token == "<e>" and tok.added_tokens_decoder[tok.eos_token_id].special
    assert (tok.pad_token, tok.model_max_length, tok.padding_side) == (None, 7, "left")
    assert tok.encode("x<a>y<e>") == [tok.convert_tokens_to_ids("x"), 300, tok.convert_tokens_to_ids("y"), tok.eos_token_id]


def tokenizer_json(tmp_path, data):
    """Write `data` as tokenizer.json, with the pipeline fields of Qwen's files where `data` has none."""
    from test_tokenizer_json import qwen2_tokenizer_json

    pipeline = {k: v for k, v in qwen2_tokenizer_json({}, []).items() if k != "model"}
    (tmp_path / "tokenizer.json").write_text(json.dumps({**pipeline, **data}), encoding="utf-8")
    return tmp_path


AB = {"a": 0, "b": 1, "ab": 2}


@pytest.mark.parametrize("data, message", [
    ({"model": []}, r"tokenizer.json: key 'model': expected an object"),
    ({"model": {"type": "Unigram", "vocab": []}}, r"key 'model.type': expected 'BPE', found 'Unigram'"),
    ({"model": {"type": "BPE", "merges": []}}, r"key 'model.vocab' is missing"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}}, r"model.merges\[0\]: expected 'left right'"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", 1]]}}, r"model.merges\[0\]: expected 'left right' or \[left, right\]"),
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": [["a", "b"]]}}, r"model.merges: merges\[0\]: merge 'a b' makes 'ab'"),
    ({"model": {"type": "BPE", "vocab": AB, "merges": ["a b"]}, "added_tokens": [{"content": "<x>"}]},
     r"added_tokens\[0\]: expected an object with an integer 'id'"),
    ({"model": {"type": "BPE", "vocab": AB, "merges": ["a b"]}, "added_tokens": [{"id": -1, "content": "<x>"}]},
     r"added_tokens\[0\]: expected an object with an integer 'id' from 0 to 2\*\*32 - 1"),
    ({"model": {"type": "BPE", "vocab": AB, "merges": ["a b"]}, "added_tokens": [{"id": 3, "content": ""}]},
     r"added_tokens\[0\]: key 'content': expected a non-empty string, found ''"),
    ({"model": {"type": "BPE", "vocab": AB, "merges": ["a b"]}, "added_tokens": {}}, r"key 'added_tokens': expected a list"),
    ({"model": {"type": "BPE", "vocab": AB, "merges": []}}, r"key 'model.merges': expected at least one merge, found none"),
    ({"model": {"type": "BPE", "vocab": AB}}, r"key 'model.merges': expected at least one merge, found none"),
])
def test_tokenizer_json_errors_name_key(tmp_path, data, message):
    with pytest.raises(TokenizerFileError, match=message):
        Qwen2Tokenizer.from_pretrained(tokenizer_json(tmp_path, data))


def test_tokenizer_json_given_as_file(tmp_path):
    vocab = tiny_vocab("he")
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": [["h", "e"]]},
            "added_tokens": [{"id": 257, "content": "<x>", "special": False, "normalized": False}]}
    folder = tokenizer_json(tmp_path, data)
    tok = Qwen2Tokenizer.from_pretrained(folder / "tokenizer.json")
    assert tok.tokenize("he<x>") == ["he", "<x>"] and tok.eos_token == "<|endoftext|>" and len(tok) == 259


def test_in_memory_constructor_errors():
    with pytest.raises(TokenizerFileError, match=r"merges\[0\]: merge 'a q': token 'q' is not in the vocabulary"):
        Qwen2Tokenizer(vocab={"a": 0, "b": 1}, merges=["a q"])
    with pytest.raises(TypeError, match="eos_token: expected a str or AddedToken, found int"):
        Qwen2Tokenizer(vocab=tiny_vocab(), merges=[], eos_token=5)


@pytest.mark.parametrize("merges", ["", "#version: 0.2\n", "#version: 0.2\r\n", "#version: 0.2\rh e\r"])
def test_empty_merges_file_is_an_error(tmp_path, merges):
    """A merges.txt without a single merge (empty, the header alone, or old Mac CR line endings, which
    the Rust library reads as one #version line) would give a tokenizer of single bytes: refused."""
    with pytest.raises(TokenizerFileError, match=r"merges.txt: expected at least one merge \(a 'left right' line\), found none"):
        Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "m", merges=merges))
    with pytest.raises(TokenizerFileError, match=r"merges.txt: expected at least one merge"):
        Qwen2Tokenizer(vocab=tiny_vocab("he"), merges=str(tmp_path / "m" / "merges.txt"))


def test_merges_with_byte_order_mark(tmp_path):
    folder = write_folder(tmp_path / "b", merges="\ufeff#version: 0.2\nh e\n")
    with pytest.raises(TokenizerFileError, match=r"merges.txt: line 1: starts with a byte order mark \(U\+FEFF\)"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_deeply_nested_json_and_bad_jinja(tmp_path):
    folder = write_folder(tmp_path / "d", raw_vocab="[" * 100_000 + "]" * 100_000)
    with pytest.raises(TokenizerFileError, match=r"vocab.json: JSON nested too deeply to read"):
        Qwen2Tokenizer.from_pretrained(folder)
    folder = write_folder(tmp_path / "j")
    (folder / "chat_template.jinja").write_bytes(b"{{ x }}\n\xff")
    with pytest.raises(TokenizerFileError, match=r"chat_template.jinja: line 2: expected UTF-8 text, found the invalid byte 0xFF"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_save_pretrained_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing (here: the third file) leaves the folder as it was, without temporaries."""
    import builtins

    tok = Qwen2Tokenizer.from_pretrained(write_folder(tmp_path / "src"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "vocab.json").write_text("old", encoding="utf-8")
    real_open, opened = builtins.open, []

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            opened.append(path)
            if len(opened) == 3:
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(TokenizerFileError, match=r"out: cannot save the tokenizer there \(No space left on device\)"):
        tok.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["vocab.json"]
    assert (target / "vocab.json").read_text(encoding="utf-8") == "old"
    assert tok.save_pretrained(target) and Qwen2Tokenizer.from_pretrained(target).tokenize("hello") == ["hel", "l", "o"]
