#!/usr/bin/env python
"""The transformers 5.24.0 side of a golden dump: the flags, names and format of `qwen2np dump`.

    python scripts/dump_transformers.py --model PATH --prompt "..." --out DIR [--dtype float64]
        [--float64-everywhere] [--include GLOB ...] [--ids IDS] [--chat] [--decode-steps N] [--tokenizer PATH]

PATH is a Hugging Face folder or a .gguf file (loaded with `gguf_file=`, dequantized to float32 by
transformers itself). The model runs with eager attention, in float32, or in float64 (converted after
loading, which is exact), or in bfloat16 or float16 (`from_pretrained(dtype=torch.bfloat16)`, which
rounds every weight to the nearest half-precision value): a real half-precision port, its tensors dumped
in its own dtype (docs/tolerances.md measures them).
qwen2np must never import torch or transformers, so this side lives here.

How each name of docs/intermediates.md is captured:

* forward hooks on modules: `model.embed_tokens`, `model.rotary_emb` (its (cos, sin) output),
  `…input_layernorm`, `…self_attn.{q,k,v,o}_proj`, `…post_attention_layernorm`, `…mlp.{gate,up,down}_proj`,
  `…mlp.act_fn` (named `…mlp.act`), the decoder layers `model.layers.{l}`, `model.norm`, `lm_head` (`logits`);
  a pre-hook on `o_proj` gives its input, `…self_attn.context`.
* for the duration of the dump, modeling_qwen2's `apply_rotary_pos_emb` is wrapped (its outputs are
  `q_rope`, `k_rope`), and its `eager_attention_forward` is replaced by `eager_attention` below: the same
  lines, recording `scores`, `mask` and `probs`. Every call is checked bit for bit against the function
  it replaces, so the dump is what transformers computes.

`--float64-everywhere` lifts transformers' three float32 islands of a "float64" model (docs/float64.md):
Qwen2RMSNorm upcasts to float32, eager attention runs softmax in float32, and the rotary embedding
computes inv_freq, the angles, cos and sin in float32. With it, they run in float64 too; and so does the
loss, the fourth island of a backward pass (ForCausalLMLoss and ForTokenClassification upcast the logits
with `.float()`; docs/gradients.md).

`--grad` adds a backward pass of the causal-LM loss (labels = the input ids, -100 at the padding), as
`qwen2np dump --grad` does: torch autograd's gradient of each intermediate, taken by a hook on the tensor
recorded under its name, is dumped as `name.grad`, and each parameter's `.grad` as `{parameter}.grad`
(only the parameters the --include globs name require a gradient). The embedding's output is made to
require a gradient, so that every intermediate has one whichever parameters do.
"""

import argparse
import contextlib
import fnmatch
import functools
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
import transformers
from torch import nn
from transformers.loss import loss_utils
from transformers.models.qwen2 import modeling_qwen2

from qwen2np.cli.dump import FINGERPRINT_METHODS, add_arguments, include_patterns, inputs_from_args
from qwen2np.errors import DumpError, IntermediateNameError, Qwen2npError
from qwen2np.golden.dump import new_dump, plan_passes, write_dump
from qwen2np.golden.record import select_positions, take_positions
from qwen2np.golden.fingerprint import architecture, config_fingerprint, weights_fingerprint
from qwen2np.inspection.names import gradient_names, intermediate_names

_ORIGINAL_EAGER = modeling_qwen2.eager_attention_forward
_ORIGINAL_ROPE = modeling_qwen2.apply_rotary_pos_emb
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- transformers' eager attention, line for line, with the three names it does not expose -----------


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, record=None,
                    softmax_dtype=torch.float32, **kwargs):
    """modeling_qwen2.eager_attention_forward (5.24.0), calling `record(name, tensor)` on the way."""
    key_states = modeling_qwen2.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_qwen2.repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if record is not None:
        record("scores", attn_weights)
        B, _, T, S = attn_weights.shape
        mask = torch.zeros((B, 1, T, S), dtype=query.dtype) if attention_mask is None else attention_mask
        record("mask", mask.expand(B, 1, T, S))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    # subtle: transformers runs this softmax in float32 even in a float64 model (softmax_dtype lifts it)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    if record is not None:
        record("probs", attn_weights)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    return attn_output, attn_weights


# -- float64 everywhere -------------------------------------------------------------------------------


def rms_norm_float64(self, hidden_states):
    """Qwen2RMSNorm.forward with the statistics in the input dtype when it is float64 (transformers: float32)."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def rotary_float64(self, x, position_ids):
    """Qwen2RotaryEmbedding.forward with inv_freq, the angles, cos and sin in float64 (default RoPE only)."""
    if self.rope_type != "default":
        raise NotImplementedError(f"--float64-everywhere supports the default RoPE, not {self.rope_type!r}")
    base = self.config.rope_parameters["rope_theta"]
    dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def causal_lm_loss_float64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                           **kwargs):
    """loss_utils.ForCausalLMLoss (5.24.0) without its `logits.float()`: float64 logits stay float64."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    return loss_utils.fixed_cross_entropy(logits, shift_labels.view(-1).to(logits.device), num_items_in_batch,
                                          ignore_index, **kwargs)


def token_classification_loss_float64(logits, labels, config, **kwargs):
    """loss_utils.ForTokenClassification (5.24.0) without its `logits.float()`."""
    return loss_utils.fixed_cross_entropy(logits.view(-1, config.num_labels), labels.view(-1).to(logits.device),
                                          **kwargs)


@contextlib.contextmanager
def float64_everywhere():
    """Within: a float64 transformers Qwen2 computes RMSNorm, the attention softmax, RoPE and the causal-LM
    and token-classification losses in float64."""
    saved = (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2RotaryEmbedding.forward,
             modeling_qwen2.eager_attention_forward)
    losses = {k: loss_utils.LOSS_MAPPING[k] for k in ("ForCausalLM", "ForTokenClassification")}
    modeling_qwen2.Qwen2RMSNorm.forward = rms_norm_float64
    modeling_qwen2.Qwen2RotaryEmbedding.forward = rotary_float64
    modeling_qwen2.eager_attention_forward = functools.partial(eager_attention, softmax_dtype=None)
    loss_utils.LOSS_MAPPING["ForCausalLM"] = causal_lm_loss_float64
    loss_utils.LOSS_MAPPING["ForTokenClassification"] = token_classification_loss_float64
    try:
        yield
    finally:
        (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2RotaryEmbedding.forward,
         modeling_qwen2.eager_attention_forward) = saved
        loss_utils.LOSS_MAPPING.update(losses)


# -- recording ----------------------------------------------------------------------------------------


def to_numpy(tensor, copy=True):
    """A torch tensor as a NumPy array of the same dtype (bfloat16 as ml_dtypes.bfloat16, bit for bit); a
    view of the tensor's memory when not `copy`."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:   # NumPy has no bfloat16: reinterpret the 16 bits
        array = tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return array.copy() if copy else array


class Recorder:
    """Hooks and wrappers that record the intermediates of a transformers Qwen2ForCausalLM by qwen2np name."""

    def __init__(self, model, patterns, grads=False, also_known=()):
        self.model = model
        self.patterns = list(patterns)
        self.passes = []       # one {name: array} per forward pass
        self.scope = None      # the `…self_attn` whose forward is running
        self.grads = {} if grads else None   # with a backward pass: {name.grad: array}, in the order produced
        known = intermediate_names(model.config.num_hidden_layers)
        self.order = {n: i for i, n in enumerate(known)}
        self.differentiable = set(gradient_names(known))
        known = known + sorted(self.differentiable) if grads else known
        for p in self.patterns:
            if not fnmatch.filter(known, p) and not fnmatch.filter(also_known, p):
                raise IntermediateNameError(f"--include {p!r} matches no intermediate; names look like {known[3]!r}")

    def record(self, name, tensor):
        if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            self.passes[-1][name] = to_numpy(tensor)
        grad_name = f"{name}.grad"
        if (self.grads is not None and tensor.requires_grad and grad_name in self.differentiable
                and any(fnmatch.fnmatchcase(grad_name, p) for p in self.patterns)):
            tensor.register_hook(lambda g: self.grads.__setitem__(grad_name, to_numpy(g)))

    def new_pass(self):
        self.passes.append({})

    def ordered(self, index):
        """(name, array) of forward pass `index`, in qwen2np's forward order."""
        recorded = self.passes[index]
        return sorted(recorded.items(), key=lambda item: self.order.get(item[0], len(self.order)))

    @contextlib.contextmanager
    def installed(self):
        handles = []
        for module_name, module in self.model.named_modules():
            handles += self._hooks(module_name, module)
        previous_eager = modeling_qwen2.eager_attention_forward
        softmax_dtype = getattr(previous_eager, "keywords", {}).get("softmax_dtype", torch.float32)
        modeling_qwen2.eager_attention_forward = functools.partial(self._attention, previous_eager, softmax_dtype)
        modeling_qwen2.apply_rotary_pos_emb = self._rope
        try:
            yield self
        finally:
            modeling_qwen2.eager_attention_forward = previous_eager
            modeling_qwen2.apply_rotary_pos_emb = _ORIGINAL_ROPE
            for h in handles:
                h.remove()

    def _hooks(self, module_name, module):
        def output_as(name):
            return lambda mod, args, out: self.record(name, out)

        last = module_name.rsplit(".", 1)[-1]
        if module_name == "model.embed_tokens" and self.grads is not None:
            def embedding(mod, args, out):   # a gradient for every intermediate, whichever weights have one
                out = out if out.requires_grad else out.detach().requires_grad_()
                self.record(module_name, out)
                return out
            return [module.register_forward_hook(embedding)]
        if module_name == "model.rotary_emb":
            def rotary(mod, args, out):
                self.record("model.rotary_emb.cos", out[0])
                self.record("model.rotary_emb.sin", out[1])
            return [module.register_forward_hook(rotary)]
        if module_name == "lm_head":
            return [module.register_forward_hook(output_as("logits"))]
        if last == "self_attn":
            def enter(mod, args):
                self.scope = module_name
            return [module.register_forward_pre_hook(enter)]
        if last == "o_proj":
            def context_and_heads(mod, args):
                self.record(f"{module_name[:-7]}.context", args[0])
                name = f"{module_name[:-7]}.head_out"
                if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):   # H times o_proj's work
                    B, T, _ = args[0].shape
                    H = self.model.config.num_attention_heads
                    w = mod.weight.view(mod.weight.shape[0], H, -1)                 # [D, H, HD]
                    self.record(name, torch.einsum("bthk,dhk->bhtd", args[0].view(B, T, H, -1), w))
            return [module.register_forward_pre_hook(context_and_heads),
                    module.register_forward_hook(output_as(module_name))]
        if last == "post_attention_layernorm":   # its input is the residual stream after attention
            return [module.register_forward_pre_hook(lambda mod, args: self.record(f"{module_name[:-25]}.resid_mid", args[0])),
                    module.register_forward_hook(output_as(module_name))]
        if last == "act_fn":
            return [module.register_forward_hook(output_as(module_name[:-len("act_fn")] + "act"))]
        if module_name in ("model.embed_tokens", "model.norm") or module_name.startswith("model.layers.") and (
                last.isdigit() or last in ("input_layernorm", "q_proj", "k_proj",
                                           "v_proj", "gate_proj", "up_proj", "down_proj")):
            return [module.register_forward_hook(output_as(module_name))]
        return []

    def _rope(self, q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = _ORIGINAL_ROPE(q, k, cos, sin, *args, **kwargs)
        self.record(f"{self.scope}.q_rope", q_embed)
        self.record(f"{self.scope}.k_rope", k_embed)
        return q_embed, k_embed

    def _attention(self, previous, softmax_dtype, module, query, key, value, attention_mask, scaling,
                   dropout=0.0, **kwargs):
        scope = f"model.layers.{module.layer_idx}.self_attn"
        out = eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                              record=lambda name, t: self.record(f"{scope}.{name}", t),
                              softmax_dtype=softmax_dtype, **kwargs)
        expected = previous(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        # subtle: in a stock float64 model, finfo(float64).min becomes -inf in the float32 softmax, so fully
        # padded query rows are NaN on both sides: equal means bit for bit, NaN where the other is NaN
        same = all(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(out, expected))
        if not same:
            raise RuntimeError(f"{scope}: the recording copy of eager attention differs from transformers' own; "
                               f"transformers {transformers.__version__} changed eager_attention_forward?")
        return out


# -- the dump -----------------------------------------------------------------------------------------


def load_model(path, dtype="float32"):
    """transformers' Qwen2ForCausalLM from a folder or a .gguf file, eager attention, in `dtype`.

    float64 is loaded in float32 and converted (exact). bfloat16 and float16 are loaded so by
    `from_pretrained`, which rounds each weight to the nearest half-precision value and keeps RoPE's
    inv_freq in float32.
    """
    path = Path(path)
    # subtle: not float32 then .to(bfloat16), which also rounds the inv_freq buffer to bfloat16: RoPE's
    # angles are then off by up to 2^-9 relative, a bug `compare --isolate` names (docs/porting.md)
    kwargs = dict(dtype=DTYPES[dtype] if dtype in ("bfloat16", "float16") else torch.float32,
                  attn_implementation="eager")
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if dtype == "float64":
        model = model.to(torch.float64)   # exact: every float32 value is a float64 value
    return model.eval()


def load_tokenizer(path):
    path = Path(path)
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(path)


def versions():
    import qwen2np

    return {"transformers": transformers.__version__, "torch": torch.__version__, "qwen2np": qwen2np.__version__,
            "numpy": np.__version__}


def describe(model, model_path, fingerprint):
    """The manifest's `model`: path, class, config and its fingerprint, and the weights' fingerprint as the
    model holds them (rounded, in half precision), or None."""
    weights = None
    if fingerprint is not None:
        weights = weights_fingerprint({n: to_numpy(t, copy=False) for n, t in model.state_dict().items()}, fingerprint)
    return {"path": None if model_path is None else str(model_path), "class": type(model).__name__,
            "config": architecture(model.config), "config_fingerprint": config_fingerprint(model.config),
            "weights_fingerprint": weights}


def record_dump(model, input_ids, attention_mask=None, include=("*",), decode_steps=0, prompt=None, chat=False,
                model_path=None, fingerprint="sha256-f32", float64_all=False, positions=None):
    """The transformers counterpart of qwen2np.golden.record.record_dump: the same passes, names, format."""
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    plan = plan_passes(ids.shape[1], decode_steps)
    recorder = Recorder(model, include)
    lifted = float64_everywhere() if float64_all else contextlib.nullcontext()
    with torch.no_grad(), lifted, recorder.installed():
        cache = None
        for start, length in plan:
            end = start + length
            recorder.new_pass()
            out = model(input_ids=ids[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                        cache=cache, use_cache=len(plan) > 1)
            cache = out.cache
    passes = [{"start": s, "length": n, "tensors": recorder.ordered(i)} for i, (s, n) in enumerate(plan)]
    kept = select_positions(positions, ids.shape[1], plan[0][1])     # as qwen2np dump --positions
    if kept is not None:
        passes[0]["tensors"] = [(n, take_positions(n, a, kept)) for n, a in passes[0]["tensors"]]
    dtype = {t: name for name, t in DTYPES.items()}[model.dtype]
    description = describe(model, model_path, fingerprint)
    dump = new_dump(producer=f"transformers {transformers.__version__} (scripts/dump_transformers.py)",
                    versions=versions(), dtype=dtype, input_ids=ids.numpy(), attention_mask=attention_mask,
                    prompt=prompt, chat=chat, passes=passes, model=description,
                    options={"include": list(include), "decode_steps": decode_steps, "attn_implementation": "eager",
                             "float64_everywhere": bool(float64_all)})
    if kept is not None:
        dump.manifest["passes"][0]["positions"] = dump.manifest["options"]["positions"] = kept
    return dump


def record_grad_dump(model, input_ids, attention_mask=None, include=("*",), prompt=None, chat=False, model_path=None,
                     fingerprint="sha256-f32", float64_all=False, positions=None):
    """The transformers counterpart of qwen2np.golden.record.record_gradient_dump (`dump --grad`): one
    forward pass of the causal-LM loss with labels = input_ids (-100 at the padding), `loss.backward()`,
    and the intermediates, their gradients and the parameters' gradients whose names match `include`,
    in the order qwen2np lists them (forward order; then the gradients in the order autograd produced them;
    then the parameters', last to first)."""
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    labels = ids if mask is None else torch.where(mask == 1, ids, -100)
    parameters = dict(model.named_parameters())
    wanted = [n for n in parameters if any(fnmatch.fnmatchcase(f"{n}.grad", p) for p in include)]
    recorder = Recorder(model, include, grads=True, also_known=[f"{n}.grad" for n in parameters])
    lifted = float64_everywhere() if float64_all else contextlib.nullcontext()
    required = {n: p.requires_grad for n, p in parameters.items()}
    try:
        for n, p in parameters.items():
            p.requires_grad_(n in wanted)
            p.grad = None
        with torch.enable_grad(), lifted, recorder.installed():
            recorder.new_pass()
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
        grads = [(f"{n}.grad", to_numpy(parameters[n].grad)) for n in reversed(wanted)]
    finally:
        for n, p in parameters.items():
            p.requires_grad_(required[n])
            p.grad = None
    tensors = recorder.ordered(0) + list(recorder.grads.items()) + grads
    kept = select_positions(positions, ids.shape[1], ids.shape[1])
    passes = [{"start": 0, "length": ids.shape[1], "tensors": tensors}]
    if kept is not None:
        passes[0]["tensors"] = [(n, take_positions(n, a, kept)) for n, a in tensors]
    dtype = {t: name for name, t in DTYPES.items()}[model.dtype]
    description = describe(model, model_path, fingerprint)
    dump = new_dump(producer=f"transformers {transformers.__version__} (scripts/dump_transformers.py)",
                    versions=versions(), dtype=dtype, input_ids=ids.numpy(), attention_mask=attention_mask,
                    prompt=prompt, chat=chat, passes=passes, model=description,
                    options={"include": list(include), "decode_steps": 0, "attn_implementation": "eager",
                             "float64_everywhere": bool(float64_all),
                             "grad": {"labels": "input_ids, -100 at padding", "loss": out.loss.item()}})
    if kept is not None:
        dump.manifest["passes"][0]["positions"] = dump.manifest["options"]["positions"] = kept
    return dump


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dump_transformers.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    dtype_flag = next(a for a in parser._actions if a.dest == "dtype")
    dtype_flag.choices = list(DTYPES)   # qwen2np dump computes in float32 or float64; transformers also in half
    dtype_flag.help = "compute dtype (bfloat16, float16: the weights rounded, as a half-precision port holds them)"
    budget_flag = next(a for a in parser._actions if a.dest == "max_memory")
    budget_flag.help = argparse.SUPPRESS   # qwen2np's budget; transformers loads its own way
    parser.add_argument("--float64-everywhere", action="store_true",
                        help="with --dtype float64, also run RMSNorm, softmax and RoPE in float64 (docs/float64.md)")
    args = parser.parse_args(argv)
    try:
        from qwen2np.io.hub import resolve_model_path

        if args.float64_everywhere and args.dtype != "float64":
            raise DumpError("--float64-everywhere needs --dtype float64")
        if args.grad and args.decode_steps:
            raise DumpError("--grad runs one forward and backward pass over the whole prompt; it takes no --decode-steps")
        path = resolve_model_path(args.model)
        ids, mask, prompt = inputs_from_args(args, lambda: load_tokenizer(resolve_model_path(args.tokenizer or path)))
        plan_passes(ids.shape[1], args.decode_steps)
        started = time.perf_counter()
        torch.set_grad_enabled(False)
        transformers.logging.set_verbosity_error()
        model = load_model(path, args.dtype)
        if args.grad:
            dump = record_grad_dump(model, ids, mask, include_patterns(args), prompt, args.chat, path,
                                    FINGERPRINT_METHODS[args.fingerprint], args.float64_everywhere, args.positions)
        else:
            dump = record_dump(model, ids, mask, include_patterns(args), args.decode_steps, prompt, args.chat, path,
                               FINGERPRINT_METHODS[args.fingerprint], args.float64_everywhere, args.positions)
        folder = write_dump(dump, args.out, overwrite=args.overwrite)
    except Qwen2npError as e:
        print(f"dump_transformers.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(dump.tensors)} tensors of {len(dump.passes)} forward pass(es) to {folder} "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
