"""Decoding a stream of token ids as they are generated, without ever printing half a character.

A token is a run of *bytes*, not of characters: an emoji's four UTF-8 bytes are often split over two or
three tokens (``ðŁ`` + ``ĺĢ``). Decoding each token alone would print U+FFFD halves. `IncrementalDecoder`
keeps back the bytes of an unfinished character until the token that completes it arrives, and emits
everything else at once. The texts it emits, joined, are exactly ``tokenizer.decode(all_ids)``.

Each push decodes only its own bytes plus at most three held back ones: O(1) per token, however long
the stream.
"""

from ..errors import TokenizerTypeError
from .decoding import DecodeMethods, as_id, decode_utf8


def _incomplete_tail(buf):
    """How many bytes at the end of `buf` begin a UTF-8 character that the next bytes could complete.

    >>> _incomplete_tail(b"ok\\xf0\\x9f"), _incomplete_tail(b"ok\\xf0\\x9f\\x98\\x80"), _incomplete_tail(b"\\xe2A")
    (2, 0, 0)
    """
    n = len(buf)
    for back in range(1, min(3, n) + 1):
        b = buf[n - back]
        if 0x80 <= b < 0xC0:
            continue  # a continuation byte: keep looking for the lead byte
        if b >= 0xF0:
            need = 4
        elif b >= 0xE0:
            need = 3
        elif b >= 0xC0:
            need = 2
        else:
            return 0  # ASCII: nothing pending
        return back if back < need else 0
    return 0


class IncrementalDecoder:
    """Turn token ids into text one at a time.

    `push` returns the text completed by this token (possibly ""); `flush` returns whatever is left (a
    truly unfinished character becomes U+FFFD, as `decode` would give).

    >>> from qwen2np import Qwen2Tokenizer
    >>> tok = Qwen2Tokenizer.from_pretrained()
    >>> ids = tok.encode("Hi 🦜!")  # the parrot's four bytes come in three tokens: ' ðŁ', '¦', 'ľ'
    >>> dec = IncrementalDecoder(tok)
    >>> [dec.push(i) for i in ids] + [dec.flush()]
    ['Hi', ' ', '', '🦜', '!', '']
    """

    def __init__(self, tokenizer, skip_special_tokens=False):
        if not isinstance(tokenizer, DecodeMethods):
            raise TokenizerTypeError(f"IncrementalDecoder: expected a qwen2np Qwen2Tokenizer, found {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending = b""  # bytes of an unfinished character, at most 3

    def push(self, token_id):
        """Add one token; return the text that is now complete."""
        token_id = as_id(token_id)
        tok = self.tokenizer
        added = tok._added.by_id.get(token_id)
        if added is not None and self.skip_special_tokens and added.special:
            return ""  # as in decode: dropped, and the held bytes wait for the next token
        buf = self._pending + tok._token_bytes(token_id)  # raises TokenizerInputError for an unknown id
        keep = _incomplete_tail(buf)
        # subtle: the held-back bytes start with a lead byte, which always ends the character before it,
        # so decoding the head now gives the same text as decoding the whole stream later
        text = decode_utf8(buf[: len(buf) - keep], tok.errors)  # (errors="strict" may refuse: state unchanged)
        self._pending = buf[len(buf) - keep :] if keep else b""
        return text

    def push_all(self, token_ids):
        """Add several tokens; return the text now complete. All or nothing: an id that cannot be decoded
        anywhere in `token_ids` raises and leaves the decoder as it was before the call."""
        saved = self._pending
        try:
            return "".join(self.push(t) for t in token_ids)
        except BaseException:
            self._pending = saved
            raise

    def flush(self):
        """Return the rest: the held-back bytes, decoded with U+FFFD for an unfinished character."""
        text = decode_utf8(self._pending, self.tokenizer.errors)
        self._pending = b""
        return text

    def reset(self):
        """Forget any held-back bytes (start a new stream)."""
        self._pending = b""

