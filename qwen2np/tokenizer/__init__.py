"""The Qwen2 tokenizer, from scratch: byte-level BPE giving exactly transformers 5.24's ids.

Files, one concept each, in pipeline order:

* ``added_tokens.py``: AddedToken and the split on added tokens (``<|im_end|>``);
* ``pretokenize.py``: NFC normalisation and the Qwen2 pre-tokenization regex;
* ``bytes_level.py``: GPT-2's byte -> printable character table;
* ``bpe.py``: BPE by merge rank (a teaching loop, a fast loop, and a heap for long pieces);
* ``tokenizer.py``: the Qwen2Tokenizer class (construction, encoding); ``vocabulary.py``: its tokens and
  special tokens;
* ``decoding.py``: ids -> text;
* ``batch.py`` and ``batch_encoding.py``: ``tokenizer(texts, padding=..., truncation=...)`` and BatchEncoding;
* ``streaming.py``: IncrementalDecoder for token-by-token output;
* ``bpe_cache.py``: each tokenizer's BPE cache (piece -> ids), bounded in bytes and thread-safe;
* ``files.py``, ``tokenizer_json.py``, ``tables.py``, ``gguf.py`` and ``loading.py``: reading and writing
  vocab.json, merges.txt, tokenizer.json (its pipeline fields honoured or refused), tokenizer_config.json;
  the shared BPE tables; the tokenizer a GGUF file carries; from_pretrained and save_pretrained.

Module-level state is only caches, each bounded and emptied by `clear_caches()`.

>>> from qwen2np.tokenizer import Qwen2Tokenizer
>>> Qwen2Tokenizer.from_pretrained().encode("Hello world")
[9707, 1879]
"""

from . import bytes_level, pretokenize, unicode_compat
from .added_tokens import AddedToken
from .batch_encoding import BatchEncoding
from .bpe_cache import BPECache
from .streaming import IncrementalDecoder
from .tables import clear_file_cache
from .tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast, forget_bundled

__all__ = ["AddedToken", "BPECache", "BatchEncoding", "IncrementalDecoder", "Qwen2Tokenizer", "Qwen2TokenizerFast",
           "clear_caches"]


def clear_caches():
    """Empty the tokenizer package's module-level caches; each is also bounded while it fills:

    * the parsed tables of loaded files (`tables.py`: up to 256 MB, least recently used out), so the next
      ``from_pretrained`` of the same files parses them again (tokenizers already made keep theirs);
    * the bundled tokenizer kept for the command line and doctests (`load_bundled`), with its BPE cache;
    * the Unicode tables derived on first use (`unicode_compat.py`, one value each, recomputed on use).

    A tokenizer's own BPE cache is its own: ``tok.bpe_cache.clear()``.

    >>> clear_caches()
    """
    clear_file_cache()
    forget_bundled()
    for function in (unicode_compat.letter_number_fixes, unicode_compat.nfc_barrier_ranges,
                     unicode_compat.suspect_chars, unicode_compat.nfc_barrier_chars, unicode_compat.nfc_barriers,
                     pretokenize._rust_table_pattern):
        function.cache_clear()
