"""Resolving a `--model` spec to a local path: a folder, a file, the test checkpoint, or a Hub id.

* an existing folder, `.gguf` file or `.safetensors` file -> that path;
* `test` or `qwen2np:test` -> the test checkpoint (`qwen2np fetch` downloads it; this never does);
* `org/name` (optionally `org/name@revision`) -> a snapshot from the Hugging Face Hub through
  `huggingface_hub.snapshot_download` (the optional `hub` extra), restricted to safetensors, JSON,
  text and Jinja files: pickled `.bin` weights are never downloaded;
* anything else -> "no such file or folder".

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> resolve_model_path(folder) == Path(folder)
True
>>> resolve_model_path("./nowhere.gguf")
Traceback (most recent call last):
...
qwen2np.errors.CheckpointError: no such file or folder: ./nowhere.gguf
"""

import re
from pathlib import Path

from ..errors import CheckpointError, DownloadError, MissingDependencyError
from .fetch import test_checkpoint_path

__all__ = ["resolve_model_path", "HUB_ALLOW_PATTERNS", "TEST_NAMES"]

TEST_NAMES = ("test", "qwen2np:test")
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_FILE_SUFFIXES = (".gguf", ".safetensors")


def resolve_model_path(spec):
    """The local path of the checkpoint named by `spec` (see the module docstring)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix in _FILE_SUFFIXES:
            return path
        raise CheckpointError(f"{path}: expected a checkpoint folder, a .gguf file or a .safetensors file")
    if text in TEST_NAMES:
        test = test_checkpoint_path()
        if not test.is_file():
            raise CheckpointError(f"the test checkpoint is not at {test}; run `qwen2np fetch` to download it")
        return test
    if _HUB_ID.fullmatch(text) and not text.endswith(_FILE_SUFFIXES):
        return _snapshot(text)
    raise CheckpointError(f"no such file or folder: {text}")


def _snapshot(spec):
    repo_id, _, revision = spec.partition("@")
    try:
        import huggingface_hub   # optional (the `hub` extra): imported only for a Hub id
    except ImportError as e:
        raise MissingDependencyError(
            f"{spec!r} is not a local path, and fetching it from the Hugging Face Hub needs huggingface_hub: "
            "pip install 'qwen2np[hub]'"
        ) from e
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                   allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # offline, not found, gated, HTTP errors: one line for the user
        first = (str(e).strip().splitlines() or [""])[0]
        raise DownloadError(f"{spec!r} is not a local path and could not be fetched from the Hugging Face Hub "
                            f"({type(e).__name__}: {first})") from e
    return Path(folder)
