"""Before BPE: NFC normalisation and the Qwen2 pre-tokenization regex.

BPE never merges across the pieces this regex cuts, so the regex decides much of the tokenization:
a word keeps its leading space (`` world``), every digit is a piece of its own, punctuation runs keep
their trailing newlines, and a run of spaces gives its last space to the next word.

Both stages follow the Rust library's Unicode tables, which are older than Python's (see
unicode_compat.py): text with none of the few thousand affected characters takes the fast path.
"""

import unicodedata
from functools import lru_cache

import regex

from .unicode_compat import nfc_barrier_chars, nfc_barriers, rust_classes, suspect_chars

# The pattern of transformers' tokenization_qwen2.py, verbatim (it needs the `regex` module: \p{L}, \p{N}).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRETOKENIZE = regex.compile(PRETOKENIZE_REGEX)


def nfc(text):
    """Unicode NFC normalisation (composed form), as the Rust library's normaliser does it.

    subtle: "e" + U+0301 (combining acute) becomes "é" (U+00E9), so both spellings tokenize alike.
    Skipped when the text is already NFC (the usual case).

    >>> nfc("e\\u0301") == "\\u00e9"
    True
    >>> nfc("a\\u0c3c\\u0301") == "a\\u0c3c\\u0301"  # U+0C3C is newer than Rust's tables: no composing across it
    True
    """
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text  # (text NFC for Python is NFC for Rust too: Rust's tables know less, never more)
    if not nfc_barrier_chars().isdisjoint(text):
        # Rust sees these characters as plain starters, which NFC never reorders or composes across:
        # normalise the text between them on its own
        barriers = nfc_barriers()
        parts, marks = barriers.split(text), barriers.findall(text)
        return "".join(unicodedata.normalize("NFC", p) + (marks[k] if k < len(marks) else "")
                       for k, p in enumerate(parts))
    return unicodedata.normalize("NFC", text)


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def _rust_table_pattern():
    """The Qwen2 pattern with \\p{L} and \\p{N} replaced by Rust's classes (slower; rarely needed)."""
    letters, numbers = rust_classes()
    pattern = PRETOKENIZE_REGEX.replace(r"\p{L}", letters).replace(r"\p{N}", numbers)
    # V1 allows set operations in classes ([\p{L}--[...]]); checked against Rust on every code point
    return regex.compile(pattern, flags=regex.V1)


def pretokenize(text):
    """Cut `text` into the pieces BPE works on, with Qwen2's regex.

    The pattern's alternatives cover every character, so the pieces concatenate back to `text`.

    >>> pretokenize("Hello world, it's 2024!\\n\\n  ok")
    ['Hello', ' world', ',', ' it', "'s", ' ', '2', '0', '2', '4', '!\\n\\n', ' ', ' ok']
    >>> pretokenize("DON'T")  # subtle: the contractions are case-insensitive
    ['DON', "'T"]
    >>> pretokenize("\\U00012550:A")  # newer than Rust's tables: "other", not a digit, as Rust sees it
    ['\\U00012550:', 'A']
    """
    # subtle: "one digit per piece" -- \\p{N} matches a single character, also for ² ½ and Ⅻ
    if not text.isascii() and not suspect_chars().isdisjoint(text):
        return _rust_table_pattern().findall(text)
    return _PRETOKENIZE.findall(text)
