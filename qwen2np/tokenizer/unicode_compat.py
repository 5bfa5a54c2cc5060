"""Rust's Unicode tables, for the few thousand code points where they are older than Python's.

The Rust `tokenizers` library (the oracle) matches ``\\p{L}`` and ``\\p{N}`` with Oniguruma's tables and
normalises with an NFC crate, both older than the tables of Python's `regex` module and `unicodedata`.
For characters assigned after those tables (U+12550, a cuneiform numeral, say) the two sides disagree:
`regex` calls it a digit, so ``"\\U00012550:A"`` would split ``𒕐 | :A`` where Rust splits ``𒕐: | A``;
and NFC reorders a combining mark that Rust's NFC does not know (U+0C3C, Telugu nukta), where Rust
treats it as a plain character.

scripts/make_tokenizer_unicode_tables.py measured Rust's tables over all of Unicode and wrote them to
unicode_tables.py. This module turns them into the two things the pipeline needs:

* `suspect_chars()`: the characters whose letter/number class differs, and `rust_classes()`, the
  corrected classes for the pre-tokenization pattern;
* `nfc_barrier_chars()` / `nfc_barriers()`: the characters Python's NFC combines or reorders and Rust's
  does not, as a set and as a regex to split on.

Sets, not regexes, answer "does this text contain one?": ``frozenset.isdisjoint(text)`` runs in C at
about 50 MB/s, where a regex character class of these ranges scans at under 10.

Both are computed from the stored tables for the `regex`/`unicodedata` versions they were made with, and
recomputed (once, a second or two) when the installed versions differ.
"""

import unicodedata
from functools import lru_cache

import regex

from . import unicode_tables as tables


def _all_code_points():
    """Every code point except the surrogates, as one string."""
    return "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def _expand(ranges):
    return {c for a, b in ranges for c in range(a, b + 1)}


def _ranges(code_points):
    out = []
    for c in sorted(code_points):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return tuple((a, b) for a, b in out)


def char_class(ranges):
    """The inside of a regex character class for code point ranges.

    >>> char_class(((65, 90), (0x12550, 0x12550)))
    '\\\\U00000041-\\\\U0000005a\\\\U00012550'
    """
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def letter_number_fixes():
    """(regex-only letters, Rust-only letters, regex-only numbers, Rust-only numbers) as ranges."""
    if regex.__version__ == tables.GENERATED_WITH["regex"]:
        return (tables.REGEX_ONLY_LETTERS, tables.RUST_ONLY_LETTERS, tables.REGEX_ONLY_NUMBERS,
                tables.RUST_ONLY_NUMBERS)
    text = _all_code_points()
    ours_l = {ord(ch) for ch in regex.findall(r"\p{L}", text)}
    ours_n = {ord(ch) for ch in regex.findall(r"\p{N}", text)}
    rust_l, rust_n = _expand(tables.RUST_LETTERS), _expand(tables.RUST_NUMBERS)
    return _ranges(ours_l - rust_l), _ranges(rust_l - ours_l), _ranges(ours_n - rust_n), _ranges(rust_n - ours_n)


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def nfc_barrier_ranges():
    """Characters that Python's NFC reorders or composes and Rust's treats as plain starters."""
    if unicodedata.unidata_version == tables.GENERATED_WITH["unicodedata"]:
        return tables.NFC_BARRIERS
    rust_combining, rust_composites = _expand(tables.RUST_COMBINING), _expand(tables.RUST_COMPOSITES)
    barriers = set()
    for ch in _all_code_points():
        if unicodedata.combining(ch) and ord(ch) not in rust_combining:
            barriers.add(ord(ch))
        elif ord(ch) not in rust_composites and unicodedata.decomposition(ch)[:1] not in ("", "<"):
            nfd = unicodedata.normalize("NFD", ch)
            if nfd != ch and unicodedata.normalize("NFC", nfd) == ch:  # a composite Rust does not make
                barriers.add(ord(nfd[-1]))
    return _ranges(barriers)


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def suspect_chars():
    """The characters whose \\p{L}/\\p{N} class differs between `regex` and Rust (a frozenset of str).

    >>> "\U00012550" in suspect_chars(), "a" in suspect_chars()
    (True, False)
    """
    return frozenset(chr(c) for a, b in sum(letter_number_fixes(), ()) for c in range(a, b + 1))


def rust_classes():
    """The pattern pieces standing for Rust's \\p{L} and \\p{N}, as `regex` V1 sets (union, difference).

    >>> letters, numbers = rust_classes()
    >>> letters.startswith("[\\\\p{L}")
    True
    """
    dl, al, dn, an = letter_number_fixes()

    def fixed(prop, add, remove):
        return (f"[{prop}" + (f"[{char_class(add)}]" if add else "") + (f"--[{char_class(remove)}]" if remove else "")
                + "]")

    return fixed(r"\p{L}", al, dl), fixed(r"\p{N}", an, dn)


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def nfc_barrier_chars():
    """The NFC barrier characters as a frozenset of str.

    >>> "\u0c3c" in nfc_barrier_chars()  # Telugu sign nukta, Unicode 14: unknown to Rust's NFC
    True
    """
    return frozenset(chr(c) for a, b in nfc_barrier_ranges() for c in range(a, b + 1))


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def nfc_barriers():
    """A compiled regex matching one NFC barrier character (None if there are none)."""
    ranges = nfc_barrier_ranges()
    return regex.compile(f"[{char_class(ranges)}]") if ranges else None
