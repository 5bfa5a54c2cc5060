"""The dump format: named intermediate tensors of one or more forward passes, as a folder of two files.

    manifest.json          what was run (prompt, token ids, attention mask, model fingerprints, dtype,
                           versions) and every tensor's name, key, shape and dtype, per forward pass, in
                           forward order
    tensors.safetensors    the tensors; the key of a tensor is its name in the first forward pass and
                           "{name}@{k}" in forward pass k >= 1 (decode steps)

docs/dump-format.md specifies it for readers and writers in any language; `qwen2np dump` and
scripts/dump_transformers.py write it, `qwen2np compare` reads two. The manifest is built and checked in
manifest.py; tensor_file.py reads a stored tensor a block at a time.

>>> import tempfile, numpy as np
>>> dump = new_dump(producer="example", dtype="float32", input_ids=[[1, 2, 3]],
...                 passes=[{"start": 0, "length": 3, "tensors": [("logits", np.zeros((1, 3, 5), np.float32))]}])
>>> folder = write_dump(dump, tempfile.mkdtemp())
>>> again = read_dump(folder)
>>> again.names(), again["logits"].shape, again.manifest["input_ids"]
(['logits'], (1, 3, 5), [[1, 2, 3]])
"""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DumpError
from ..io.folders import write_folder
from ..io.safetensors_file import (SAFETENSORS_DTYPES, SAFETENSORS_NAMES, load_safetensors, read_safetensors_header,
    write_safetensors)
from .manifest import (FORMAT_VERSION, MANIFEST, TENSORS, check_dump, check_manifest, manifest_text,
    new_manifest, tensor_key)
from .tensor_file import DumpTensor, TensorFile


def plan_passes(num_positions, decode_steps=0):
    """(start, length) of each forward pass: a prefill of all but the last `decode_steps` positions, then
    one pass per remaining position (fed one at a time through the KV cache).

    >>> plan_passes(5), plan_passes(5, decode_steps=2)
    ([(0, 5)], [(0, 3), (3, 1), (4, 1)])
    """
    if not 0 <= decode_steps < num_positions:
        raise DumpError(f"decode_steps must be in [0, {num_positions - 1}] for a prompt of {num_positions} "
                        f"tokens (the prefill needs at least one), found {decode_steps}")
    prefill = num_positions - decode_steps
    return [(0, prefill)] + [(t, 1) for t in range(prefill, num_positions)]


class Dump:
    """A dump: its manifest (a dict, as in manifest.json) and its tensors by safetensors key (arrays; those
    of a dump read from a folder are memory-mapped, and `stored(key)` reads one a block at a time)."""

    def __init__(self, manifest, tensors, folder=None):
        self.manifest = manifest
        self.tensors = tensors
        self.folder = folder
        self._stored = {}   # key -> (the mapped array read_dump made, its DumpTensor)

    @property
    def passes(self):
        return self.manifest["passes"]

    @property
    def dtype(self):
        return self.manifest["dtype"]

    @property
    def input_ids(self):
        return np.array(self.manifest["input_ids"], dtype=np.int64)                  # [B, N]

    @property
    def attention_mask(self):
        mask = self.manifest.get("attention_mask")
        return None if mask is None else np.array(mask, dtype=np.int64)             # [B, N]

    def names(self, pass_index=0):
        """The intermediate names of one forward pass, in forward order."""
        return [t["name"] for t in self.passes[pass_index]["tensors"]]

    def entries(self):
        """(pass index, tensor entry of the manifest) for every tensor, in forward order, pass by pass."""
        return [(i, t) for i, p in enumerate(self.passes) for t in p["tensors"]]

    def tensor(self, name, pass_index=0):
        return self[tensor_key(name, pass_index)]

    def stored(self, key):
        """Tensor `key` to be read a block at a time: a `DumpTensor` of the dump's file when it is still the
        tensor read_dump read (not replaced since), else the array itself. Indexed block by block
        (metrics.blocks), it costs the blocks in flight, never the whole tensor."""
        array = self[key]
        mapped, stored = self._stored.get(key, (None, None))
        return stored if mapped is array else array

    def __getitem__(self, key):
        if key not in self.tensors:
            raise DumpError(f"{key}: not in the dump{f' at {self.folder}' if self.folder else ''}; it holds "
                            f"{len(self.tensors)} tensor{'s' * (len(self.tensors) != 1)}, e.g. "
                            f"{', '.join(list(self.tensors)[:3])}")
        return self.tensors[key]

    def describe(self):
        """One line: where it is, who made it, dtype, batch and positions."""
        B, N = np.shape(self.manifest["input_ids"])
        return (f"{self.folder or '(in memory)'}: {self.manifest.get('producer', '?')}, {self.dtype}, "
                f"B={B}, {N} positions in {len(self.passes)} forward pass{'es' * (len(self.passes) != 1)}")


def new_dump(*, producer, dtype, input_ids, passes, attention_mask=None, prompt=None, chat=False,
             versions=None, model=None, options=None):
    """Build a Dump from the tensors of each forward pass.

    `passes` is a list of {"start", "length", "tensors": [(name, array), …] in forward order} (and
    "positions", the input positions kept along T when not all: docs/dump-format.md); `model` is
    {"path", "class", "config", "config_fingerprint", "weights_fingerprint"} (docs/dump-format.md).
    """
    manifest = new_manifest(producer=producer, dtype=dtype, input_ids=input_ids, attention_mask=attention_mask,
                            prompt=prompt, chat=chat, versions=versions, model=model, options=options)
    tensors = {}
    for index, p in enumerate(passes):
        entries = []
        for name, array in p["tensors"]:
            key = tensor_key(name, index)
            tensors[key] = array
            entries.append({"name": name, "key": key, "shape": list(array.shape), "dtype": array.dtype.name})
        kept = {} if p.get("positions") is None else {"positions": [int(i) for i in p["positions"]]}
        manifest["passes"].append({"start": int(p["start"]), "length": int(p["length"]), **kept, "tensors": entries})
    dump = Dump(manifest, tensors)
    check_dump(dump, "new_dump")
    return dump


def write_dump(dump, folder, overwrite=False):
    """Write `dump` as the folder `folder`; returns the folder.

    The folder is written whole (qwen2np/io/folders.py): both files go into a temporary sibling that
    then replaces `folder`, so no reader ever sees new tensors beside an old manifest, and an error
    leaves `folder` as it was. A folder that already holds files is refused (`OutputExistsError`)
    unless `overwrite=True`, which replaces it whole. `DumpWriter` writes the same format tensor by
    tensor.
    """
    folder = Path(folder)
    check_dump(dump, str(folder))
    with write_folder(folder, overwrite=overwrite) as tmp:
        write_safetensors(tmp / TENSORS, dump.tensors, metadata=_TENSORS_METADATA)
        (tmp / MANIFEST).write_text(manifest_text(dump.manifest), encoding="utf-8")
    dump.folder = folder
    return folder


_TENSORS_METADATA = {"qwen2np_dump": str(FORMAT_VERSION)}


class DumpWriter:
    """Write a dump tensor by tensor, without holding the tensors in memory: for recorders that stream.

        with DumpWriter("dumps/q", overwrite=False) as writer:
            writer.add("logits", array)           # each key once, in any order
            ...
            writer.finish(manifest)               # the manifest lists exactly the keys added

    The tensors' bytes go to a data file in the temporary folder as they come; `finish` checks the
    manifest against the names, shapes and dtypes added, writes tensors.safetensors (its header, then
    the data, copied in the kernel where it can: the temporary folder briefly holds the data twice) and
    manifest.json, and the folder then replaces `folder` whole. Leaving the block without `finish`,
    or by an exception, writes nothing and leaves `folder` as it was.

    >>> import tempfile, numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> with DumpWriter(folder) as writer:
    ...     writer.add("logits", np.zeros((1, 3, 5), np.float32))
    ...     manifest = new_manifest(producer="example", dtype="float32", input_ids=[[1, 2, 3]])
    ...     manifest["passes"] = [{"start": 0, "length": 3, "tensors": [
    ...         {"name": "logits", "key": "logits", "shape": [1, 3, 5], "dtype": "float32"}]}]
    ...     writer.finish(manifest)
    >>> read_dump(folder)["logits"].shape
    (1, 3, 5)
    """

    def __init__(self, folder, overwrite=False):
        self.folder = Path(folder)
        self.overwrite = overwrite
        self._context = None
        self._tmp = None
        self._data = None       # the open data file
        self._entries = {}      # key -> (safetensors dtype, shape, begin, end)
        self._finished = False

    def __enter__(self):
        self._context = write_folder(self.folder, overwrite=self.overwrite)
        self._tmp = self._context.__enter__()
        try:
            self._data = open(self._tmp / f"{TENSORS}.data", "wb")
        except BaseException as e:
            self._context.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def add(self, key, array):
        """Append one tensor (any array the safetensors format stores: float32, float64, ...)."""
        if self._data is None or self._finished:
            raise DumpError(f"{self.folder}: DumpWriter.add outside its `with` block or after finish()")
        if not isinstance(key, str) or key in self._entries:
            raise DumpError(f"{self.folder}: tensor key {key!r} is not a string or was added before")
        array = np.asarray(array)
        type_name = SAFETENSORS_NAMES.get(array.dtype.name)
        if type_name is None:
            raise DumpError(f"{self.folder}: {key}: cannot store dtype {array.dtype.name}")
        begin = self._data.tell()
        self._data.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._entries[key] = (type_name, array.dtype.name, list(array.shape), begin, self._data.tell())

    def finish(self, manifest):
        """Check `manifest` against the tensors added, and write tensors.safetensors and manifest.json."""
        if self._data is None or self._finished:
            raise DumpError(f"{self.folder}: DumpWriter.finish outside its `with` block or called twice")
        shapes = {k: _Shape(tuple(e[2]), np.dtype(e[1])) for k, e in self._entries.items()}
        check_dump(Dump(manifest, shapes), str(self.folder))
        self._data.close()
        header = {k: {"dtype": e[0], "shape": e[2], "data_offsets": [e[3], e[4]]} for k, e in sorted(self._entries.items())}
        header["__metadata__"] = {"format": "pt", **_TENSORS_METADATA}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
        data_path = self._tmp / f"{TENSORS}.data"
        with open(self._tmp / TENSORS, "wb") as out, open(data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little") + raw)
            out.flush()
            _copy_file(data, out)
        os.remove(data_path)
        (self._tmp / MANIFEST).write_text(manifest_text(manifest), encoding="utf-8")
        self._finished = True

    def __exit__(self, kind, error, traceback):
        if self._data is not None and not self._data.closed:
            self._data.close()
        if kind is None and not self._finished:  # left without finish(): write nothing
            error = DumpError(f"{self.folder}: DumpWriter left without finish(manifest); nothing written")
            self._context.__exit__(DumpError, error, None)
            raise error
        return self._context.__exit__(kind, error, traceback)


class _Shape:
    """What check_dump reads of an array (shape and dtype), for tensors already on disk."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _copy_file(source, destination):
    """Append the whole of `source` to `destination` (both open binary files), in the kernel if possible."""
    size = os.fstat(source.fileno()).st_size
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(source.fileno(), destination.fileno(), size - done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError) as e:  # no copy_file_range (not Linux, an old kernel, another fs)
        if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if done < size:
        source.seek(done)
        destination.seek(0, os.SEEK_END)
        shutil.copyfileobj(source, destination, 16 << 20)


def read_dump(folder):
    """Read and check a dump folder; the tensors are memory-mapped (read-only)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        what = "no such folder" if not folder.exists() else f"no {MANIFEST} in it"
        raise DumpError(f"{folder}: not a dump ({what}); `qwen2np dump --out {folder}` writes one")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DumpError(f"{folder / MANIFEST}: not valid JSON ({e})") from e
    except RecursionError:   # json's parser recurses once per level of nesting
        raise DumpError(f"{folder / MANIFEST}: nested too deeply for a manifest (arrays or objects within each "
                        f"other past Python's recursion limit); docs/dump-format.md gives its structure") from None
    check_manifest(manifest, str(folder / MANIFEST))
    try:
        header = read_safetensors_header(folder / TENSORS)
        file = TensorFile(header.path)
        tensors, stored = {}, {}
        for e in header.entries:
            dtype = SAFETENSORS_DTYPES[e.dtype]
            stored[e.name] = DumpTensor(file, e.name, e.start, dtype, e.shape)
        for dtype in {s.dtype.name for s in stored.values()}:   # mapped as stored: nothing is read here
            loaded = load_safetensors(folder / TENSORS, dtype=dtype, header=header)
            tensors.update({k: a for k, a in loaded.items() if stored[k].dtype.name == dtype})
    except (CheckpointError, OSError) as e:
        raise DumpError(f"{folder / TENSORS}: cannot read the tensors of the dump: {e}") from e
    dump = Dump(manifest, tensors, folder)
    check_dump(dump, str(folder))
    dump._stored = {k: (tensors[k], stored[k]) for k in tensors}
    return dump
