"""Decoding: ids -> text, as the Rust `tokenizers` library does it for Qwen2.

Every token is mapped back to bytes (the inverse of the byte-level mapping), added tokens too, and the
bytes of the whole sequence are decoded as UTF-8 with ``errors="replace"``, so each maximal invalid
subpart becomes one U+FFFD. A token with a character outside the byte-level alphabet gives its own UTF-8
bytes instead (the Rust ByteLevel decoder's fallback): that is why ``<|im_end|>`` (all printable ASCII,
which stands for itself) comes back as written. ``skip_special_tokens`` drops the added tokens flagged
special, leaving no gap: the bytes on both sides still join.
"""

import logging
import operator

import numpy as np

from ..errors import TokenizerInputError, TokenizerTypeError
from .bytes_level import bytes_to_unicode, from_byte_level

logger = logging.getLogger("qwen2np.tokenizer")
_warned = set()
_ALPHABET = frozenset(bytes_to_unicode().values())


def warn_once(message):
    """Log `message` as a warning the first time only (transformers' ``logger.warning_once``)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def as_id(token_id, where="token id"):
    """An int id from an int or NumPy integer; anything else is a TokenizerTypeError naming the type."""
    if type(token_id) is int:
        return token_id
    try:
        return operator.index(token_id)
    except TypeError:
        raise TokenizerTypeError(f"{where}: expected an int, found {type(token_id).__name__} ({token_id!r:.40})") from None


def id_rows(token_ids):
    """What `decode` was given, as ``(rows, is_batch)``: one list of ids, or a list of them for a list of
    lists or a 2-D array. Refuses, naming the position, anything that is not ids.

    >>> id_rows(np.array([[1, 2], [3, 4]])), id_rows(7)
    (([[1, 2], [3, 4]], True), ([[7]], False))
    """
    if isinstance(token_ids, dict):
        if "input_ids" not in token_ids:
            raise TokenizerInputError(f"token_ids: a dict must hold 'input_ids'; found the keys {list(token_ids)[:8]}")
        token_ids = token_ids["input_ids"]
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype.kind not in "iub" or token_ids.ndim > 2:
            raise TokenizerTypeError(f"token_ids: expected integer ids in at most 2 dimensions, found an array of "
                                     f"dtype {token_ids.dtype} and shape {token_ids.shape}")
        token_ids = token_ids.tolist()
    elif hasattr(token_ids, "tolist") and not isinstance(token_ids, (list, tuple)):  # a NumPy scalar
        token_ids = token_ids.tolist()
    if not isinstance(token_ids, (list, tuple)):
        return [[as_id(token_ids, "token_ids")]], False
    if not token_ids or not isinstance(token_ids[0], (list, tuple, np.ndarray)):
        return [token_ids], False
    rows = []
    for k, row in enumerate(token_ids):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise TokenizerTypeError(f"token_ids[{k}]: expected a list of ids like token_ids[0], found {type(row).__name__}")
        rows.append(row)
    return rows, True


def _standin_bytes(token):
    """The bytes of a byte-level token; a token with characters outside the alphabet gives its UTF-8
    bytes instead (the Rust ByteLevel decoder's fallback)."""
    if _ALPHABET.issuperset(token):
        return from_byte_level(token)
    return token.encode("utf-8")


def _chunk_bytes(tokens):
    """The bytes of a run of vocabulary tokens: translated in one go when all are in the alphabet."""
    joined = "".join(tokens)
    if _ALPHABET.issuperset(joined):
        return from_byte_level(joined)
    return b"".join(map(_standin_bytes, tokens))


def decode_utf8(data, errors):
    """``data.decode("utf-8", errors)``; with ``errors="strict"``, invalid UTF-8 is a TokenizerInputError
    saying where (a ValueError, like the UnicodeDecodeError it replaces).

    >>> decode_utf8(b"ok\\xf0\\x9f", "replace")
    'ok\ufffd'
    """
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise TokenizerInputError(
            f"decode with errors={errors!r}: bytes {e.start}..{e.end - 1} of the decoded tokens are not valid "
            f"UTF-8 ({e.reason}); errors='replace' gives U+FFFD instead") from None


def clean_up_tokenization(text):
    """transformers' clean-up rule: drop the space before . ? ! , and English contractions.

    >>> clean_up_tokenization("a , b . do n't")
    "a, b. don't"
    """
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


class DecodeMethods:
    """The decoding methods of Qwen2Tokenizer (mixed into the class)."""

    def _token_string(self, token_id):
        """The string of a token id: an added token's content, else the vocabulary token (an added token
        wins when both have the id, as in the Rust library). An unknown id is an error naming it."""
        added = self._added.by_id.get(token_id)
        if added is not None:
            return added.content
        token = self._id_to_token.get(token_id)
        if token is None:
            raise TokenizerInputError(
                f"token id {token_id}: not in the vocabulary (expected 0 <= id < {len(self)} of a known token)")
        return token

    def _token_bytes(self, token_id):
        """The bytes a token id stands for, through the byte-level decoder."""
        return _standin_bytes(self._token_string(token_id))

    def _decode_ids(self, ids, skip_special_tokens):
        """Decode like the Rust library: every token, added ones included, goes through the byte-level
        decoder, and the bytes of the whole sequence are UTF-8 decoded at once (invalid -> U+FFFD)."""
        added = self._added.by_id
        id_to_token = self._id_to_token
        tokens = []
        for k, token_id in enumerate(ids):
            if type(token_id) is not int:
                token_id = as_id(token_id, f"token_ids[{k}]")
            token = added.get(token_id)
            if token is not None:
                # subtle: a skipped special token leaves no gap, so the bytes around it still join
                if not (skip_special_tokens and token.special):
                    tokens.append(token.content)
            elif token_id in id_to_token:
                tokens.append(id_to_token[token_id])
            else:
                self._token_string(token_id)  # raises, naming the id
        return decode_utf8(_chunk_bytes(tokens), self.errors)

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Ids -> text. A list of lists (or a 2-D array) decodes row by row into a list of strings.

        `skip_special_tokens` drops the added tokens flagged special (``<tool_call>`` is not).
        ``spaces_between_special_tokens`` is accepted and has no effect, as in transformers 5.24.

        >>> from qwen2np import Qwen2Tokenizer
        >>> tok = Qwen2Tokenizer.from_pretrained()
        >>> tok.decode([151644, 9707, 151657, 151645], skip_special_tokens=True)
        'Hello<tool_call>'
        >>> tok.decode([9707, 9284])  # 9284 is 'ðŁ', the first two bytes of an emoji: one U+FFFD
        'Hello�'
        """
        rows, is_batch = id_rows(token_ids)
        if is_batch:
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in rows]
        text = self._decode_ids(rows[0], skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            if self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output:
                text = clean_up_tokenization(text)
            else:  # transformers 5.24 refuses the clean-up for BPE tokenizers, with this warning
                warn_once(
                    "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer Qwen2Tokenizer. The "
                    "clean_up_tokenization post-processing step is designed for WordPiece tokenizers and is "
                    "destructive for BPE (it strips spaces before punctuation). Set "
                    "clean_up_tokenization_spaces=False to suppress this warning, or set "
                    "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True to force "
                    "cleanup anyway.")
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Decode each sequence of a batch.

        >>> from qwen2np import Qwen2Tokenizer
        >>> Qwen2Tokenizer.from_pretrained().batch_decode([[9707], [1879]])
        ['Hello', ' world']
        """
        if isinstance(sequences, np.ndarray):
            sequences = sequences.tolist()
        if not isinstance(sequences, (list, tuple)):
            raise TokenizerTypeError(
                f"batch_decode: expected a list of sequences or an array, found {type(sequences).__name__}")
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    def convert_tokens_to_string(self, tokens):
        """Token strings -> text through the byte-level decoder (every token, added ones included).

        >>> from qwen2np import Qwen2Tokenizer
        >>> Qwen2Tokenizer.from_pretrained().convert_tokens_to_string(["Hello", "Ġworld"])
        'Hello world'
        """
        if not isinstance(tokens, (list, tuple)):
            raise TokenizerTypeError(f"convert_tokens_to_string: expected a list of token strings, found {type(tokens).__name__}")
        for k, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerTypeError(f"convert_tokens_to_string: tokens[{k}]: expected a str, found {type(t).__name__}")
        return decode_utf8(b"".join(_standin_bytes(t) for t in tokens), self.errors)

    def clean_up_tokenization(self, text):
        return clean_up_tokenization(text)
