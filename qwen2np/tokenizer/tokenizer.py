"""`Qwen2Tokenizer`: the tokenizer's tables, encoding (text -> ids) and decoding (ids -> text).

Encoding, stage by stage (docs/tokenizer.md walks through each with its traps):

1. split the raw text on added tokens (``<|im_end|>`` becomes its id; longest match, leftmost first);
2. NFC-normalise each plain segment (after the split, as the Rust library does);
3. cut each segment into pieces with the Qwen2 regex (`pretokenize`);
4. write each piece in GPT-2's byte-level alphabet (`to_byte_level`);
5. BPE by merge rank (`bpe`), then look the tokens up in the vocabulary.

Steps 4-5 are cached per piece: real text repeats its words, so most pieces are dictionary hits.
Batching, padding and truncation live in `batch.py`; decoding in `decoding.py`; the vocabulary and special
tokens in `vocabulary.py`; loading and saving in `loading.py`.
"""

import operator
import threading

from ..chat.template import apply_chat_template
from ..errors import TokenizerInputError, TokenizerTypeError
from .added_tokens import AddedToken, AddedVocabulary
from .batch import BatchMethods
from .bpe import bpe
from .bpe_cache import BPECache
from .bytes_level import to_byte_level
from .decoding import DecodeMethods
from .files import SPECIAL_TOKEN_KEYS, added_token_from_json, read_merges_txt, read_vocab_json
from .loading import load_tokenizer, save_tokenizer
from .pretokenize import nfc, pretokenize
from .tables import build_model, load_model_files, load_tokenizer_json_model
from .vocabulary import VocabularyMethods

FROM_FILES = "from files"  # normalization's default: what tokenizer.json says, else "NFC"


class Qwen2Tokenizer(VocabularyMethods, BatchMethods, DecodeMethods):
    """Qwen2's byte-level BPE tokenizer, from scratch, giving the ids of transformers 5.24's.

    >>> tok = Qwen2Tokenizer.from_pretrained()  # the bundled Qwen2.5 files
    >>> tok("Hello world")["input_ids"]
    [9707, 1879]
    >>> tok.decode([9707, 1879, 151645])
    'Hello world<|im_end|>'
    >>> tok.vocab_size, len(tok), tok.eos_token, tok.pad_token_id
    (151643, 151665, '<|im_end|>', 151643)
    """

    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt", "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    SPECIAL_TOKENS_ATTRIBUTES = list(SPECIAL_TOKEN_KEYS)

    def __init__(self, vocab=None, merges=None, unk_token="<|endoftext|>", bos_token=None,
                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_prefix_space=None, *,
                 vocab_file=None, merges_file=None, tokenizer_file=None, errors="replace",
                 clean_up_tokenization_spaces=False, split_special_tokens=False, added_tokens_decoder=None,
                 additional_special_tokens=None, extra_special_tokens=None, model_max_length=None,
                 chat_template=None, padding_side="right", truncation_side="right", add_bos_token=False,
                 add_eos_token=False, name_or_path="",
                 clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=False,
                 sep_token=None, cls_token=None, mask_token=None, normalization=FROM_FILES, ignore_merges=None,
                 **kwargs):
        # -- the BPE model: vocab and merges, from dicts/lists or files (v5 and 4.x argument forms)
        json_added, pipeline = {}, None
        if _is_path(vocab):
            vocab_file, vocab = vocab, None
        if _is_path(merges):
            merges_file, merges = merges, None
        for name, path in (("vocab_file", vocab_file), ("merges_file", merges_file), ("tokenizer_file", tokenizer_file)):
            if path is not None and not _is_path(path):
                raise TokenizerTypeError(f"{name}: expected a path, found {type(path).__name__}")
        if vocab is None and merges is None and tokenizer_file is not None:
            model, json_added, pipeline = load_tokenizer_json_model(tokenizer_file)
        elif vocab is None and merges is None and vocab_file is not None and merges_file is not None:
            model = load_model_files(vocab_file, merges_file)
        else:
            if vocab is None and vocab_file is not None:
                vocab = read_vocab_json(vocab_file)
            merges_where, line_numbers = "merges", None
            if merges is None and merges_file is not None:
                merges, line_numbers = read_merges_txt(merges_file)
                merges_where = str(merges_file)
            if vocab is None:  # transformers 5.24 builds a one-token tokenizer when given nothing
                vocab = {"<|endoftext|>": 0}
            model = build_model(vocab, merges if merges is not None else [], "vocab", merges_where, line_numbers)
        self._vocab, self._merges, self._merge_table, self._id_to_token, self._byte_ids = model
        self._full_alphabet = None not in self._byte_ids
        # piece -> ids: this tokenizer's own, bounded in bytes, thread-safe (bpe_cache.py); the tables above
        # are shared, read-only, with every tokenizer made from the same files
        self.bpe_cache = BPECache()

        # -- the stages around BPE: as the arguments say, else as tokenizer.json says (tokenizer_json.py)
        if normalization == FROM_FILES:
            normalization = pipeline.normalization if pipeline is not None else "NFC"
        if add_prefix_space is None and pipeline is not None:
            add_prefix_space = pipeline.add_prefix_space
        if ignore_merges is None:
            ignore_merges = pipeline.ignore_merges if pipeline is not None else False
        if type(ignore_merges) is not bool:
            raise TokenizerTypeError(f"ignore_merges: expected True or False, found {type(ignore_merges).__name__}")
        # True: a piece that is itself a vocabulary token is emitted whole, without merging (fixed for
        # the tokenizer's life: the BPE cache depends on it)
        self._ignore_merges = ignore_merges

        # -- settings (the names and meanings of transformers' PreTrainedTokenizerBase); the checked ones
        # (files.SETTINGS) are checked again whenever they are set, in __setattr__
        self.name_or_path = str(name_or_path)
        # None: no NFC step, as transformers builds the tokenizer of a GGUF file (qwen2np.tokenizer.gguf)
        self.normalization = normalization
        self.errors = errors
        self.add_prefix_space = bool(add_prefix_space) if add_prefix_space is not None else False
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = bool(
            clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output)
        self.split_special_tokens = bool(split_special_tokens)
        self.model_max_length = model_max_length
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = _chat_template(chat_template)
        self.init_kwargs = dict(kwargs)  # keys qwen2np does not use, kept as transformers keeps them
        self.deprecation_warnings = {}

        # -- added tokens: explicit ids first, then every special token named here (flagged special)
        self._added = AddedVocabulary()
        if added_tokens_decoder is None:
            added_tokens_decoder = json_added
        for token_id, token in _added_tokens_by_id(added_tokens_decoder):
            # a copy: the AddedTokens of a cached tokenizer.json are shared by every tokenizer made from it
            token = added_token_from_json(token, f"added_tokens_decoder[{token_id}]")
            if not token.content:
                raise TokenizerInputError(f"added_tokens_decoder[{token_id}]: expected a non-empty token, found ''")
            self._added.add(AddedToken(**token.__getstate__()), token_id)
        self._special = {}
        named = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, sep_token=sep_token,
                     pad_token=pad_token, cls_token=cls_token, mask_token=mask_token)
        for key in SPECIAL_TOKEN_KEYS:
            value = named[key]
            if value is not None and not isinstance(value, (str, AddedToken)):
                raise TokenizerTypeError(f"{key}: expected a str or AddedToken, found {type(value).__name__}")
            self._special[key] = None if value is None else str(value)
        extra = extra_special_tokens if extra_special_tokens is not None else additional_special_tokens
        if extra is not None and not isinstance(extra, (list, tuple)):
            raise TokenizerTypeError(f"additional_special_tokens: expected a list of tokens, found {type(extra).__name__}")
        for k, t in enumerate(extra or []):
            if not isinstance(t, (str, AddedToken)):
                raise TokenizerTypeError(
                    f"additional_special_tokens[{k}]: expected a str or AddedToken, found {type(t).__name__}")
        self._extra_special_tokens = [str(t) for t in (extra or [])]
        # transformers 5.24's Qwen2Tokenizer ends its __init__ with add_tokens(AddedToken(t, special=True)
        # for t in all_special_tokens): a named token that is not there yet is appended as special.
        for content in self.all_special_tokens:
            self._add_token(AddedToken(content, special=True))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *init_inputs, **kwargs):
        """Load a tokenizer: the bundled Qwen2.5 files (no argument), a Hugging Face folder
        (tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json), a tokenizer.json file,
        or a .gguf file. Keyword arguments override the saved configuration.

        >>> Qwen2Tokenizer.from_pretrained(model_max_length=8).model_max_length
        8
        """
        if init_inputs:
            raise TokenizerTypeError(f"from_pretrained takes one path; found extra positional arguments {init_inputs!r:.80}")
        if pretrained_model_name_or_path is not None and not _is_path(pretrained_model_name_or_path):
            raise TokenizerTypeError(f"from_pretrained: expected a path (a folder, a tokenizer.json, a .gguf file) "
                                     f"or None, found {type(pretrained_model_name_or_path).__name__}")
        for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code"):
            kwargs.pop(key, None)  # Hub arguments: qwen2np reads local files only
        return load_tokenizer(cls, pretrained_model_name_or_path, kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write vocab.json, merges.txt, tokenizer_config.json (with added_tokens_decoder and
        chat_template) and special_tokens_map.json; transformers 5.24 loads the folder. Returns the paths."""
        return save_tokenizer(self, save_directory)

    # ------------------------------------------------------------------ encoding
    def _encode_text(self, text, split_special_tokens):
        """The ids of one string, without any special tokens added (the pipeline of the module doc)."""
        if not isinstance(text, str):
            raise TokenizerTypeError(f"text: expected a str, found {type(text).__name__}")
        ids = []
        # subtle: added tokens are found in the raw text, *before* NFC (a following combining mark must
        # not fuse with '>' and hide the token), as the Rust library does; docs/tokenizer.md
        for part in self._added.split(text, normalized=False, skip_special=split_special_tokens):
            if type(part) is int:
                ids.append(part)
                continue
            if self.normalization is not None:
                part = nfc(part)
            for sub in self._added.split(part, normalized=True, skip_special=split_special_tokens):
                if type(sub) is int:
                    ids.append(sub)
                else:
                    ids += self._encode_ordinary(sub)
        return ids

    def _encode_ordinary(self, text):
        """Ids of text that holds no added token: regex pieces, each through the per-piece BPE cache."""
        pieces = pretokenize(text)
        if not text.isascii():
            _check_encodable(text)
        if self.add_prefix_space:  # the ByteLevel pre-tokenizer's option, applied to every piece
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        return self.bpe_cache.ids(pieces, self._bpe_ids)

    def _bpe_ids(self, piece):
        """Byte-level mapping and BPE of one piece (no cache): UTF-8 bytes -> ids of the one-character
        tokens that stand for them (``to_byte_level`` then vocabulary lookup, folded into one table) ->
        merges. With ``ignore_merges``, a piece that is a vocabulary token is that token, unmerged."""
        if self._ignore_merges:
            token_id = self._vocab.get(to_byte_level(piece))
            if token_id is not None:
                return [token_id]
        ids = list(map(self._byte_ids.__getitem__, piece.encode("utf-8")))
        if not self._full_alphabet:
            ids = [i for i in ids if i is not None]
        if len(ids) < 2:
            return ids
        return bpe(ids, self._merge_table)

    def tokenize(self, text, pair=None, add_special_tokens=False, **kwargs):
        """The tokens of `text` as strings of the byte-level alphabet.

        >>> Qwen2Tokenizer.from_pretrained().tokenize("Hello world<|im_end|>")
        ['Hello', 'Ġworld', '<|im_end|>']
        """
        ids = self(text, pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
        return [self._id_token(i) for i in ids]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation, **kwargs):
        """Render (and by default tokenize) a conversation with the chat template; see qwen2np.chat.template."""
        return apply_chat_template(self, conversation, **kwargs)

    def __repr__(self):
        return (f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, padding_side='{self.padding_side}', "
                f"truncation_side='{self.truncation_side}', special_tokens={self.special_tokens_map}, "
                f"added_tokens={len(self._added)})")


# The second name transformers 4.x used for the Rust-backed class; in 5.x both are one class.
Qwen2TokenizerFast = Qwen2Tokenizer


def _check_encodable(text):
    """Refuse lone surrogates (U+D800..U+DFFF), which UTF-8 cannot encode, naming where they are."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerInputError(
            f"text: expected encodable Unicode, found a lone surrogate U+{ord(text[e.start]):04X} at index "
            f"{e.start} of a segment") from None


def _is_path(value):
    return isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")


def _added_tokens_by_id(added_tokens_decoder):
    """``[(id, token), ...]`` in id order from ``{id: token}`` (ids as ints or decimal strings)."""
    if not isinstance(added_tokens_decoder, dict):
        raise TokenizerTypeError(
            f"added_tokens_decoder: expected a dict {{id: AddedToken}}, found {type(added_tokens_decoder).__name__}")
    out = []
    for key, token in added_tokens_decoder.items():
        if isinstance(key, str):
            token_id = int(key) if key.isdecimal() and key.isascii() else None
        else:
            try:
                token_id = operator.index(key)
            except TypeError:
                token_id = None
        if token_id is None or token_id < 0:
            raise TokenizerInputError(f"added_tokens_decoder: key {key!r:.40}: expected a non-negative integer id")
        out.append((token_id, token))
    return sorted(out, key=lambda kv: kv[0])


def _chat_template(value):
    """A chat template: a str, a ``{name: template}`` dict, or None (a list of ``{name, template}`` becomes
    the dict)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise TokenizerTypeError(f"chat_template: expected a str, a {{name: template}} dict or a list of "
                             f"{{name, template}}, found {value!r:.60}")


def load_bundled():
    """The bundled tokenizer, loaded once per process (for the CLI and doctests)."""
    global _BUNDLED
    with _BUNDLED_LOCK:
        if _BUNDLED is None:
            _BUNDLED = Qwen2Tokenizer.from_pretrained()
        return _BUNDLED


def forget_bundled():
    """Drop the tokenizer `load_bundled` keeps (its cache with it); the next call loads a new one."""
    global _BUNDLED
    with _BUNDLED_LOCK:
        _BUNDLED = None


_BUNDLED = None
_BUNDLED_LOCK = threading.Lock()
