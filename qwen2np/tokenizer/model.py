"""The BPE model's tables, built once per set of files and shared, read-only, by the tokenizers made
from them (loading Qwen's 151,643 tokens and 151,387 merges takes about half a second; the second
``from_pretrained()`` of the same files takes a few milliseconds).

* ``vocab``: ``{token: id}``; ``id_to_token``: its inverse;
* ``merges``: ``[(left, right), ...]`` in rank order;
* ``table``: the packed merge table of `bpe.merge_table`;
* ``byte_ids``: for each byte value 0..255, the id of the one-character token standing for it (None if
  the vocabulary lacks it).
"""

import os
from collections import namedtuple

from .bpe import merge_table
from .bytes_level import bytes_to_unicode
from .files import check_merges, check_vocab, normalize_merges, read_merges_txt, read_tokenizer_json, read_vocab_json

BPEModel = namedtuple("BPEModel", "vocab merges table id_to_token byte_ids")

_FILE_CACHE = {}  # (kind, paths, sizes, mtimes) -> (BPEModel, added tokens of tokenizer.json)
_FILE_CACHE_SIZE = 4


def build_model(vocab, merges, vocab_where="vocab", merges_where="merges", line_numbers=None):
    """Check `vocab` and `merges` and build the tables (merges: pairs, or "a b" strings).

    >>> m = build_model({"a": 0, "b": 1, "ab": 2}, ["a b"])
    >>> m.table == {(0 << 21) | 1: (0 << 21) | 2}, m.id_to_token[2]
    (True, 'ab')
    """
    vocab = dict(check_vocab(vocab, vocab_where))
    if line_numbers is None:
        merges = normalize_merges(merges, merges_where)
    check_merges(merges, vocab, merges_where, line_numbers)
    byte_ids = [vocab.get(ch) for ch in bytes_to_unicode().values()]
    return BPEModel(vocab, merges, merge_table(merges, vocab), dict(zip(vocab.values(), vocab.keys())), byte_ids)


def _cached(kind, paths, build):
    try:
        key = (kind, *((os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths))
    except OSError:
        return build()  # a missing file: let the reader raise its precise error
    if key not in _FILE_CACHE:
        if len(_FILE_CACHE) >= _FILE_CACHE_SIZE:
            _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
        _FILE_CACHE[key] = build()
    return _FILE_CACHE[key]


def load_model_files(vocab_file, merges_file):
    """The model of vocab.json + merges.txt (cached by path, size and modification time)."""

    def build():
        vocab = read_vocab_json(vocab_file)
        merges, line_numbers = read_merges_txt(merges_file)
        return build_model(vocab, merges, str(vocab_file), str(merges_file), line_numbers)

    return _cached("vocab+merges", (vocab_file, merges_file), build)


def load_tokenizer_json_model(path):
    """The model and the ``{id: AddedToken}`` of a tokenizer.json (cached like `load_model_files`)."""

    def build():
        vocab, merges, added = read_tokenizer_json(path)
        return build_model(vocab, merges, f"{path}: model.vocab", f"{path}: model.merges"), added

    return _cached("tokenizer.json", (path,), build)
