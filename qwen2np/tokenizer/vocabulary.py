"""The tokenizer's vocabulary: the BPE tokens, the added tokens, and the named special tokens.

`Qwen2Tokenizer` gets these methods from `VocabularyMethods` (as it gets encoding in batches from
batch.py and decoding from decoding.py): token <-> id lookups, the special-token attributes
(`eos_token`, `eos_token_id`, ...), and `add_tokens`. Names and meanings are transformers 5.24's
`PreTrainedTokenizerBase`'s.

>>> from qwen2np import Qwen2Tokenizer
>>> tok = Qwen2Tokenizer.from_pretrained()
>>> tok.eos_token, tok.eos_token_id, tok.convert_ids_to_tokens(151645)
('<|im_end|>', 151645, '<|im_end|>')
"""

from ..errors import TokenizerTypeError
from .added_tokens import AddedToken
from .decoding import as_id
from .files import SETTINGS, setting_problem

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when none is known


class VocabularyMethods:
    """Vocabulary, added tokens and special tokens of a Qwen2Tokenizer (which holds `_vocab`, `_added`,
    `_special` and `_extra_special_tokens`)."""

    def _add_token(self, token):
        """Add one AddedToken: the vocabulary's id if the content is a vocabulary token, else the next id."""
        if not token.content:
            return None
        if token.content in self._vocab:
            token_id = self._vocab[token.content]
        elif token.content in self._added.by_content:
            token_id = self._added.by_content[token.content]
        else:
            token_id = max(len(self._vocab), max(self._added.by_id, default=-1) + 1)
        return self._added.add(token, token_id)

    def add_tokens(self, new_tokens, special_tokens=False):
        """Add tokens (str or AddedToken) to the added vocabulary; returns how many were new.

        >>> from qwen2np import Qwen2Tokenizer
        >>> tok = Qwen2Tokenizer.from_pretrained()
        >>> tok.add_tokens(["<my_tag>"]), tok.convert_tokens_to_ids("<my_tag>"), len(tok)
        (1, 151665, 151666)
        """
        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        if not isinstance(new_tokens, (list, tuple)):
            raise TokenizerTypeError(f"add_tokens: expected a str, an AddedToken or a list of them, found "
                                     f"{type(new_tokens).__name__}")
        tokens = []
        for k, t in enumerate(new_tokens):  # all checked before any is added
            if isinstance(t, str):
                t = AddedToken(t, special=special_tokens)
            elif not isinstance(t, AddedToken):
                raise TokenizerTypeError(f"add_tokens: new_tokens[{k}]: expected a str or AddedToken, found {type(t).__name__}")
            tokens.append(t)
        # counted as the Rust library counts: tokens new to the added vocabulary (even if in vocab.json)
        added = len({t.content for t in tokens if t.content and t.content not in self._added.by_content})
        for t in tokens:
            self._add_token(t)
        # (the BPE cache stays valid: added tokens are split off before BPE, which never sees them)
        return added

    @property
    def vocab_size(self):
        """The size of the BPE vocabulary, without added tokens (151643 for Qwen2)."""
        return len(self._vocab)

    def __len__(self):
        return len(self.get_vocab())

    def get_vocab(self):
        """``{token: id}`` for the vocabulary and the added tokens."""
        return {**self._vocab, **self._added.by_content}

    @property
    def vocab(self):
        return self.get_vocab()

    @property
    def added_tokens_decoder(self):
        """``{id: AddedToken}`` in id order."""
        return dict(sorted(self._added.by_id.items()))

    @property
    def added_tokens_encoder(self):
        """``{content: id}`` in id order."""
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    def get_added_vocab(self):
        return self.added_tokens_encoder

    @property
    def special_tokens_map(self):
        """The named special tokens that are set: ``{"eos_token": "<|im_end|>", ...}``."""
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_tokens(self):
        """Named special tokens, then the additional ones, each once."""
        seen = []
        for t in [*self._special.values(), *self._extra_special_tokens]:
            if t is not None and t not in seen:
                seen.append(t)
        return seen

    @property
    def all_special_ids(self):
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def additional_special_tokens(self):
        return list(self._extra_special_tokens)

    extra_special_tokens = additional_special_tokens

    @property
    def additional_special_tokens_ids(self):
        return self.convert_tokens_to_ids(self._extra_special_tokens)

    def _token_to_id(self, token):
        i = self._added.by_content.get(token)
        if i is None:
            i = self._vocab.get(token)
        if i is None and self._special["unk_token"] is not None and token != self._special["unk_token"]:
            return self._token_to_id(self._special["unk_token"])
        return i

    def convert_tokens_to_ids(self, tokens):
        """Token string(s) -> id(s); an unknown token gives the unk id (None: Qwen has no unk token).

        >>> from qwen2np import Qwen2Tokenizer
        >>> tok = Qwen2Tokenizer.from_pretrained()
        >>> tok.convert_tokens_to_ids(["Hello", "Ġworld", "<|im_end|>"])
        [9707, 1879, 151645]
        """
        if tokens is None:  # as transformers
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        if not isinstance(tokens, (list, tuple)):
            raise TokenizerTypeError(f"convert_tokens_to_ids: expected a token string or a list of them, found "
                                     f"{type(tokens).__name__}")
        for k, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerTypeError(f"convert_tokens_to_ids: tokens[{k}]: expected a str, found {type(t).__name__}")
        return [self._token_to_id(t) for t in tokens]

    def _id_token(self, token_id):
        return self._token_string(as_id(token_id))

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Id(s) -> token string(s) in the byte-level alphabet (``Ġ`` is a space).

        >>> from qwen2np import Qwen2Tokenizer
        >>> Qwen2Tokenizer.from_pretrained().convert_ids_to_tokens([9707, 1879])
        ['Hello', 'Ġworld']
        """
        if hasattr(ids, "tolist"):  # a NumPy array or scalar
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            return self._id_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._id_token(i) for i in ids if i not in skip]

    def __getattr__(self, name):
        # bos_token_id, eos_token_id, ... and the setters below read the named special tokens
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self._token_to_id(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in SETTINGS:  # checked before it is set: a refused value leaves the tokenizer as it was
            problem = setting_problem(name, value)
            if problem is not None:
                error, message = problem
                raise error(f"{name}: {message}")
            if name == "model_max_length":
                value = VERY_LARGE_INTEGER if value is None else int(value)
        special = self.__dict__.get("_special")
        if special is not None and (name in special or (name.endswith("_id") and name[:-3] in special)):
            if name.endswith("_id"):
                name, value = name[:-3], (None if value is None else self._id_token(value))
            if value is not None and not isinstance(value, (str, AddedToken)):
                raise TokenizerTypeError(f"{name}: expected a str or AddedToken, found {type(value).__name__}")
            special[name] = None if value is None else str(value)
            return
        object.__setattr__(self, name, value)

    @property
    def ignore_merges(self):
        """True when a piece that is itself a vocabulary token is emitted whole (tokenizer.json's
        ``model.ignore_merges``); fixed when the tokenizer is made."""
        return self._ignore_merges
