"""GPT-2's byte-level alphabet: every byte gets a printable stand-in character, so BPE runs on text.

A BPE vocabulary of 151,643 strings cannot hold raw bytes such as 0x0A or 0xF0 as keys of a JSON file,
so GPT-2 (and Qwen2 after it) first maps each of the 256 byte values to one visible character:

* the 188 "nice" bytes ``!``..``~`` (33-126), ``¡``..``¬`` (161-172) and ``®``..``ÿ`` (174-255) stand
  for themselves (the character with the same code point);
* the other 68 bytes (0-32, 127-160, 173) get U+0100, U+0101, ... in increasing byte order.

So a space (0x20) is written ``Ġ`` (U+0120) and a newline (0x0A) ``Ċ`` (U+010A), which is why those two
letters are everywhere in vocab.json. Encoding maps UTF-8 bytes to these characters; decoding maps them
back and decodes the bytes as UTF-8.
"""

from functools import lru_cache


@lru_cache(maxsize=1)  # no arguments: one value, computed on first use
def bytes_to_unicode():
    """The byte -> stand-in character table of GPT-2 (``dict[int, str]``, 256 entries).

    >>> table = bytes_to_unicode()
    >>> table[ord("A")], table[ord(" ")], table[ord("\\n")], table[0xF0]
    ('A', 'Ġ', 'Ċ', 'ð')
    >>> len(set(table.values()))
    256
    """
    nice = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in nice}
    # subtle: the 68 other bytes are numbered in increasing byte order from U+0100 (docs/tokenizer.md)
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


def unicode_to_bytes():
    """The inverse table: stand-in character -> byte value (``dict[str, int]``).

    >>> unicode_to_bytes()["Ġ"]
    32
    """
    return {ch: b for b, ch in bytes_to_unicode().items()}


# str.translate table: the latin-1 character of each byte value -> its stand-in
_LATIN1_TO_STANDIN = {b: ch for b, ch in bytes_to_unicode().items()}
# and back: stand-in -> the latin-1 character of its byte (so the result can be .encode("latin-1")-ed)
_STANDIN_TO_LATIN1 = {ord(ch): chr(b) for b, ch in bytes_to_unicode().items()}


def to_byte_level(text):
    """Write `text` in the byte-level alphabet: UTF-8 encode, then map each byte to its stand-in.

    Decoding the UTF-8 bytes as latin-1 gives one character per byte, which ``str.translate`` then maps
    in C, much faster than a Python loop over the bytes.

    >>> to_byte_level(" Hello\\n")
    'ĠHelloĊ'
    >>> to_byte_level("é")  # two UTF-8 bytes, C3 A9
    'Ã©'
    """
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_STANDIN)


def from_byte_level(symbols):
    """The bytes that a byte-level string stands for (the inverse of `to_byte_level`, before UTF-8).

    A character outside the alphabet is an error: the caller names the token it came from.

    >>> from_byte_level("ĠHelloĊ")
    b' Hello\\n'
    >>> from_byte_level("ðŁ")  # the first two bytes of a four-byte emoji
    b'\\xf0\\x9f'
    """
    return symbols.translate(_STANDIN_TO_LATIN1).encode("latin-1")
