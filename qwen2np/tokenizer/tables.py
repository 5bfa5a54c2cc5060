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
import threading
from collections import OrderedDict, namedtuple

from .bpe import merge_table
from .bytes_level import bytes_to_unicode
from .files import check_merges, check_vocab, normalize_merges, read_merges_txt, read_vocab_json
from .tokenizer_json import read_tokenizer_json

BPEModel = namedtuple("BPEModel", "vocab merges table id_to_token byte_ids")

# The parsed tables of recently loaded files, shared by the tokenizers made from them. Bounded in
# (estimated) bytes, least recently used first out; `clear_file_cache()` empties it. A tokenizer keeps
# its own references, so clearing never breaks one.
# (kind, paths, sizes, mtimes) -> (estimated bytes, what the loader returned)
_FILE_CACHE = OrderedDict()
_FILE_CACHE_MAX_BYTES = 256 * 2**20  # three Qwen-sized tables (about 68 MB each)
_FILE_CACHE_LOCK = threading.RLock()  # loads are serialized: two threads never build the same tables twice


def model_bytes(model):
    """An estimate of the memory a BPEModel holds: about 250 bytes per token (vocab, id_to_token) and
    200 per merge (the pair, the packed table entry); tracemalloc measures 68 MB for Qwen2's tables."""
    return 250 * len(model.vocab) + 200 * len(model.merges)


def clear_file_cache():
    """Forget the tables of loaded files (tokenizers already made keep theirs)."""
    with _FILE_CACHE_LOCK:
        _FILE_CACHE.clear()


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
    with _FILE_CACHE_LOCK:
        if key in _FILE_CACHE:
            _FILE_CACHE.move_to_end(key)
            return _FILE_CACHE[key][1]
        built = build()
        nbytes = model_bytes(built[0] if kind == "tokenizer.json" else built)
        _FILE_CACHE[key] = (nbytes, built)
        while sum(n for n, _ in _FILE_CACHE.values()) > _FILE_CACHE_MAX_BYTES and len(_FILE_CACHE) > 1:
            _FILE_CACHE.popitem(last=False)
        return built


def load_model_files(vocab_file, merges_file):
    """The model of vocab.json + merges.txt (cached by path, size and modification time)."""

    def build():
        vocab = read_vocab_json(vocab_file)
        merges, line_numbers = read_merges_txt(merges_file)
        return build_model(vocab, merges, str(vocab_file), str(merges_file), line_numbers)

    return _cached("vocab+merges", (vocab_file, merges_file), build)


def load_tokenizer_json_model(path):
    """The model, the ``{id: AddedToken}`` and the `Pipeline` of a tokenizer.json (cached like
    `load_model_files`)."""

    def build():
        vocab, merges, added, pipeline = read_tokenizer_json(path)
        return build_model(vocab, merges, f"{path}: model.vocab", f"{path}: model.merges"), added, pipeline

    return _cached("tokenizer.json", (path,), build)
