"""A dump's manifest.json: what was run, and every tensor's name, key, shape and dtype, per forward pass
(docs/dump-format.md). Built by new_manifest, written by manifest_text, and checked field by field by
check_manifest (the manifest alone) and check_dump (the manifest against the tensors it lists).

>>> manifest = new_manifest(producer="example", dtype="float32", input_ids=[[1, 2, 3]])
>>> manifest["passes"].append({"start": 0, "length": 3, "tensors": [
...     {"name": "logits", "key": "logits", "shape": [1, 3, 5], "dtype": "float32"}]})
>>> check_manifest(manifest, "example")
>>> manifest["input_ids"] = [[1, -2, 3]]
>>> check_manifest(manifest, "example")
Traceback (most recent call last):
 ...
qwen2np.errors.DumpError: example: input_ids[0][1]: expected a token id, 0 <= id < 2**63, found -2
"""

import json
import reprlib

import numpy as np

from ..errors import DumpError

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


def manifest_text(manifest):
    """manifest.json's text: indented JSON, with one line per tensor entry so that it stays readable."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "passes"}, indent=1, ensure_ascii=False)
    passes = ",\n".join(   # every field of a pass ("start", "length", "positions" if any), then its tensors
        "  {" + json.dumps({k: v for k, v in p.items() if k != "tensors"}, ensure_ascii=False)[1:-1]
        + ', "tensors": [\n   ' + ",\n   ".join(json.dumps(t, ensure_ascii=False) for t in p["tensors"]) + "\n  ]}"
        for p in manifest["passes"])
    return head[:-2] + ',\n "passes": [\n' + passes + "\n ]\n}\n"


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
