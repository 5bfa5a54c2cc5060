#!/usr/bin/env python
"""keras-hub's QwenCausalLM (keras-hub 0.32.0, Keras 3.15, JAX on the CPU) dumped from its own forward pass.

    KERAS_BACKEND=jax /work/venvs/keras-hub/bin/python scripts/dump_keras_hub.py --model HF_FOLDER \\
        --ids "[[...]]" --out DIR [--decode-steps N] [--dtype float32|bfloat16] [--plant BUG ...]

Too heavy for the project's venv (TensorFlow comes with it): it runs in its own venv, with NumPy and
scripts/qwen2_dump_writer.py only (no qwen2np). The model is `QwenBackbone.from_preset(HF_FOLDER)`,
which converts the Hugging Face folder itself (keras_hub/src/utils/transformers/convert_qwen.py), with
`dtype="bfloat16"` for the bfloat16 port (weights and compute in bfloat16).

Keras has no forward hooks: the adapter wraps the `call` (or a method) of each layer instance whose input
or output is an intermediate, and keras-hub's own code runs unchanged. keras-hub lays heads out
token-first, so the adapter transposes and merges as docs/intermediates.md wants:

    layer (keras-hub)                              recorded as
    backbone.token_embedding(ids)        output    model.embed_tokens
    token_embedding(x, reverse=True)     output    logits
    decoder._self_attention_layernorm    output    model.layers.l.input_layernorm
    attention._query_dense / _key_dense / _value_dense
                                         output    …q_proj, k_proj, v_proj: [B, T, heads, HD] -> [B, T, heads·HD]
    attention.rotary_embedding_layer     output    1st call q_rope, 2nd k_rope: [B, T, heads, HD] -> [B, heads, T, HD]
    attention._masked_softmax            in, out   …scores, …mask (1 = allowed -> 0 / finfo.min), …probs
                                                   (cast to the compute dtype, as keras-hub then uses them)
    attention._output_dense              in, out   …context [B, T, H, HD] -> [B, T, H·HD], …o_proj
    decoder._feedforward_layernorm       in, out   …resid_mid, …post_attention_layernorm
    decoder._feedforward_gate_dense / _intermediate_dense
                                         output    …mlp.gate_proj, …mlp.up_proj
    decoder.activation                   output    …mlp.act (cast to the compute dtype, as keras-hub does)
    decoder._feedforward_output_dense    in, out   …mlp.act_up (up · act), …mlp.down_proj
    backbone.transformer_layers[l]       output    model.layers.l
    backbone.layer_norm                  output    model.norm

KV cache: `call_with_cache` with a cache **preallocated to the full length** N of the run, [B, layers, 2,
N, KV, HD], filled by `slice_update` at each pass's start: the attention runs over all N cells, the
unfilled ones masked. The adapter keeps the first start + T key positions of `scores`, `mask` and
`probs` (what a correct port attends over; the probabilities of the cut cells are checked to be 0). Keys
are cached after RoPE.

Planted bugs (`--plant`), for the measurements of docs/porting.md: `rope-theta` (θ = 10000 in layer 2),
`eps` (ε outside the square root of layer 0's input norm), `q-bias` (q_proj's bias forgotten in layer 4),
`gqa-tile` (query head h reads KV head h % KV in layer 3).
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_dump_writer import DumpWriter  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
from keras import ops  # noqa: E402


def load(folder, dtype="float32"):
    backbone = keras_hub.models.QwenBackbone.from_preset(str(folder), dtype=dtype)
    model = keras_hub.models.QwenCausalLM(backbone=backbone, preprocessor=None)
    return model, json.loads((Path(folder) / "config.json").read_text())


def to_numpy(x):
    """float32 values (exact for bfloat16)."""
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def port_weights(model):
    """{checkpoint name: float32 values} of the weights keras-hub computes with, in the checkpoint's layout
    (the inverse of convert_qwen.py's transposes and reshapes)."""
    b = model.backbone
    w = {"model.embed_tokens.weight": to_numpy(b.token_embedding.embeddings),
         "model.norm.weight": to_numpy(b.layer_norm.scale)}
    if not b.tie_word_embeddings:
        w["lm_head.weight"] = to_numpy(b.token_embedding.reverse_embeddings).T
    for l, layer in enumerate(b.transformer_layers):
        p, attn = f"model.layers.{l}", layer._self_attention_layer
        w[f"{p}.input_layernorm.weight"] = to_numpy(layer._self_attention_layernorm.scale)
        w[f"{p}.post_attention_layernorm.weight"] = to_numpy(layer._feedforward_layernorm.scale)
        for name, dense in (("q_proj", attn._query_dense), ("k_proj", attn._key_dense), ("v_proj", attn._value_dense)):
            kernel = to_numpy(dense.kernel)                                   # [D, heads, HD]
            w[f"{p}.self_attn.{name}.weight"] = kernel.reshape(kernel.shape[0], -1).T
            w[f"{p}.self_attn.{name}.bias"] = to_numpy(dense.bias).reshape(-1)
        kernel = to_numpy(attn._output_dense.kernel)                          # [H, HD, D]
        w[f"{p}.self_attn.o_proj.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        w[f"{p}.mlp.gate_proj.weight"] = to_numpy(layer._feedforward_gate_dense.kernel).T
        w[f"{p}.mlp.up_proj.weight"] = to_numpy(layer._feedforward_intermediate_dense.kernel).T
        w[f"{p}.mlp.down_proj.weight"] = to_numpy(layer._feedforward_output_dense.kernel).T
    return w


class Recorder:
    def __init__(self, model):
        self.model, self.writer, self.keys = model, None, 0    # keys: start + T of the pass running
        self.undo = []

    def record(self, name, x):
        if self.writer is not None:
            self.writer(name, to_numpy(x))

    def wrap(self, obj, attr, make):
        """Replace `obj.attr` (an instance's method or attribute, or a module's function) by make(original)."""
        original = getattr(obj, attr)
        self.undo.append((obj, attr, obj.__dict__.get(attr)))
        if isinstance(obj, type(sys)):
            setattr(obj, attr, make(original))
        else:
            object.__setattr__(obj, attr, make(original))

    def remove(self):
        for obj, attr, before in reversed(self.undo):
            if before is None:
                obj.__dict__.pop(attr, None)
            elif isinstance(obj, type(sys)):
                setattr(obj, attr, before)
            else:
                object.__setattr__(obj, attr, before)
        self.undo = []

    def output(self, name, reshape=None):
        def make(call):
            def wrapped(*args, **kwargs):
                y = call(*args, **kwargs)
                self.record(name, y if reshape is None else reshape(y))
                return y
            return wrapped
        return make

    def input_and_output(self, before, after, reshape=None):
        """For wrap: record the call's input as `before` (reshaped) and its output as `after`."""
        def make(call):
            def wrapped(x, *args, **kwargs):
                self.record(before, x if reshape is None else reshape(x))
                y = call(x, *args, **kwargs)
                self.record(after, y)
                return y
            return wrapped
        return make

    def install(self):
        b, rec = self.model.backbone, self.record
        compute = self.model.compute_dtype
        merge = lambda x: ops.reshape(x, (*x.shape[:2], -1))                  # [B, T, heads, HD] -> [B, T, heads·HD]
        heads_first = lambda x: ops.transpose(x, (0, 2, 1, 3))                 # [B, T, heads, HD] -> [B, heads, T, HD]

        def embedding(call):
            def wrapped(x, reverse=False, **kwargs):
                y = call(x, reverse=reverse, **kwargs)
                rec("logits" if reverse else "model.embed_tokens", y)
                return y
            return wrapped
        self.wrap(b.token_embedding, "call", embedding)
        for l, layer in enumerate(b.transformer_layers):
            s, attn = f"model.layers.{l}", layer._self_attention_layer
            self.wrap(layer._self_attention_layernorm, "call", self.output(f"{s}.input_layernorm"))
            for name, dense in (("q_proj", attn._query_dense), ("k_proj", attn._key_dense),
                                ("v_proj", attn._value_dense)):
                self.wrap(dense, "call", self.output(f"{s}.self_attn.{name}", merge))

            def rope(call, s=s, calls=[0]):
                def wrapped(x, *args, **kwargs):
                    y = call(x, *args, **kwargs)
                    rec(f"{s}.self_attn.{'k_rope' if calls[0] % 2 else 'q_rope'}", heads_first(y))
                    calls[0] += 1
                    return y
                return wrapped
            self.wrap(attn.rotary_embedding_layer, "call", rope)

            def softmax(call, s=s):
                def wrapped(scores, mask=None):
                    probs = call(scores, mask)                                 # float32 [B, H, T, N]
                    S = self.keys
                    rec(f"{s}.self_attn.scores", scores[..., :S])
                    allowed = ops.ones(scores.shape[:1] + scores.shape[2:], "bool") if mask is None else \
                        ops.cast(mask, "bool")                                 # [B, T, N]
                    finfo_min = float(np.finfo(np.float32).min) if compute == "float32" else -3.3895313892515355e38
                    additive = ops.where(allowed[:, None, :, :S], 0.0, finfo_min)
                    rec(f"{s}.self_attn.mask", ops.cast(additive, compute))
                    if probs.shape[-1] > S and float(ops.max(probs[..., S:])) != 0.0:
                        raise RuntimeError(f"{s}: probability on cache cells past the {S} positions filled")
                    rec(f"{s}.self_attn.probs", ops.cast(probs, compute)[..., :S])
                    return probs
                return wrapped
            self.wrap(attn, "_masked_softmax", softmax)

            self.wrap(attn._output_dense, "call",
                      self.input_and_output(f"{s}.self_attn.context", f"{s}.self_attn.o_proj", merge))
            self.wrap(layer._feedforward_layernorm, "call",
                      self.input_and_output(f"{s}.resid_mid", f"{s}.post_attention_layernorm"))
            self.wrap(layer._feedforward_gate_dense, "call", self.output(f"{s}.mlp.gate_proj"))
            self.wrap(layer._feedforward_intermediate_dense, "call", self.output(f"{s}.mlp.up_proj"))
            self.wrap(layer, "activation", self.output(f"{s}.mlp.act", lambda y: ops.cast(y, compute)))
            self.wrap(layer._feedforward_output_dense, "call",
                      self.input_and_output(f"{s}.mlp.act_up", f"{s}.mlp.down_proj"))
            self.wrap(layer, "call", self.output(s, lambda y: y[0] if isinstance(y, (tuple, list)) else y))
        self.wrap(b.layer_norm, "call", self.output("model.norm"))


# -- planted bugs ------------------------------------------------------------------------------------------


def plant(model, recorder, bug):
    b = model.backbone
    if bug == "rope-theta":       # Llama's θ in layer 2
        b.transformer_layers[2]._self_attention_layer.rotary_embedding_layer.max_wavelength = 10000.0
    elif bug == "eps":            # layer 0's input norm: x / (sqrt(mean(x²)) + ε)
        norm = b.transformer_layers[0]._self_attention_layernorm

        def call(original):
            def wrapped(x):
                h = ops.cast(x, "float32")
                h = h / (ops.sqrt(ops.mean(h * h, axis=-1, keepdims=True)) + norm.epsilon)
                return ops.cast(h * norm.scale, norm.compute_dtype)
            return wrapped
        recorder.wrap(norm, "call", call)
    elif bug == "q-bias":         # layer 4's q_proj without its bias
        dense = b.transformer_layers[4]._self_attention_layer._query_dense
        recorder.wrap(dense, "call", lambda original: lambda x, *a, **k: ops.einsum("bqm,muh->bquh", x, dense.kernel))
    elif bug == "gqa-tile":       # layer 3: head h reads KV head h % KV
        attn = b.transformer_layers[3]._self_attention_layer

        def compute(original):
            def wrapped(query, key, value, *args, **kwargs):
                G = attn.num_key_value_groups
                KV = key.shape[2] // G     # keys arrive repeated per group: undo, then tile
                key, value = key[:, :, ::G], value[:, :, ::G]
                key, value = ops.tile(key, (1, 1, G, 1)), ops.tile(value, (1, 1, G, 1))
                assert key.shape[2] == KV * G
                return original(query, key, value, *args, **kwargs)
            return wrapped
        recorder.wrap(attn, "_compute_attention", compute)
    else:
        raise ValueError(f"--plant {bug!r}: expected rope-theta, eps, q-bias or gqa-tile")


def record_dump(model, config, input_ids, out, decode_steps=0, plants=(), weights=None, model_path=None,
                overwrite=False, attention="fused"):
    """`attention`: "fused" (keras-hub's choice: on JAX it calls ops.dot_product_attention whenever
    `fused_attention_op_available()`, the CPU included, so no scores exist) or "eager" (that check answered
    False: keras-hub's own einsum path, whose scores, mask and probabilities are recorded)."""
    from keras_hub.src.models.qwen import qwen_attention

    ids = np.asarray(input_ids, dtype=np.int32)
    B, N = ids.shape
    b = model.backbone
    dtype = model.compute_dtype
    recorder = Recorder(model)
    weights = port_weights(model) if weights is None else weights
    for bug in plants:            # first, so that the taps record what the planted layers compute
        plant(model, recorder, bug)
    recorder.install()
    if attention == "eager":
        recorder.wrap(qwen_attention, "fused_attention_op_available", lambda original: lambda: False)
    prefill = N - decode_steps
    plan = [(0, prefill)] + [(t, 1) for t in range(prefill, N)]
    versions = {"keras-hub": keras_hub.__version__, "keras": keras.__version__, "backend": keras.config.backend(),
                "numpy": np.__version__}
    try:
        with DumpWriter(out, producer=f"keras-hub {keras_hub.__version__} (scripts/dump_keras_hub.py)", dtype=dtype,
                        input_ids=ids, config=config, weights=weights, versions=versions,
                        model_path=None if model_path is None else str(model_path),
                        options={"decode_steps": decode_steps, "plants": list(plants), "cache": "preallocated",
                                 "attention": attention},
                        overwrite=overwrite) as writer:
            recorder.writer = writer
            head_dim = b.hidden_dim // b.num_query_heads
            cache = ops.zeros((B, b.num_layers, 2, N, b.num_key_value_heads, head_dim), dtype=dtype)  # the full length
            for start, length in plan:
                writer.new_pass(start, length)
                recorder.keys = start + length
                logits, _, cache = model.call_with_cache(ops.convert_to_tensor(ids[:, start:start + length]),
                                                         cache, start)
    finally:
        recorder.writer = None
        recorder.remove()
    return Path(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--ids", required=True, help="token ids as JSON, [[...]]")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--decode-steps", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--plant", nargs="*", default=[])
    parser.add_argument("--attention", choices=["fused", "eager"], default="fused")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    model, config = load(args.model, args.dtype)
    record_dump(model, config, json.loads(args.ids), args.out, args.decode_steps, args.plant, model_path=args.model,
                overwrite=args.overwrite, attention=args.attention)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
