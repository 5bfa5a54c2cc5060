#!/usr/bin/env python
"""mlx-lm's Qwen2 (mlx-lm 0.32.2, mlx 0.32.4, on the CPU) dumped from its own forward pass.

    python scripts/dump_mlx_lm.py --model HF_FOLDER --ids "[[...]]" --out DIR [--decode-steps N]
        [--dtype float32|bfloat16] [--attention fused|eager] [--include GLOB ...] [--overwrite]

A porter's dump adapter, written as one would for a framework qwen2np knows nothing of: mlx has no
forward hooks, so each module whose input or output is an intermediate is replaced in the loaded model
by a `Tap`, a module that calls the original and hands its input or output to the dump writer
(scripts/qwen2_dump_writer.py, no qwen2np import). mlx-lm's own `__call__`s run unchanged:

    module (mlx-lm)                         recorded as
    model.embed_tokens        output        model.embed_tokens                      [B, T, D]
    layers[l].input_layernorm output        model.layers.l.input_layernorm
    self_attn.{q,k,v}_proj    output        …self_attn.{q,k,v}_proj                 [B, T, H·HD], [B, T, KV·HD]
    self_attn.rope            output        1st call …q_rope, 2nd …k_rope           [B, H, T, HD], [B, KV, T, HD]
    self_attn.o_proj          input, output …self_attn.context, …self_attn.o_proj
    post_attention_layernorm  input, output model.layers.l.resid_mid, …post_attention_layernorm
    mlp.{gate,up}_proj        output        …mlp.gate_proj, …mlp.up_proj
    mlp.down_proj             input, output …mlp.act_up (swiglu(gate, up), fused: no act), …mlp.down_proj
    layers[l]                 output        model.layers.l
    model.norm, lm_head       output        model.norm, logits

Attention: mlx-lm calls `mx.fast.scaled_dot_product_attention`, fused, so scores and probabilities never
exist. `--attention fused` (the default) dumps what exists (the context is the SDPA's output, heads
merged by mlx-lm's own transpose and reshape). `--attention eager` replaces the module-level
`scaled_dot_product_attention` of mlx_lm.models.qwen2 with the same attention written out in mlx ops
(keys and values repeated per query group, q kᵀ · scale, the additive mask, a float32-precise softmax,
probs · v), recording `scores`, `mask` and `probs` as well, so that `--isolate` can check each step.

KV cache: mlx-lm's KVCache keeps keys *after* RoPE, in buffers preallocated 256 positions at a time and
sliced to the filled length on each call; the adapter records the rope output of the new positions
(`k_rope`), never the buffer, so the padding of the preallocation never reaches the dump.

bfloat16: the float32 checkpoint is loaded and cast by `model.set_dtype(mx.bfloat16)`, which is what
`mlx_lm.convert --dtype bfloat16` stores; tensors are recorded as bfloat16 values, and the weights
fingerprint is of the bfloat16 weights.

subtle: mlx-lm 0.32.2's qwen2 reads RoPE's θ from a top-level `rope_theta` only, and its default is
1e6; transformers 5 writes `rope_parameters.rope_theta` instead, so a config.json saved by transformers 5
would silently run at θ = 1e6. `load` passes the config's θ explicitly (docs/porting.md).
"""

import argparse
from collections.abc import Mapping
import fnmatch
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2 as mlx_qwen2
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_dump_writer import DumpWriter, forward_order, weights_fingerprint  # noqa: E402, F401 (the tests use it)

import mlx_lm  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def load(folder, dtype="float32"):
    """mlx-lm's Model from a Hugging Face folder, in `dtype`, and its config.json as a dict."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    # subtle: mlx-lm's qwen2 ignores rope_parameters (transformers 5's spelling): pass θ as it reads it
    model, _ = load_model(folder, model_config={} if theta is None else {"rope_theta": theta})
    if dtype != "float32":
        model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return model, config


def to_numpy(x):
    """An mlx array as NumPy: float32 values (exact for bfloat16, which NumPy has no type for)."""
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


class PortWeights(Mapping):
    """{checkpoint name: float32 values} of the weights mlx-lm computes with, converted one at a time as
    the writer hashes them (a whole NumPy copy of the model would double its memory)."""

    def __init__(self, model):
        self.arrays = dict(tree_flatten(model.parameters()))   # taken before any Tap renames a module

    def __getitem__(self, name):
        return to_numpy(self.arrays[name])

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)


def port_weights(model):
    return PortWeights(model)


class Tap(nn.Module):
    """`inner` with its input and/or output handed to `record(name, array)`: mlx's stand-in for hooks."""

    def __init__(self, inner, record, output=None, input=None, enter=None):
        super().__init__()
        self.inner = inner
        self._record, self._output, self._input, self._enter = record, output, input, enter

    def __call__(self, x, *args, **kwargs):
        if self._enter is not None:
            self._enter()
        if self._input is not None:
            self._record(self._input, x)
        y = self.inner(x, *args, **kwargs)
        if self._output is not None:
            self._record(self._output, y)
        return y

    def as_linear(self, x):   # a tied embedding used as the output head
        return self.inner.as_linear(x)


class RopeTap(Tap):
    """mlx-lm's Attention calls its rope twice: queries first, then keys."""

    def __init__(self, inner, record, scope):
        super().__init__(inner, record)
        self._names, self._calls = (f"{scope}.q_rope", f"{scope}.k_rope"), 0

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        self._record(self._names[self._calls % 2], y)
        self._calls += 1
        return y


class Recorder:
    """Taps on a loaded mlx-lm Qwen2 model, recording the wanted names into the current writer."""

    def __init__(self, model, patterns=("*",)):
        self.model, self.patterns = model, list(patterns)
        self.writer = None
        self.scope = None          # the `…self_attn` running (for the eager attention)
        known = forward_order(len(model.model.layers))
        for p in self.patterns:
            if not fnmatch.filter(known, p):
                raise ValueError(f"--include {p!r} matches no intermediate; names look like {known[3]!r}")

    def wanted(self, name):
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name, x):
        if self.writer is not None and self.wanted(name):
            self.writer(name, to_numpy(x))

    def install(self):
        """Put the taps in; returns a function that takes them out again."""
        undo = []

        def tap(parent, attr, new):
            undo.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, new)

        inner, record = self.model.model, self.record
        tap(inner, "embed_tokens", Tap(inner.embed_tokens, record, output="model.embed_tokens"))
        for l, layer in enumerate(inner.layers):
            s = f"model.layers.{l}"
            attn, mlp = layer.self_attn, layer.mlp
            tap(layer, "input_layernorm", Tap(layer.input_layernorm, record, output=f"{s}.input_layernorm"))
            for p in ("q_proj", "k_proj", "v_proj"):
                tap(attn, p, Tap(getattr(attn, p), record, output=f"{s}.self_attn.{p}"))
            tap(attn, "rope", RopeTap(attn.rope, record, f"{s}.self_attn"))
            tap(attn, "o_proj", Tap(attn.o_proj, record, input=f"{s}.self_attn.context", output=f"{s}.self_attn.o_proj"))
            tap(layer, "self_attn", Tap(attn, record, enter=lambda s=s: setattr(self, "scope", f"{s}.self_attn")))
            tap(layer, "post_attention_layernorm", Tap(layer.post_attention_layernorm, record, input=f"{s}.resid_mid",
                                                       output=f"{s}.post_attention_layernorm"))
            tap(mlp, "gate_proj", Tap(mlp.gate_proj, record, output=f"{s}.mlp.gate_proj"))
            tap(mlp, "up_proj", Tap(mlp.up_proj, record, output=f"{s}.mlp.up_proj"))
            tap(mlp, "down_proj", Tap(mlp.down_proj, record, input=f"{s}.mlp.act_up", output=f"{s}.mlp.down_proj"))
        layers = list(inner.layers)
        inner.layers[:] = [Tap(layer, record, output=f"model.layers.{l}") for l, layer in enumerate(layers)]
        tap(inner, "norm", Tap(inner.norm, record, output="model.norm"))
        if hasattr(self.model, "lm_head"):
            tap(self.model, "lm_head", Tap(self.model.lm_head, record, output="logits"))

        def remove():
            inner.layers[:] = layers
            for parent, attr, original in reversed(undo):
                setattr(parent, attr, original)
        return remove


# -- attention written out: what mx.fast.scaled_dot_product_attention computes, step by step -----------


def allowed_keys(mask, T, S):
    """mlx-lm's mask argument (None, "causal", or an array) as booleans [.., T, S]: True where a query
    may see a key. The T queries are the last T of the S key positions."""
    if mask is None:
        return mx.ones((T, S), dtype=mx.bool_)
    if isinstance(mask, str):   # "causal"
        q = mx.arange(S - T, S)[:, None]
        return q >= mx.arange(S)[None]
    return mask if mask.dtype == mx.bool_ else mask == 0


def eager_attention(recorder, kv_of_head="repeat"):
    """A stand-in for mlx_lm.models.qwen2.scaled_dot_product_attention that records scores, mask, probs.
    `kv_of_head`: "repeat" (query head h reads KV head h // G, as mlx and transformers do) or "tile"
    (h % KV: a classic GQA mistake, to plant), or a function of the layer's scope giving one of them."""

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        B, H, T, HD = queries.shape
        KV, S = keys.shape[1], keys.shape[2]
        mapping = kv_of_head(recorder.scope) if callable(kv_of_head) else kv_of_head
        if mapping == "repeat":
            keys, values = mx.repeat(keys, H // KV, axis=1), mx.repeat(values, H // KV, axis=1)   # -> [B, H, S, HD]
        else:
            keys, values = mx.tile(keys, (1, H // KV, 1, 1)), mx.tile(values, (1, H // KV, 1, 1))
        scores = (queries @ keys.swapaxes(-1, -2)) * mx.array(scale, dtype=queries.dtype)     # [B, H, T, S]
        allowed = mx.broadcast_to(allowed_keys(mask, T, S), (B, 1, T, S))
        additive = mx.where(allowed, mx.array(0, queries.dtype), mx.array(mx.finfo(queries.dtype).min, queries.dtype))
        probs = mx.softmax(scores + additive, axis=-1, precise=True)                              # [B, H, T, S]
        scope = recorder.scope
        recorder.record(f"{scope}.scores", scores)
        recorder.record(f"{scope}.mask", additive)
        recorder.record(f"{scope}.probs", probs)
        return probs @ values                                                                     # [B, H, T, HD]

    return attention


# -- the dump --------------------------------------------------------------------------------------------


def plan_passes(positions, decode_steps):
    prefill = positions - decode_steps
    return [(0, prefill)] + [(t, 1) for t in range(prefill, positions)]


def record_dump(model, config, input_ids, out, *, decode_steps=0, attention="fused", include=("*",),
                weights=None, fingerprint=None, model_path=None, overwrite=False, dtype=None):
    """Run `input_ids` through the tapped `model` (a prefill, then `decode_steps` steps through mlx-lm's
    KV cache) and write the dump to `out`. `weights`: port_weights(model), or `fingerprint`: the writer's
    weights_fingerprint of it, computed once for many dumps.

    `attention`: "fused" (mlx-lm's own), "eager" (written out, recording scores, mask and probs), or a
    function recorder -> a stand-in for mlx_lm.models.qwen2.scaled_dot_product_attention (a planted one)."""
    dtype = dtype or ("bfloat16" if model.model.norm.weight.dtype == mx.bfloat16 else "float32")
    ids = np.asarray(input_ids, dtype=np.int64)
    recorder = Recorder(model, include)
    remove_taps = recorder.install()
    saved = mlx_qwen2.scaled_dot_product_attention
    if callable(attention):
        mlx_qwen2.scaled_dot_product_attention = attention(recorder)
        attention = getattr(attention, "__name__", "custom")
    elif attention == "eager":
        mlx_qwen2.scaled_dot_product_attention = eager_attention(recorder)
    elif attention != "fused":
        raise ValueError(f"attention {attention!r}: expected fused or eager")
    versions = {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__, "numpy": np.__version__}
    try:
        with DumpWriter(out, producer=f"mlx-lm {mlx_lm.__version__} (scripts/dump_mlx_lm.py)", dtype=dtype,
                        input_ids=ids, config=config, weights=weights, fingerprint=fingerprint, versions=versions,
                        model_path=None if model_path is None else str(model_path),
                        options={"attention": attention, "decode_steps": decode_steps, "include": list(include)},
                        overwrite=overwrite) as writer:
            recorder.writer = writer
            cache = make_prompt_cache(model)
            for start, length in plan_passes(ids.shape[1], decode_steps):
                writer.new_pass(start, length)
                logits = model(mx.array(ids[:, start:start + length]), cache=cache)
                if not hasattr(model, "lm_head"):   # tied: the embedding as a linear, no module to tap
                    recorder.record("logits", logits)
                mx.eval(logits)
    finally:
        mlx_qwen2.scaled_dot_product_attention = saved
        remove_taps()
    return Path(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face folder (config.json, *.safetensors)")
    parser.add_argument("--ids", required=True, help="token ids as JSON, [[...]] (one sequence)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--decode-steps", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--attention", choices=["fused", "eager"], default="fused")
    parser.add_argument("--include", nargs="+", default=["*"])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    model, config = load(args.model, args.dtype)
    record_dump(model, config, json.loads(args.ids), args.out, decode_steps=args.decode_steps,
                attention=args.attention, include=args.include, weights=port_weights(model),
                model_path=args.model, overwrite=args.overwrite)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
