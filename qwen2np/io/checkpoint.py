"""A checkpoint in memory, whatever file it came from: `load_checkpoint(path) -> Checkpoint`.

Three kinds of path are read:

* a Hugging Face folder (`config.json` + `model.safetensors` or shards with an index): hf_folder.py
* one `.safetensors` file (its config is the `config.json` beside it, if any): safetensors_file.py
* a `.gguf` file (llama.cpp; needs the optional `gguf` package): gguf_file.py. Its tensor names are
  mapped to the Hugging Face ones and its quantized blocks are dequantized.

The result is the same record in every case: a config.json dict, `{name: array}` with the names as a
Hugging Face checkpoint stores them, where each tensor came from, and the generation config.

>>> import tempfile, numpy as np
>>> from qwen2np.io import save_hf_folder
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"norm.weight": np.ones(3, np.float32)}, dtype="bfloat16")
>>> ckpt = load_checkpoint(folder)
>>> ckpt.tensors["norm.weight"], ckpt.origin["norm.weight"]
(array([1., 1., 1.], dtype=float32), 'model.safetensors')
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

__all__ = ["Checkpoint", "load_checkpoint", "LOAD_DTYPES"]

LOAD_DTYPES = ("float32", "float64")


@dataclass
class Checkpoint:
    """What a checkpoint holds, with tensors named as in a Hugging Face checkpoint."""

    config: dict  # a config.json dict (model_type "qwen2"), as transformers would write it
    tensors: dict  # {name: ndarray}, names exactly as stored (GGUF names already mapped to HF names)
    origin: dict  # {tensor name: the file it came from}, for error messages
    generation_config: dict | None = None  # generation_config.json when present
    path: Path = field(default=None)  # the folder or file that was loaded

    def __repr__(self):
        n = sum(int(np.prod(a.shape, dtype=np.int64)) for a in self.tensors.values())
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {n:,} parameters)"


def load_checkpoint(path, dtype="float32", progress=None):
    """Load the checkpoint at `path` (folder, `.safetensors` or `.gguf`) with its tensors in `dtype`.

    `dtype` is "float32" or "float64". Float32 tensors stored as F32 in safetensors are read-only
    views of a memory map (no copy); every other tensor is converted chunk by chunk into its own
    array, so the peak memory while loading stays near the size of the result.
    `progress`, if given, is called as `progress(done, total, label)` as tensors load (see
    `qwen2np.progress.ProgressBar`).
    """
    dtype = _load_dtype(dtype)
    path = Path(path).expanduser()
    if path.is_dir():
        from .hf_folder import load_hf_folder

        return load_hf_folder(path, dtype, progress)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
        from .gguf_file import load_gguf

        return load_gguf(path, dtype, progress)
    if path.suffix == ".safetensors":
        from .hf_folder import load_safetensors_file

        return load_safetensors_file(path, dtype, progress)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path}: a pickled checkpoint. qwen2np never unpickles (loading a pickle can "
                              "run arbitrary code); convert to safetensors")
    raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors file or a .gguf file")


def _load_dtype(dtype):
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in LOAD_DTYPES:
        raise CheckpointError(f"dtype: expected one of {', '.join(LOAD_DTYPES)}, found {dtype!r}")
    return name


def _starts_with(path, magic):
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
