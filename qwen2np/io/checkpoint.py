"""A checkpoint, whatever file it came from: `open_checkpoint(path)` and `load_checkpoint(path) -> Checkpoint`.

Three kinds of path are read:

* a Hugging Face folder (`config.json` + `model.safetensors` or shards with an index): hf_folder.py
* one `.safetensors` file (its config is the `config.json` beside it, if any): hf_folder.py
* a `.gguf` file (llama.cpp; needs the optional `gguf` package): gguf_file.py. Its tensor names are
  mapped to the Hugging Face ones; its quantized blocks stay as they are until converted.

`open_checkpoint` reads headers only: every tensor is a `StoredTensor` (qwen2np/io/stored.py), bytes in
a memory-mapped file, in their stored format. The model classes open checkpoints this way and decide
per weight whether to convert it ahead of time or at each use (qwen2np/budget.py, weight_store.py).
`load_checkpoint` converts every tensor to a NumPy array at once (for tools and tests): the result is the
same record, with `{name: array}`.

>>> import tempfile, numpy as np
>>> from qwen2np.io import save_hf_folder
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"norm.weight": np.ones(3, np.float32)}, dtype="bfloat16")
>>> open_checkpoint(folder).tensors["norm.weight"]
StoredTensor('norm.weight', (3,), BF16, model.safetensors)
>>> ckpt = load_checkpoint(folder)
>>> ckpt.tensors["norm.weight"], ckpt.origin["norm.weight"]
(array([1., 1., 1.], dtype=float32), 'model.safetensors')
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint", "load_checkpoint", "materialize", "LOAD_DTYPES"]

LOAD_DTYPES = ("float32", "float64")


@dataclass
class Checkpoint:
    """What a checkpoint holds, with tensors named as in a Hugging Face checkpoint."""

    config: dict  # a config.json dict (model_type "qwen2"), as transformers would write it
    tensors: dict  # {name: StoredTensor or ndarray}, names as stored (GGUF names already mapped to HF names)
    origin: dict  # {tensor name: the file it came from}, for error messages
    generation_config: dict | None = None  # generation_config.json when present
    path: Path = field(default=None)  # the folder or file that was loaded

    def __repr__(self):
        n = sum(int(np.prod(a.shape, dtype=np.int64)) for a in self.tensors.values())
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {n:,} parameters)"


def open_checkpoint(path):
    """The `Checkpoint` at `path` (folder, `.safetensors` or `.gguf`), its tensors as StoredTensors: headers
    read and checked, files memory-mapped, no tensor data read."""
    path = Path(path).expanduser()
    if path.is_dir():
        from .hf_folder import open_hf_folder

        return open_hf_folder(path)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
        from .gguf_file import open_gguf

        return open_gguf(path)
    if path.suffix == ".safetensors":
        from .hf_folder import open_safetensors_file

        return open_safetensors_file(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path}: a pickled checkpoint. qwen2np never unpickles (loading a pickle can "
                              "run arbitrary code); convert to safetensors")
    raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors file or a .gguf file")


def load_checkpoint(path, dtype="float32", progress=None):
    """The checkpoint at `path` with every tensor converted to a `dtype` array ("float32" or "float64").

    A tensor already stored in `dtype` is a read-only view of the memory-mapped file (no copy, no read);
    any other is converted a chunk of rows at a time into its own array, and the stored pages are let go
    as it goes, so the peak memory while loading stays near the size of the result.
    `progress`, if given, is called as `progress(done, total, label)` as tensors load (see
    `qwen2np.progress.ProgressBar`).
    """
    dtype = _load_dtype(dtype)
    return materialize(open_checkpoint(path), dtype, progress)


def materialize(checkpoint, dtype, progress=None):
    """`checkpoint` with its StoredTensors converted to `dtype` arrays (see load_checkpoint)."""
    from ..weight_store import convert_whole

    total = sum(t.nbytes for t in checkpoint.tensors.values())
    done, tensors = 0, {}
    for name, stored in checkpoint.tensors.items():
        tensors[name] = convert_whole(stored, dtype)
        done += stored.nbytes
        if progress is not None:
            progress(done, total, name)
    return Checkpoint(checkpoint.config, tensors, checkpoint.origin, checkpoint.generation_config, checkpoint.path)


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
