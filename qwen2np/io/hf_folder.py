"""Hugging Face checkpoint folders: `config.json` plus `model.safetensors` or shards with an index.

A folder as `save_pretrained` writes it::

    config.json                      the model's shape (Qwen2Config)
    generation_config.json           optional: eos ids and sampling defaults
    model.safetensors                one file ...
    model.safetensors.index.json     ... or an index {"weight_map": {tensor name: shard file}}
    model-00001-of-00002.safetensors     with its shards

Like transformers, a single `model.safetensors` wins over an index when both are present. Weights
pickled by torch (`pytorch_model.bin`) are refused: unpickling runs arbitrary code.

>>> import tempfile, numpy as np
>>> folder = tempfile.mkdtemp()
>>> save_hf_folder(folder, {"model_type": "qwen2"}, {"model.norm.weight": np.ones(4, np.float32)})
>>> sorted(os.listdir(folder))
['config.json', 'model.safetensors']
>>> ckpt = open_hf_folder(folder)
>>> ckpt.config["model_type"], ckpt.tensors["model.norm.weight"].shape, ckpt.origin["model.norm.weight"]
('qwen2', (4,), 'model.safetensors')
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, OutputExistsError
from .folders import check_target, write_folder
from .safetensors_file import SAFETENSORS_NAMES, read_safetensors_header, write_safetensors
from .stored import Checkpoint, open_safetensors

__all__ = ["open_hf_folder", "open_safetensors_file", "save_hf_folder", "read_json"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# weight files qwen2np will not read, and why
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
_OTHER_FRAMEWORKS = ("tf_model.h5", "flax_model.msgpack")


def read_json(path, required=True):
    """The JSON object in `path`; None when it is absent and not `required`. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def open_hf_folder(folder):
    """The `Checkpoint` in a Hugging Face folder (see the module docstring for the layout), its tensors as
    StoredTensors: every header read and checked before any tensor is used, no tensor data read."""
    folder = Path(folder)
    config = read_json(folder / "config.json", required=False)
    if config is None:
        raise CheckpointError(f"{folder}: no config.json; a checkpoint folder needs one beside its weights")
    generation_config = read_json(folder / "generation_config.json", required=False)
    shards, weight_map = _weight_files(folder)
    headers = [read_safetensors_header(p) for p in shards]  # every file is checked before any loads
    origin = _origin(headers, folder)
    for name, file in (weight_map or {}).items():
        if origin.get(name) != os.path.normpath(file):
            raise CheckpointError(f"{folder / INDEX}: the weight_map puts tensor {name!r} in {file}, "
                                  f"but {file} has no tensor of that name")
    tensors = _open_headers(headers, folder)
    return Checkpoint(config, tensors, origin, generation_config, folder)


def open_safetensors_file(path):
    """The `Checkpoint` of one `.safetensors` file; its config is the `config.json` beside it, if any ({} if not)."""
    path = Path(path)
    config = read_json(path.parent / "config.json", required=False) or {}
    generation_config = read_json(path.parent / "generation_config.json", required=False)
    headers = [read_safetensors_header(path)]
    origin = _origin(headers, path.parent)
    return Checkpoint(config, _open_headers(headers, path.parent), origin, generation_config, path)


def _origin(headers, folder):
    """{tensor name: its file, relative to `folder`}; a tensor stored in two files is an error."""
    origin = {}
    for header in headers:
        file = os.path.relpath(header.path, folder)
        for e in header.entries:
            if e.name in origin:
                raise CheckpointError(f"tensor {e.name!r} is stored twice: in {origin[e.name]} and in {file}")
            origin[e.name] = file
    return origin


def _open_headers(headers, folder):
    """{name: StoredTensor} over every file (each memory-mapped once)."""
    tensors = {}
    for header in headers:
        tensors.update(open_safetensors(header.path, header=header, origin=os.path.relpath(header.path, folder)))
    return tensors


def _weight_files(folder):
    """`([shard paths], weight_map or None)` for the folder, or a CheckpointError saying what is there instead."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / SINGLE).is_file():
        return [folder / SINGLE], None
    if (folder / INDEX).is_file():
        index = read_json(folder / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{folder / INDEX}: expected \"weight_map\": {{tensor name: file name}}, "
                                  f"found {weight_map!r}"[:300])
        shards = []
        for name, file in weight_map.items():
            path = _inside(folder, file, name)
            if path not in shards:
                if not path.is_file():
                    raise CheckpointError(f"{folder / INDEX}: shard {file} (holding tensor {name!r}) is missing "
                                          f"from {folder}")
                shards.append(path)
        return shards, weight_map
    present = sorted(p.name for p in folder.iterdir())
    pickled = [n for n in present if n in _PICKLED or n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickled:
        raise CheckpointError(
            f"{folder}: holds only pickled weights ({', '.join(pickled)}). qwen2np never unpickles "
            "(loading a pickle can run arbitrary code); convert to safetensors, e.g. in Python with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out_folder)")
    other = [n for n in present if n in _OTHER_FRAMEWORKS]
    ggufs = [n for n in present if n.endswith(".gguf")]
    hint = (f"; it holds {', '.join(other)} (TensorFlow/Flax weights), which qwen2np does not read" if other
            else f"; to load a GGUF file, pass the file itself: {folder / ggufs[0]}" if ggufs else "")
    raise CheckpointError(f"{folder}: no {SINGLE} and no {INDEX}{hint}")


def _inside(folder, file, tensor):
    """`folder/file`, refusing an index entry that points outside the folder (absolute, `..`)."""
    parts = Path(file).parts
    if Path(file).is_absolute() or os.path.isabs(file) or ".." in parts or not parts or "\\" in file:
        raise CheckpointError(f"{folder / INDEX}: tensor {tensor!r} names shard {file!r}, which is not a "
                              f"file inside {folder}; shard names must be relative, without '..'")
    path = folder / file
    root = _link_root(folder)
    try:
        path.resolve().relative_to(root)
    except ValueError:  # a symlink out of the folder (or out of the hub cache's repository folder)
        raise CheckpointError(f"{folder / INDEX}: shard {file!r} (tensor {tensor!r}) resolves to "
                              f"{path.resolve()}, outside {root}") from None
    return path


def _link_root(folder):
    """The folder the shards' links may resolve into: `folder` itself or, for a snapshot in a Hugging Face
    hub cache, the repository's cache folder.

    subtle: a hub cache keeps each file once, in `models--org--name/blobs/<hash>`, and a snapshot
    `models--org--name/snapshots/<revision>/` holds only links to them (`../../blobs/<hash>`), so every
    shard of a snapshot resolves outside the snapshot folder, but never outside `models--org--name`.
    """
    resolved = folder.resolve()
    repository = resolved.parent.parent
    if (resolved.parent.name == "snapshots" and repository.name.startswith(("models--", "datasets--", "spaces--"))
            and (repository / "blobs").is_dir()):
        return repository
    return resolved


def save_hf_folder(folder, config, tensors, generation_config=None, max_shard_bytes=None, dtype=None,
                   overwrite=None):
    """Write `config.json`, the weights and `generation_config.json` (when given) as the folder `folder`.

    `dtype` ("float32", "bfloat16", "float16"; None keeps each array's dtype) converts while writing,
    a chunk at a time, and is recorded as `config["dtype"]`. With `max_shard_bytes`, the weights are
    split into `model-0000i-of-0000n.safetensors` files of at most that size (a bigger tensor gets a
    file of its own) with a `model.safetensors.index.json`; otherwise one `model.safetensors`.
    transformers 5.24 and the `safetensors` package read the result.

    The folder is written whole (qwen2np/io/folders.py): into a temporary sibling that then replaces
    `folder`, so no reader sees half a checkpoint or a new config beside old weights, and an error
    (or Ctrl-C) leaves `folder` as it was. `overwrite` says what may be replaced:

    * None (the default): an absent or empty folder is written; a Hugging Face folder (one with a
      config.json, or holding only model and tokenizer files) gets a new set of model files
      (config.json, generation_config.json, weights and index: the old ones all go, so no stale
      shard or generation config outlives the save) and keeps its other files, such as the
      tokenizer's, whichever was saved first. Any other folder that holds files is refused
      (`OutputExistsError`): it is not a model folder, and a model written into it is likely a
      mistake (a wrong path, a project folder).
    * True: the folder is replaced whole, whatever it held (nothing is kept).
    * False: a folder that holds anything is refused.
    """
    if dtype is not None and str(dtype) not in _WRITE_ITEMSIZE:
        raise CheckpointError(f"save_hf_folder: dtype must be one of {', '.join(_WRITE_ITEMSIZE)} or None, "
                              f"found {dtype!r}")
    if overwrite not in (None, True, False):
        raise CheckpointError(f"save_hf_folder: overwrite must be None, True or False, found {overwrite!r}")
    _check_save_inputs(config, tensors, generation_config, max_shard_bytes, dtype)
    keep = None
    if overwrite is None:
        target = check_target(folder, overwrite=True)  # a file there is refused in any case
        present = sorted(os.listdir(target)) if target.is_dir() else []
        if present:
            if "config.json" not in present and not all(_is_model_file(n) or n in _HF_OTHER_FILES for n in present):
                strangers = [n for n in present if not (_is_model_file(n) or n in _HF_OTHER_FILES)]
                raise OutputExistsError(
                    f"{folder}: holds files that are not a Hugging Face model folder's ({', '.join(strangers[:3])}"
                    f"{' ...' if len(strangers) > 3 else ''}) and no config.json; pass overwrite=True to "
                    f"replace the folder whole, or save into another folder")
            keep = lambda name: not _is_model_file(name)  # noqa: E731  (the tokenizer's files, a README)
    with write_folder(folder, overwrite=overwrite is not False, keep=keep) as tmp:
        write_hf_files(tmp, config, tensors, generation_config, max_shard_bytes, dtype)


def _check_save_inputs(config, tensors, generation_config, max_shard_bytes, dtype):
    """Refuse, before anything is written, what save_hf_folder could not write whole."""
    for name, value in (("config", config), ("generation_config", generation_config)):
        if value is None and name == "generation_config":
            continue
        if not isinstance(value, Mapping):
            raise CheckpointError(f"save_hf_folder: {name} must be a dict, found {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"save_hf_folder: {name} cannot be written as JSON: {e}") from None
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"save_hf_folder: tensors must be a dict {{name: array}}, found {type(tensors).__name__}")
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"save_hf_folder: tensor names must be strings, found {name!r}")
        if not (hasattr(array, "shape") and hasattr(array, "dtype")):
            raise CheckpointError(f"save_hf_folder: tensor {name!r} must be an array, found {type(array).__name__}")
        stored = np.dtype(array.dtype)
        if (stored.name not in SAFETENSORS_NAMES) if dtype is None else (stored.name not in SAFETENSORS_NAMES and stored.kind not in "iub"):
            raise CheckpointError(f"save_hf_folder: tensor {name!r} has dtype {stored.name}, which cannot be "
                                  f"written {'as it is' if dtype is None else f'as {dtype}'} (expected one of "
                                  f"{', '.join(SAFETENSORS_NAMES)})")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool)
                                        or max_shard_bytes < 1):
        raise CheckpointError(f"save_hf_folder: max_shard_bytes must be None or an integer >= 1, found "
                              f"{max_shard_bytes!r}")


def write_hf_files(folder, config, tensors, generation_config=None, max_shard_bytes=None, dtype=None):
    """The files of `save_hf_folder`, written into `folder` as it is (a fresh folder of `write_folder`)."""
    folder = Path(folder)
    config = dict(config)
    if dtype is not None:
        config["dtype"] = str(dtype)
    _write_json(folder / "config.json", config)
    if generation_config is not None:
        _write_json(folder / "generation_config.json", generation_config)

    itemsize = {name: _itemsize(array, dtype) for name, array in tensors.items()}
    sizes = {name: int(np.prod(array.shape, dtype=np.int64)) * itemsize[name] for name, array in tensors.items()}
    groups = _shard_groups(sorted(tensors), sizes, max_shard_bytes)
    if len(groups) == 1 and max_shard_bytes is None:
        files = [SINGLE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups):
        write_safetensors(folder / file, {n: tensors[n] for n in names}, dtype=dtype)
    if files != [SINGLE]:
        index = {
            "metadata": {
                "total_parameters": sum(int(np.prod(a.shape, dtype=np.int64)) for a in tensors.values()),
                "total_size": sum(sizes.values()),
            },
            "weight_map": {name: file for file, names in zip(files, groups) for name in names},
        }
        _write_json(folder / INDEX, index)


# The files of a model in a Hugging Face folder (replaced as a set by save_hf_folder), and the other files
# such a folder holds (kept)
_MODEL_FILE = re.compile(r"(config|generation_config)\.json"
                         r"|model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
                         r"|pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?"
                         r"|model\.(pt|pth|ckpt)|tf_model\.h5|flax_model\.msgpack")
_HF_OTHER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "README.md", ".gitattributes", "LICENSE"}


def _is_model_file(name):
    return _MODEL_FILE.fullmatch(name) is not None


def _shard_groups(names, sizes, max_shard_bytes):
    if max_shard_bytes is None:
        return [names]
    groups, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > max_shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    return groups + [current] if current or not groups else groups


_WRITE_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _itemsize(array, dtype):
    return np.dtype(array.dtype).itemsize if dtype is None else _WRITE_ITEMSIZE[str(dtype)]


def _write_json(path, value):
    """JSON as transformers writes it (indent 2, sorted keys, trailing newline), replaced atomically."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
