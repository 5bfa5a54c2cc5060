"""Added tokens: strings such as ``<|im_end|>`` that are matched whole, before any other tokenization.

Qwen2.5 has 22 of them (ids 151643..151664). Each carries flags, with the meaning the `tokenizers`
library gives them:

* ``special``: skipped by ``decode(..., skip_special_tokens=True)`` and split like ordinary text when
  ``split_special_tokens=True``. ``<tool_call>`` and the FIM tokens are *not* special;
* ``normalized``: matched after NFC normalisation (True) or on the raw text (False, all of Qwen's);
* ``lstrip`` / ``rstrip``: the match swallows the whitespace on its left / right;
* ``single_word``: matched only when no letter, digit or ``_`` touches it.

`AddedVocabulary.split` cuts a text into plain segments and added-token ids, choosing at the leftmost
position where any token matches the longest token that matches there (as the Rust library's
Aho-Corasick "leftmost-longest" search).
"""

import re

from ..errors import TokenizerTypeError

# Unicode White_Space (what Rust's char::is_whitespace tests); str.isspace() also accepts \x1c-\x1f.
_WHITE_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                         "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


class AddedToken:
    """One added token and its flags (the same fields as ``tokenizers.AddedToken``).

    `normalized` defaults to ``not special``, as in `tokenizers`.

    >>> t = AddedToken("<tool_call>", special=False, normalized=False)
    >>> str(t), t.special
    ('<tool_call>', False)
    >>> AddedToken("<|im_end|>", special=True).normalized
    False
    """

    __slots__ = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

    def __init__(self, content, single_word=False, lstrip=False, rstrip=False, normalized=None, special=False):
        if not isinstance(content, str):
            raise TokenizerTypeError(f"AddedToken content: expected a str, found {type(content).__name__}")
        self.content = content
        self.single_word = bool(single_word)
        self.lstrip = bool(lstrip)
        self.rstrip = bool(rstrip)
        self.special = bool(special)
        self.normalized = (not self.special) if normalized is None else bool(normalized)

    def __str__(self):
        return self.content

    def __repr__(self):
        return (f'AddedToken("{self.content}", rstrip={self.rstrip}, lstrip={self.lstrip}, '
                f"single_word={self.single_word}, normalized={self.normalized}, special={self.special})")

    def __getstate__(self):
        """The dict written in tokenizer_config.json's ``added_tokens_decoder``."""
        return {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
                "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}

    def __setstate__(self, state):
        for key in self.__slots__:
            setattr(self, key, state[key])

    def __eq__(self, other):
        if isinstance(other, str):
            return self.content == other
        if isinstance(other, AddedToken):
            return self.__getstate__() == other.__getstate__()
        return NotImplemented

    def __hash__(self):
        return hash(self.content)


def _literal_alternation(contents):
    """A regex matching any of `contents`, longest first, so the first alternative that matches wins."""
    if not contents:
        return None
    ordered = sorted(contents, key=lambda c: (-len(c), c))
    return re.compile("|".join(map(re.escape, ordered)))


def _is_word_char(ch):
    return ch.isalnum() or ch == "_"


class AddedVocabulary:
    """The added tokens of a tokenizer, by id and by content, with the matcher that splits text on them.

    >>> av = AddedVocabulary()
    >>> av.add(AddedToken("<|im_end|>", special=True), 151645)
    151645
    >>> av.split("hi<|im_end|>\\n", normalized=False, skip_special=False)
    ['hi', 151645, '\\n']
    >>> av.split("hi<|im_end|>", normalized=False, skip_special=True)
    ['hi<|im_end|>']
    """

    def __init__(self):
        self.by_id = {}  # id -> AddedToken, in insertion order
        self.by_content = {}  # content -> id
        self._matchers = {}  # (normalized, skip_special) -> compiled regex or None

    def __len__(self):
        return len(self.by_id)

    def add(self, token, token_id):
        """Add `token` under `token_id`; a token already present keeps its id and gets the new flags."""
        if token.content in self.by_content:
            token_id = self.by_content[token.content]
        self.by_id[token_id] = token
        self.by_content[token.content] = token_id
        self._matchers.clear()
        return token_id

    def special_ids(self):
        """The ids of the tokens flagged special."""
        return {i for i, t in self.by_id.items() if t.special}

    def _matcher(self, normalized, skip_special):
        key = (normalized, skip_special)
        if key not in self._matchers:
            # subtle: with split_special_tokens the Rust library still *matches* special tokens and then
            # drops the match; we search all tokens and skip the special ones below, as it does.
            contents = [t.content for t in self.by_id.values() if t.normalized == normalized and t.content]
            self._matchers[key] = _literal_alternation(contents)
        return self._matchers[key]

    def split(self, text, normalized, skip_special):
        """Cut `text` into plain strings and added-token ids (only tokens whose ``normalized`` flag is
        `normalized`; special tokens left as text when `skip_special`). Empty strings are dropped."""
        matcher = self._matcher(normalized, False)
        if matcher is None:
            return [text] if text else []
        out = []
        start = 0  # where the current plain segment begins
        for m in matcher.finditer(text):
            token_id = self.by_content[m.group()]
            token = self.by_id[token_id]
            if skip_special and token.special:
                continue
            lo, hi = m.span()
            if token.single_word and (
                (lo > 0 and _is_word_char(text[lo - 1])) or (hi < len(text) and _is_word_char(text[hi]))
            ):
                continue
            if token.lstrip:
                while lo > start and text[lo - 1] in _WHITE_SPACE:
                    lo -= 1
            if token.rstrip:
                while hi < len(text) and text[hi] in _WHITE_SPACE:
                    hi += 1
            if start < lo:
                out.append(text[start:lo])
            out.append(token_id)
            start = hi
        if start < len(text):
            out.append(text[start:])
        return out
