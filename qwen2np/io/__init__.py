"""Checkpoint files: Hugging Face folders, single safetensors files and GGUF files.

* `open_checkpoint(path) -> Checkpoint` opens any of them, its tensors memory-mapped and left as stored
  (checkpoint.py, stored.py); the model classes' `from_pretrained` calls it, checks names and shapes,
  and holds each weight as qwen2np/budget.py plans. `load_checkpoint(path, dtype)` converts every
  tensor to an array at once.
* `save_hf_folder(folder, config, tensors, ...)` writes a folder transformers can load (hf_folder.py).
* `load_gguf_tokenizer(path)` builds the tokenizer a GGUF file carries (gguf_file.py).
* safetensors_file.py parses and writes the safetensors format itself (no pickle, no torch);
  gguf_header.py parses GGUF headers; gguf_names.py maps llama.cpp tensor names to Hugging Face ones.

docs/checkpoints.md describes the formats, the name mapping, dtypes, memory and errors.

>>> import tempfile, numpy as np
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"lm_head.weight": np.zeros((2, 2), np.float32)})
>>> load_checkpoint(folder)  # doctest: +ELLIPSIS
Checkpoint('...', 1 tensors, 4 parameters)
"""

from .checkpoint import LOAD_DTYPES, Checkpoint, load_checkpoint, open_checkpoint
from .hf_folder import save_hf_folder

__all__ = ["Checkpoint", "open_checkpoint", "load_checkpoint", "save_hf_folder", "load_gguf_tokenizer", "LOAD_DTYPES"]


def load_gguf_tokenizer(path):
    """The Qwen2Tokenizer of a GGUF file (see `qwen2np.io.gguf_file.load_gguf_tokenizer`)."""
    from .gguf_file import load_gguf_tokenizer as load

    return load(path)
