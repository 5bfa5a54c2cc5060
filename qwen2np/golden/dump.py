"""The dump format: named intermediate tensors of one or more forward passes, as a folder of two files.

    manifest.json          what was run (prompt, token ids, attention mask, model fingerprints, dtype,
                           versions) and every tensor's name, key, shape and dtype, per forward pass, in
                           forward order
    tensors.safetensors    the tensors; the key of a tensor is its name in the first forward pass and
                           "{name}@{k}" in forward pass k >= 1 (decode steps)

docs/dump-format.md specifies it for readers and writers in any language; `qwen2np dump` and
scripts/dump_transformers.py write it, `qwen2np compare` reads two.

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
import math
import os
import reprlib
import shutil
import weakref
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DumpError
from ..io.folders import write_folder
from ..io.safetensors_file import (SAFETENSORS_DTYPES, SAFETENSORS_NAMES, load_safetensors, read_safetensors_header,
    write_safetensors)

FORMAT = "qwen2np-dump"
FORMAT_VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
# compute dtypes a dump may declare: a port in half precision writes its tensors as it computed them
DTYPES = ("float32", "float64", "bfloat16", "float16")


def tensor_key(name, pass_index):
    """The safetensors key of intermediate `name` in forward pass `pass_index` (0 is the prefill).

    >>> tensor_key("logits", 0), tensor_key("logits", 2)
    ('logits', 'logits@2')
    """
    return name if pass_index == 0 else f"{name}@{pass_index}"


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
        self._stored = {}   # key -> (the mapped array read_dump made, its StoredTensor)

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
        """Tensor `key` to be read a block at a time: a `StoredTensor` of the dump's file when it is still the
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


class StoredTensor:
    """A tensor of a dump's tensors.safetensors, read when indexed: `t[index]` reads the elements of one
    C-contiguous block (a tuple of slices and integers, as metrics.blocks makes) into a new array;
    `np.asarray(t)` reads it whole.

    subtle: the block is read with plain file reads, through the page cache, which does not count in the
    process's memory; the pages of a memory map, once touched, count until the map is closed, so that
    reading a whole dump through its map would hold all of it. The file is opened once, by read_dump:
    a dump replaced meanwhile (`--overwrite`) is still read as it was.
    """

    def __init__(self, file, key, start, dtype, shape):
        self._file, self.key, self._start = file, key, start
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __repr__(self):
        return f"StoredTensor({self.key!r}, shape={self.shape}, dtype={self.dtype.name})"

    def __array__(self, dtype=None, copy=None):
        whole = self[()]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, index):
        first, shape, kept = _block(self.shape, index if isinstance(index, tuple) else (index,), self.key)
        out = np.empty(math.prod(shape), self.dtype)
        self._file.read_into(out, self._start + first * self.dtype.itemsize, self.key)
        return out.reshape(kept)


class _TensorFile:
    """tensors.safetensors held open, so that what read_dump checked is what is read; closed with the dump."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read_into(self, out, offset, key):
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        try:
            while done < len(view):
                if hasattr(os, "preadv"):   # straight into the array
                    n = os.preadv(self.fd, [view[done:]], offset + done)
                else:
                    chunk = os.pread(self.fd, min(len(view) - done, 1 << 26), offset + done)
                    n = len(chunk)
                    view[done:done + n] = chunk
                if n == 0:
                    raise DumpError(f"{self.path}: {key}: the file ended while reading the tensor (truncated since "
                                    f"it was opened)")
                done += n
        except OSError as e:
            raise DumpError(f"{self.path}: {key}: cannot read the tensor: {e.strerror or e}") from e


def _block(shape, index, key):
    """(first element, block shape, result shape) of `index` into an array of `shape`: slices of step 1 and
    integers that select one C-contiguous block; an IndexError otherwise."""
    if len(index) > len(shape):
        raise IndexError(f"{key}: {len(index)} indices for a tensor of {len(shape)} axes")
    starts, dims, kept = [], [], []
    for axis, n in enumerate(shape):
        i = index[axis] if axis < len(index) else slice(None)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise IndexError(f"{key}: a StoredTensor reads contiguous blocks, not a slice of step {step}; "
                                 f"read it whole with np.asarray")
            starts.append(start)
            dims.append(max(0, stop - start))
            kept.append(dims[-1])
        elif isinstance(i, (int, np.integer)) and not isinstance(i, bool) and -n <= i < n:
            starts.append(int(i) % n)
            dims.append(1)
        else:
            raise IndexError(f"{key}: index {i!r} on axis {axis} (of length {n}): expected a slice or an integer "
                             f"in range")
    cut = len(shape) - 1   # after the last axis not taken whole, every axis must be taken whole ...
    while cut >= 0 and dims[cut] == shape[cut]:
        cut -= 1
    if cut > 0 and math.prod(dims) and any(d != 1 for d in dims[:cut]):   # ... and before it, one index each
        raise IndexError(f"{key}: {index} is not one contiguous block of {list(shape)}; index with "
                         f"metrics.blocks, or read it whole with np.asarray")
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    first = sum(s * t for s, t in zip(starts, strides)) if math.prod(dims) else 0
    return first, dims, kept


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


def new_manifest(*, producer, dtype, input_ids, attention_mask=None, prompt=None, chat=False, versions=None,
                 model=None, options=None):
    """The manifest of a dump, with no forward pass listed yet (see new_dump for the arguments)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": producer,
        "versions": versions or {},
        "model": model or {},
        "dtype": np.dtype(dtype).name,
        "prompt": prompt,
        "chat": bool(chat),
        "input_ids": np.asarray(input_ids).astype(np.int64).tolist(),
        "attention_mask": None if attention_mask is None else np.asarray(attention_mask).astype(np.int64).tolist(),
        "options": options or {},
        "passes": [],
    }


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
    ...     writer.finish({"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float32",
    ...                    "input_ids": [[1, 2, 3]], "passes": [{"start": 0, "length": 3, "tensors": [
    ...                        {"name": "logits", "key": "logits", "shape": [1, 3, 5], "dtype": "float32"}]}]})
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


def manifest_text(manifest):
    """manifest.json's text: indented JSON, with one line per tensor entry so that it stays readable."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "passes"}, indent=1, ensure_ascii=False)
    passes = ",\n".join(   # every field of a pass ("start", "length", "positions" if any), then its tensors
        "  {" + json.dumps({k: v for k, v in p.items() if k != "tensors"}, ensure_ascii=False)[1:-1]
        + ', "tensors": [\n   ' + ",\n   ".join(json.dumps(t, ensure_ascii=False) for t in p["tensors"]) + "\n  ]}"
        for p in manifest["passes"])
    return head[:-2] + ',\n "passes": [\n' + passes + "\n ]\n}\n"


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
        file = _TensorFile(header.path)
        tensors, stored = {}, {}
        for e in header.entries:
            dtype = SAFETENSORS_DTYPES[e.dtype]
            stored[e.name] = StoredTensor(file, e.name, e.start, dtype, e.shape)
        for dtype in {s.dtype.name for s in stored.values()}:   # mapped as stored: nothing is read here
            loaded = load_safetensors(folder / TENSORS, dtype=dtype, header=header)
            tensors.update({k: a for k, a in loaded.items() if stored[k].dtype.name == dtype})
    except (CheckpointError, OSError) as e:
        raise DumpError(f"{folder / TENSORS}: cannot read the tensors of the dump: {e}") from e
    dump = Dump(manifest, tensors, folder)
    check_dump(dump, str(folder))
    dump._stored = {k: (tensors[k], stored[k]) for k in tensors}
    return dump


def check_manifest(manifest, where):
    """Raise DumpError, naming the field, unless `manifest` has the structure docs/dump-format.md specifies."""

    def fail(field, expected, found):
        raise DumpError(f"{where}: {field}: expected {expected}, found {_SHORT.repr(found)}"[:600])

    if not isinstance(manifest, dict):
        fail("the manifest", "a JSON object", type(manifest).__name__)
    if manifest.get("format") != FORMAT:
        fail("format", repr(FORMAT), manifest.get("format"))
    if manifest.get("format_version") != FORMAT_VERSION:
        fail("format_version", f"{FORMAT_VERSION} (this qwen2np reads version {FORMAT_VERSION})",
             manifest.get("format_version"))
    if manifest.get("dtype") not in DTYPES:
        fail("dtype", f"one of {', '.join(map(repr, DTYPES))}", manifest.get("dtype"))
    ids = manifest.get("input_ids")
    if (not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids)
            or len({len(r) for r in ids}) != 1
            or not all(isinstance(i, int) and not isinstance(i, bool) for r in ids for i in r)):
        fail("input_ids", "a non-empty list of equally long, non-empty lists of integers [B][N]", ids)
    for r, row in enumerate(ids):
        for c, i in enumerate(row):
            if not 0 <= i < 2**63:
                fail(f"input_ids[{r}][{c}]", "a token id, 0 <= id < 2**63", i)
    B, N = len(ids), len(ids[0])
    mask = manifest.get("attention_mask")
    if mask is not None and (not isinstance(mask, list) or len(mask) != B
                             or any(not isinstance(r, list) or len(r) != N or any(v not in (0, 1) for v in r)
                                    for r in mask)):
        fail("attention_mask", f"null or [B][N] = [{B}][{N}] zeros and ones, like input_ids", mask)
    passes = manifest.get("passes")
    if not isinstance(passes, list) or not passes:
        fail("passes", "a non-empty list", passes)
    position = 0
    for i, p in enumerate(passes):
        if not isinstance(p, dict) or p.get("start") != position or not _is_int(p.get("length")) or p["length"] < 1:
            fail(f"passes[{i}]", f"an object with start = {position} (where the previous pass ended) and "
                                 f"length >= 1", p if not isinstance(p, dict) else {k: p.get(k) for k in ("start", "length")})
        kept = p.get("positions")
        if kept is not None and (not isinstance(kept, list) or not kept or not all(map(_is_int, kept))
                                 or kept != sorted(set(kept)) or kept[0] < position or kept[-1] >= position + p["length"]):
            fail(f"passes[{i}].positions", f"null, or the input positions the pass kept, increasing, each in "
                                           f"[{position}, {position + p['length']})", kept)
        position += p["length"]
        tensors = p.get("tensors")
        if not isinstance(tensors, list):
            fail(f"passes[{i}].tensors", "a list", tensors)
        seen = set()
        for j, t in enumerate(tensors):
            ok = (isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("key") == tensor_key(t["name"], i)
                  and isinstance(t.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in t["shape"])
                  and isinstance(t.get("dtype"), str))
            if not ok:
                fail(f"passes[{i}].tensors[{j}]", f'{{"name", "key" (the name, or name@{i} after the first pass), '
                                                  f'"shape", "dtype"}}', t)
            if t["name"] in seen:
                fail(f"passes[{i}].tensors[{j}].name", "a name not listed before in this pass", t["name"])
            seen.add(t["name"])
    if position != N:
        fail("passes", f"forward passes covering the {N} positions of input_ids", f"passes covering {position}")
    model = manifest.get("model")   # what compare and isolate read of it
    if model is not None and not isinstance(model, dict):
        fail("model", "an object ({} for none)", model)
    model = model or {}
    for field in ("path", "file_type"):
        if model.get(field) is not None and not isinstance(model[field], str):
            fail(f"model.{field}", "a string or null", model[field])
    config = model.get("config")
    if config is not None and not isinstance(config, dict):
        fail("model.config", "an object (docs/dump-format.md lists its fields)", config)
    layers = (config or {}).get("num_hidden_layers")
    if layers is not None and (not _is_int(layers) or layers < 1):
        fail("model.config.num_hidden_layers", "a positive integer", layers)
    fp = model.get("weights_fingerprint")
    if fp is not None and (not isinstance(fp, dict) or not isinstance(fp.get("tensors") or {}, dict)
                           or not all(isinstance(fp.get(k, ""), str) for k in ("method", "digest"))
                           or not all(isinstance(v, str) for v in (fp.get("tensors") or {}).values())):
        fail("model.weights_fingerprint", '{"method", "digest", "tensors": {weight name: sha256 hex}}, or null', fp)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_dump(dump, where):
    """The manifest is well formed and lists exactly the tensors there are, with their shapes and dtypes."""
    check_manifest(dump.manifest, where)
    listed = set()
    for _, t in dump.entries():
        listed.add(t["key"])
        if t["key"] not in dump.tensors:
            raise DumpError(f"{where}: {t['key']}: listed in {MANIFEST} but not in {TENSORS}")
        array = dump.tensors[t["key"]]
        if list(array.shape) != t["shape"] or array.dtype.name != t["dtype"]:
            raise DumpError(f"{where}: {t['key']}: {MANIFEST} says {t['shape']} {t['dtype']}, "
                            f"{TENSORS} holds {list(array.shape)} {array.dtype.name}")
    extra = sorted(set(dump.tensors) - listed)
    if extra:
        raise DumpError(f"{where}: {TENSORS} holds {len(extra)} tensor{'s' * (len(extra) != 1)} {MANIFEST} does "
                        f"not list, e.g. {extra[0]}")


_SHORT = reprlib.Repr()   # what a refused field held, shortened: never the repr of a huge or deep value
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 8, 8, 80, 80
_SHORT.maxlong = 40
