"""The Qwen2 tokenizer, from scratch: byte-level BPE giving exactly transformers 5.24's ids.

Files, one concept each, in pipeline order:

* ``added_tokens.py``: AddedToken and the split on added tokens (``<|im_end|>``);
* ``pretokenize.py``: NFC normalisation and the Qwen2 pre-tokenization regex;
* ``bytes_level.py``: GPT-2's byte -> printable character table;
* ``bpe.py``: BPE by merge rank (a teaching loop, a fast loop, and a heap for long pieces);
* ``tokenizer.py``: the Qwen2Tokenizer class (tables, encoding, special tokens);
* ``decoding.py``: ids -> text;
* ``batch.py`` and ``encoding.py``: ``tokenizer(texts, padding=..., truncation=...)`` and BatchEncoding;
* ``streaming.py``: IncrementalDecoder for token-by-token output;
* ``files.py``, ``model.py`` and ``loading.py``: reading and writing vocab.json, merges.txt,
  tokenizer.json, tokenizer_config.json; the shared BPE tables; from_pretrained and save_pretrained.

>>> from qwen2np.tokenizer import Qwen2Tokenizer
>>> Qwen2Tokenizer.from_pretrained().encode("Hello world")
[9707, 1879]
"""

from .added_tokens import AddedToken
from .encoding import BatchEncoding
from .streaming import IncrementalDecoder
from .tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast

__all__ = ["AddedToken", "BatchEncoding", "IncrementalDecoder", "Qwen2Tokenizer", "Qwen2TokenizerFast"]
