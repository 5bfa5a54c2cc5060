"""Fingerprints of a model's configuration and weights, so that a dump says which model made it.

Both are sha256 digests that any language can recompute (docs/dump-format.md gives the recipes):

* config fingerprint: sha256 of the canonical JSON (sorted keys, no spaces) of the fields that change
  the forward pass, `architecture(config)`. Other fields (token ids, `architectures`, dtype) are left out,
  so a GGUF file, the folder converted from it and transformers' own config agree.
* weights fingerprint, method "sha256-f32": each weight is hashed as its values in float32, little-endian,
  C order; the fingerprint hashes the lines `"{name} {shape} {digest}\\n"` in name order (shape like
  `896x4864`). float64 weights are cast to float32 first: exact for weights that came from float32,
  bfloat16, float16 or GGUF files, so a float32 and a float64 load of one checkpoint agree.
  "sha256-f32-sampled" hashes only 16 blocks of 1024 values per weight, evenly spaced (cheap, but blind
  to a change between the blocks).

>>> import numpy as np
>>> weights = {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float64)}
>>> fp = weights_fingerprint(weights)
>>> fp["method"], fp["digest"][:12], sorted(fp["tensors"])
('sha256-f32', '94a6e41d675a', ['a', 'b'])
>>> weights_fingerprint({"a": np.zeros((2, 2), np.float32), "b": np.ones(3)})["digest"] == fp["digest"]
True
"""

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..weights.backend import to_numpy

METHODS = ("sha256-f32", "sha256-f32-sampled")
_CHUNK = 1 << 24          # values hashed per step: bounds the float32 copy of a float64 weight (64 MB)
_BLOCKS, _BLOCK = 16, 1024  # the sampled method: 16 blocks of 1024 values per weight

# fields of the config that change what the forward pass computes; floats that a config may write as ints
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
           "max_position_embeddings", "layer_types", "sliding_window", "tie_word_embeddings")
_FLOATS = {"rms_norm_eps", "rope_theta", "factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
           "mscale_all_dim", "low_freq_factor", "high_freq_factor"}


def architecture(config):
    """The canonical architecture fields of a config (a dict, or an object with the fields).

    `head_dim` is filled in as hidden_size // num_attention_heads when absent; `sliding_window` is kept
    only when some layer slides (otherwise it changes nothing).

    >>> arch = architecture({"hidden_size": 8, "num_attention_heads": 2, "rms_norm_eps": 1e-06,
    ...                      "layer_types": ["full_attention"], "sliding_window": 4096})
    >>> arch["head_dim"], arch["sliding_window"], arch["vocab_size"]
    (4, None, None)
    """
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    arch = {}
    for field in _FIELDS:
        arch[field] = _canonical(field, get(field))
    if arch["head_dim"] is None and arch["hidden_size"] and arch["num_attention_heads"]:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    if "sliding_attention" not in (arch["layer_types"] or []):
        arch["sliding_window"] = None
    return arch


def _canonical(key, value):
    if isinstance(value, dict):
        return {k: _canonical(k, v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(key, v) for v in value]
    if key in _FLOATS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def config_fingerprint(config):
    """sha256 (hex) of `architecture(config)` as canonical JSON.

    >>> config_fingerprint({"hidden_size": 8, "rms_norm_eps": 1e-6}) == config_fingerprint(
    ...     {"hidden_size": 8, "rms_norm_eps": 1e-6, "bos_token_id": 3})
    True
    """
    text = json.dumps(architecture(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weight_digest(array, method="sha256-f32"):
    """sha256 (hex) of one weight's values as little-endian float32, in C order (or of its sampled blocks)."""
    flat = to_numpy(array).reshape(-1)
    if method == "sha256-f32-sampled" and flat.size > _BLOCKS * _BLOCK:
        starts = [(i * (flat.size - _BLOCK)) // (_BLOCKS - 1) for i in range(_BLOCKS)]
        pieces = [flat[s:s + _BLOCK] for s in starts]
    elif method in METHODS:
        pieces = [flat[i:i + _CHUNK] for i in range(0, flat.size, _CHUNK)]
    else:
        raise ValueError(f"fingerprint method {method!r}: expected one of {', '.join(METHODS)}")
    h = hashlib.sha256()
    for piece in pieces:
        h.update(np.ascontiguousarray(piece, dtype="<f4").data)
    return h.hexdigest()


def weights_fingerprint(weights, method="sha256-f32", threads=2):
    """{"method", "digest", "tensors": {name: digest}} of the weights `{name: array}`.

    The weights are hashed on `threads` threads (hashlib and NumPy's casts release the GIL).
    """
    names = sorted(weights)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = dict(zip(names, pool.map(lambda n: weight_digest(weights[n], method), names)))
    lines = "".join(f"{n} {'x'.join(map(str, weights[n].shape))} {digests[n]}\n" for n in names)
    return {"method": method, "digest": hashlib.sha256(lines.encode("utf-8")).hexdigest(), "tensors": digests}


def differing_weights(a, b):
    """Names whose digests differ between two weights fingerprints of the same method (or that only one has)."""
    ta, tb = a.get("tensors") or {}, b.get("tensors") or {}
    return sorted(n for n in set(ta) | set(tb) if ta.get(n) != tb.get(n))
