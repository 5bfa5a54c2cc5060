#!/usr/bin/env python
"""Write a qwen2np dump (docs/dump-format.md) from any Python port of Qwen2: plain Python and NumPy.

This file does not import qwen2np: copy it next to your port (mlx, JAX, PyTorch, …) and call it with
(name, array) for each intermediate of each forward pass; `qwen2np compare mine/ golden/ --isolate`
then reads the folder. It was written from docs/dump-format.md and docs/intermediates.md alone, and
tests/golden/test_qwen2_dump_writer.py holds it to what qwen2np itself writes.

    from qwen2_dump_writer import DumpWriter

    with DumpWriter("mine/", producer="myport 0.1", dtype="float32", input_ids=[[...]],
                    config=json.load(open("checkpoint/config.json")), weights=my_weights) as dump:
        dump.new_pass(0, 40)                         # the prefill: positions 0 … 39
        dump("model.embed_tokens", h)                # [B, T, D], in any order within the pass
        dump("model.layers.0.self_attn.q_rope", q)   # [B, H, T, HD]: docs/intermediates.md's layouts
        ...
        dump.new_pass(40, 1)                         # a decode step through the KV cache
        ...
    # leaving the block writes the folder whole; an exception inside it writes nothing

* Each tensor is stored in the dump's `dtype` ("float32", "float64", "bfloat16", "float16"): the values
  must be exactly representable in it (a bfloat16 port hands bfloat16 values, in any array type NumPy
  reads, or as float32 holding bfloat16 values); anything else is refused, since it would misreport what
  the port computed.
* Names and shapes are checked as they come: a name of docs/intermediates.md (or `mlp.act_up`), once per
  pass, with the rank and the batch and position axes of its layout, so that a token-first
  [B, T, H, HD] `q_rope` is refused at the call that records it rather than compared as garbage.
* The manifest lists each pass's tensors in forward order, whatever order the port recorded them in.
* `config` is the checkpoint's config.json (a dict): the manifest keeps the fields that change the
  forward pass and their sha256 (`config_fingerprint`). `weights`, the port's weights as it computes
  with them ({checkpoint name: array}, rounded to bfloat16 by a bfloat16 port; any mapping, read one
  weight at a time), gives the `weights_fingerprint` that `--isolate` checks; `lm_head.weight` is
  listed as the embedding when the config ties them and the port has none. (Or `fingerprint`: a
  `weights_fingerprint(weights)` computed once for many dumps of the same weights.)
* The tensors' bytes go to a temporary folder as they are recorded (the port can let go of them); the
  folder then replaces `folder` in one rename. A `folder` that holds files is refused unless
  `overwrite=True`.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

FORMAT, FORMAT_VERSION = "qwen2np-dump", 1
# dump dtype -> (safetensors type, bytes per value)
STORED = {"float32": ("F32", 4), "float64": ("F64", 8), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}

# docs/intermediates.md, one decoder layer, in forward order (`mlp.act_up` is a fused SwiGLU's product,
# docs/dump-format.md "A name a port may add", placed after `mlp.act`)
LAYER_NAMES = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_rope",
    "self_attn.k_rope", "self_attn.scores", "self_attn.mask", "self_attn.probs", "self_attn.context",
    "self_attn.head_out", "self_attn.o_proj", "resid_mid", "post_attention_layernorm", "mlp.gate_proj",
    "mlp.up_proj", "mlp.act", "mlp.act_up", "mlp.down_proj",
)
HEAD_MAJOR = {"q_rope", "k_rope", "head_out", "scores", "mask", "probs"}   # [B, heads, T, …]

# the config fields that change the forward pass (docs/dump-format.md, `config`), and those held as floats
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
                 "max_position_embeddings", "layer_types", "sliding_window", "tie_word_embeddings")
FLOAT_FIELDS = {"rms_norm_eps", "rope_theta", "factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "low_freq_factor", "high_freq_factor"}


def forward_order(num_layers):
    """Every name a Qwen2ForCausalLM dump may hold, in forward order.

    >>> names = forward_order(2)
    >>> names[:4], names[-2:], len(names)
    (['model.embed_tokens', 'model.rotary_emb.cos', 'model.rotary_emb.sin', 'model.layers.0.input_layernorm'], ['model.norm', 'logits'], 45)
    """
    names = ["model.embed_tokens", "model.rotary_emb.cos", "model.rotary_emb.sin"]
    for layer in range(num_layers):
        names += [f"model.layers.{layer}.{n}" for n in LAYER_NAMES] + [f"model.layers.{layer}"]
    return names + ["model.norm", "logits"]


# -- the model's description: config and weights fingerprints ------------------------------------------


def _canonical(key, value):
    if isinstance(value, dict):
        return {k: _canonical(k, v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(key, v) for v in value]
    if key in FLOAT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def architecture(config):
    """The manifest's `config`: the fields of a config.json dict that change the forward pass.

    transformers 5 writes RoPE as `rope_parameters`; an older config.json's `rope_theta` (and
    `rope_scaling`) are read into it. `layer_types` defaults to every layer "full_attention" when the
    config has no sliding window in use, as transformers fills it.

    >>> arch = architecture({"hidden_size": 896, "num_attention_heads": 14, "num_hidden_layers": 2,
    ...                      "rope_theta": 1000000, "rms_norm_eps": 1e-06, "sliding_window": 32768})
    >>> arch["head_dim"], arch["rope_parameters"], arch["layer_types"], arch["sliding_window"]
    (64, {'rope_theta': 1000000.0, 'rope_type': 'default'}, ['full_attention', 'full_attention'], None)
    """
    config = dict(config)
    if config.get("rope_parameters") is None:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
        config["rope_parameters"] = rope
    if config.get("layer_types") is None and config.get("num_hidden_layers"):
        sliding = config.get("use_sliding_window") and config.get("sliding_window") is not None
        window_from = config.get("max_window_layers", config["num_hidden_layers"]) if sliding else None
        config["layer_types"] = ["sliding_attention" if window_from is not None and i >= window_from
                                 else "full_attention" for i in range(config["num_hidden_layers"])]
    arch = {f: _canonical(f, config.get(f)) for f in CONFIG_FIELDS}
    if arch["head_dim"] is None and arch["hidden_size"] and arch["num_attention_heads"]:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    if "sliding_attention" not in (arch["layer_types"] or []):
        arch["sliding_window"] = None
    return arch


def config_fingerprint(arch):
    """sha256 (hex) of the canonical JSON of `architecture(config)`."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def weight_digest(array):
    """sha256 (hex) of a weight's values as little-endian float32, C order (method "sha256-f32")."""
    flat = np.asarray(array).reshape(-1)
    h = hashlib.sha256()
    for i in range(0, flat.size, 1 << 24):       # bounded float32 copies of a large weight
        h.update(np.ascontiguousarray(flat[i:i + (1 << 24)], dtype="<f4").data)
    return h.hexdigest()


def weights_fingerprint(weights, tied=False):
    """{"method", "digest", "tensors"} of {name: array} (docs/dump-format.md, method "sha256-f32").

    `weights` may be any mapping; each weight is read once, so a mapping that converts on access (from a
    framework's arrays) holds one copy at a time. `tied`: an absent `lm_head.weight` is the embedding's.

    >>> fp = weights_fingerprint({"b": np.ones(3, np.float32), "a": np.zeros((2, 2))})
    >>> fp["method"], fp["digest"][:12]
    ('sha256-f32', '94a6e41d675a')
    """
    digests, shapes = {}, {}
    for name in sorted(weights):
        array = weights[name]
        digests[name], shapes[name] = weight_digest(array), np.shape(array)
    if tied and "lm_head.weight" not in digests and "model.embed_tokens.weight" in digests:
        # the model's state_dict lists the tied head under its own name (docs/dump-format.md)
        digests["lm_head.weight"], shapes["lm_head.weight"] = digests["model.embed_tokens.weight"], \
            shapes["model.embed_tokens.weight"]
    lines = "".join(f"{n} {'x'.join(map(str, shapes[n]))} {digests[n]}\n" for n in sorted(digests))
    return {"method": "sha256-f32", "digest": hashlib.sha256(lines.encode("utf-8")).hexdigest(), "tensors": digests}


# -- values in the dump's dtype -----------------------------------------------------------------------


def stored_bytes(name, array, dtype):
    """The little-endian bytes of `array` in dump dtype `dtype`; ValueError unless the values are exactly
    that dtype's values (a bfloat16 value is the upper 16 bits of its float32)."""
    a = np.asarray(array)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name}: expected floating-point values, found dtype {a.dtype.name}")
    if dtype == "bfloat16":
        if a.dtype.name == "bfloat16":           # ml_dtypes (or anything NumPy sees by that name): its own bits
            return np.ascontiguousarray(a).view("<u2").tobytes()
        f32 = np.ascontiguousarray(a, dtype="<f4")
        bits = f32.view("<u4")
        if np.any(bits & 0xFFFF) or not np.array_equal(f32, a, equal_nan=True):
            raise ValueError(f"{name}: values are not bfloat16 values (dtype {a.dtype.name}): the dump's dtype is "
                             f"bfloat16, so store the port's bfloat16 result, not a wider one")
        return (bits >> 16).astype("<u2").tobytes()
    target = np.dtype({"float32": "<f4", "float64": "<f8", "float16": "<f2"}[dtype])
    out = np.ascontiguousarray(a, dtype=target)
    same = np.asarray(out, np.float64) == np.asarray(a, np.float64)
    if not np.all(same | (np.isnan(out) & np.isnan(np.asarray(a, np.float64)))):
        raise ValueError(f"{name}: values are not exactly {dtype} values (dtype {a.dtype.name}): store what the "
                         f"port computed, in the dump's dtype")
    return out.tobytes()


# -- the writer -----------------------------------------------------------------------------------------


class DumpWriter:
    """Records (name, array) per forward pass and writes the dump folder whole when its block ends."""

    def __init__(self, folder, *, producer, dtype, input_ids, config, weights=None, fingerprint=None, attention_mask=None,
                 prompt=None, chat=False, versions=None, model_path=None, model_class="Qwen2ForCausalLM",
                 options=None, overwrite=False):
        if dtype not in STORED:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(STORED)}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.overwrite = overwrite
        self.input_ids = np.asarray(input_ids, dtype=np.int64).tolist()
        if np.ndim(self.input_ids) != 2:
            raise ValueError(f"input_ids: expected [B][N] token ids, found shape {np.shape(self.input_ids)}")
        self.batch, self.positions = np.shape(self.input_ids)
        arch = architecture(config)
        self.order = {n: i for i, n in enumerate(forward_order(arch["num_hidden_layers"]))}
        model = {"path": None if model_path is None else str(model_path), "class": model_class, "config": arch,
                 "config_fingerprint": config_fingerprint(arch), "weights_fingerprint": None}
        if weights is not None:
            fingerprint = weights_fingerprint(weights, tied=bool(arch["tie_word_embeddings"]))
        model["weights_fingerprint"] = fingerprint    # or one computed before, for many dumps of one model
        self.manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "producer": producer, "versions": versions or {},
            "model": model, "dtype": dtype, "prompt": prompt, "chat": bool(chat), "input_ids": self.input_ids,
            "attention_mask": None if attention_mask is None else np.asarray(attention_mask, np.int64).tolist(),
            "options": options or {}, "passes": [],
        }
        self.entries = {}      # key -> (shape, begin, end) in the data file
        self.tmp = self.data = None

    # -- the block: a temporary folder, renamed into place at the end ---------------------------------

    def __enter__(self):
        if self.folder.is_file():
            raise FileExistsError(f"{self.folder}: a file is there; a dump is a folder")
        if self.folder.is_dir() and any(self.folder.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{self.folder}: the folder holds files; pass overwrite=True to replace it")
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.data = open(self.tmp / "tensors.data", "wb")
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is None:
                self._finish()
        finally:
            if not self.data.closed:
                self.data.close()
            shutil.rmtree(self.tmp, ignore_errors=True)   # gone after the rename; the leftovers of a failure
        return False

    # -- recording --------------------------------------------------------------------------------------

    def new_pass(self, start, length):
        """Start forward pass k: the positions start … start+length-1 of input_ids, fed in one call."""
        passes = self.manifest["passes"]
        expected = passes[-1]["start"] + passes[-1]["length"] if passes else 0
        if start != expected or length < 1 or start + length > self.positions:
            raise ValueError(f"pass {len(passes)}: expected start {expected} and 1 <= length <= "
                             f"{self.positions - expected}, found start {start}, length {length}")
        passes.append({"start": int(start), "length": int(length), "tensors": []})

    def __call__(self, name, array):
        """Record intermediate `name` of the current pass (its layout as docs/intermediates.md gives it)."""
        if self.data is None:
            raise RuntimeError("record inside the writer's `with` block")
        if not self.manifest["passes"]:
            raise ValueError(f"{name}: call new_pass(start, length) before recording")
        if name not in self.order:
            raise ValueError(f"{name!r} is not an intermediate of docs/intermediates.md (names look like "
                             f"'model.layers.3.self_attn.q_rope', 'logits')")
        index = len(self.manifest["passes"]) - 1
        key = name if index == 0 else f"{name}@{index}"
        if key in self.entries:
            raise ValueError(f"{key}: recorded twice in pass {index}")
        shape = [int(d) for d in np.shape(array)]
        self._check_layout(name, shape)
        raw = stored_bytes(name, array, self.dtype)
        begin = self.data.tell()
        self.data.write(raw)
        self.entries[key] = (shape, begin, self.data.tell())
        self.manifest["passes"][-1]["tensors"].append({"name": name, "key": key, "shape": shape, "dtype": self.dtype})

    def _check_layout(self, name, shape):
        """Rank, batch and position axes of `name` as docs/intermediates.md lays it out."""
        length = self.manifest["passes"][-1]["length"]
        last = name.rsplit(".", 1)[-1]
        if name in ("model.rotary_emb.cos", "model.rotary_emb.sin"):
            rank, t_axis, batch_ok = 3, 1, shape[:1] in ([1], [self.batch])
        elif last in HEAD_MAJOR:
            rank, t_axis, batch_ok = 4, 2, shape[:1] == [self.batch]
        else:
            rank, t_axis, batch_ok = 3, 1, shape[:1] == [self.batch]
        layout = "[B, heads, T, …]" if last in HEAD_MAJOR else "[B, T, …]"
        if len(shape) != rank or not batch_ok or shape[t_axis] != length:
            raise ValueError(f"{name}: expected {layout} with B={self.batch}, T={length} (docs/intermediates.md), "
                             f"found shape {shape}")

    # -- the files --------------------------------------------------------------------------------------

    def _finish(self):
        passes = self.manifest["passes"]
        covered = passes[-1]["start"] + passes[-1]["length"] if passes else 0
        if covered != self.positions:
            raise ValueError(f"the passes cover {covered} of the {self.positions} positions of input_ids")
        for p in passes:   # forward order, whatever order the port recorded in
            p["tensors"].sort(key=lambda t: self.order[t["name"]])
        self.data.close()
        type_name = STORED[self.dtype][0]
        header = {k: {"dtype": type_name, "shape": shape, "data_offsets": [begin, end]}
                  for k, (shape, begin, end) in self.entries.items()}
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)        # the data starts 8-byte aligned
        with open(self.tmp / "tensors.safetensors", "wb") as out, open(self.tmp / "tensors.data", "rb") as data:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(data, out, 1 << 24)
        os.remove(self.tmp / "tensors.data")
        (self.tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=1), encoding="utf-8")
        if self.folder.exists():   # checked empty or overwrite=True in __enter__: swap, then drop the old
            old = self.folder.with_name(f".{self.folder.name}.old-{os.getpid()}")
            os.rename(self.folder, old)
            os.rename(self.tmp, self.folder)
            shutil.rmtree(old)
        else:
            os.rename(self.tmp, self.folder)
