"""A checkpoint, whatever file it came from: `open_checkpoint(path) -> Checkpoint`.

Three kinds of path are read:

* a Hugging Face folder (`config.json` + `model.safetensors` or shards with an index): hf_folder.py
* one `.safetensors` file (its config is the `config.json` beside it, if any): hf_folder.py
* a `.gguf` file (llama.cpp; needs the optional `gguf` package): gguf_file.py. Its tensor names are
  mapped to the Hugging Face ones; its quantized blocks stay as they are until converted.

`open_checkpoint` reads headers only: every tensor is a `StoredTensor` (qwen2np/io/stored.py), bytes in
a memory-mapped file, in their stored format. The model classes open checkpoints this way and decide
per weight whether to convert it ahead of time or at each use (qwen2np/weights/plan.py, store.py).
`qwen2np.weights.load_checkpoint` converts every tensor to a NumPy array at once (for tools and tests).

>>> import tempfile, numpy as np
>>> from qwen2np.io.hf_folder import save_hf_folder
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"norm.weight": np.ones(3, np.float32)}, dtype="bfloat16")
>>> open_checkpoint(folder).tensors["norm.weight"]
StoredTensor('norm.weight', (3,), BF16, model.safetensors)
>>> open_checkpoint(folder).origin["norm.weight"]
'model.safetensors'
"""

from pathlib import Path

from ..errors import CheckpointError
from .gguf_file import open_gguf
from .hf_folder import open_hf_folder, open_safetensors_file
from .stored import Checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]



def open_checkpoint(path):
    """The `Checkpoint` at `path` (folder, `.safetensors` or `.gguf`), its tensors as StoredTensors: headers
    read and checked, files memory-mapped, no tensor data read."""
    path = Path(path).expanduser()
    if path.is_dir():
        return open_hf_folder(path)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
        return open_gguf(path)
    if path.suffix == ".safetensors":
        return open_safetensors_file(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path}: a pickled checkpoint. qwen2np never unpickles (loading a pickle can "
                              "run arbitrary code); convert to safetensors")
    raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors file or a .gguf file")


def _starts_with(path, magic):
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
