"""Run a qwen2np model under a trace and make a dump of the intermediates (what `qwen2np dump` does).

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> dump = record_dump(model, [[1, 2, 3, 4]], include=["model.layers.1.*", "logits"], decode_steps=1)
>>> len(dump.passes), dump.names()[:2], dump["logits@1"].shape
(2, ['model.layers.1.input_layernorm', 'model.layers.1.self_attn.q_proj'], (1, 1, 32))
"""

import fnmatch
import inspect
from contextlib import nullcontext

import numpy as np

from .. import __version__
from ..errors import DumpError
from ..inspection.names import gradient_names, position_axes
from ..inspection.tracing import Trace
from ..weights.backend import to_numpy
from .dump import Dump, DumpWriter, plan_passes, read_dump
from .manifest import check_dump, new_manifest, tensor_key
from .fingerprint import architecture, config_fingerprint, weights_fingerprint


def versions():
    """The versions a qwen2np dump records."""
    return {"qwen2np": __version__, "numpy": np.__version__}


def record_dump(model, input_ids, attention_mask=None, include=("*",), decode_steps=0, prompt=None, chat=False,
                model_path=None, fingerprint="sha256-f32", positions=None, out=None, overwrite=False):
    """Dump the intermediates of `model` whose names match the globs `include`.

    input_ids [B, N] (and attention_mask [B, N], 1 = token, 0 = padding) run as plain forward calls, as
    `model(input_ids, attention_mask=…)` does: a prefill of the first N - decode_steps positions, then one
    forward pass per remaining position through the KV cache. `fingerprint` is a method of
    fingerprint.py, or None to skip hashing the weights. `positions` (indices into the N positions,
    negative from the end, or a slice) keeps only those positions of the prefill's tensors, along their
    T axis (docs/dump-format.md); decode steps are kept whole.

    With `out` (a folder), each tensor is written to disk as the forward pass produces it, so that a dump
    of every intermediate of a long prompt on a big model is never in memory at once; the dump is then
    returned as read back (memory-mapped). Without, the dump is built in memory.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DumpError(f"input_ids: expected a non-empty [B, N] array of integers, found shape {ids.shape} "
                        f"{ids.dtype}")
    mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask is not None and mask.shape != ids.shape:
        raise DumpError(f"attention_mask: expected the shape of input_ids {ids.shape}, found {mask.shape}")
    plan = plan_passes(ids.shape[1], decode_steps)
    kept = select_positions(positions, ids.shape[1], plan[0][1])      # prefill positions kept, or None
    options = {"include": list(include), "decode_steps": decode_steps}
    manifest = _manifest(model, ids, mask, plan, kept, options, prompt, chat, model_path, fingerprint)
    tensors = {}                     # in memory, when there is no `out`
    writer = None if out is None else DumpWriter(out, overwrite=overwrite)
    now = {"pass": 0}

    def sink(name, x):               # each recorded tensor as it is produced (the kept positions only)
        index = now["pass"]
        array = to_numpy(x)
        key = tensor_key(name, index)
        manifest["passes"][index]["tensors"].append(
            {"name": name, "key": key, "shape": list(array.shape), "dtype": array.dtype.name})
        if writer is not None:
            writer.add(key, array)
        else:
            tensors[key] = np.array(array)   # a copy: the forward pass may reuse the buffer

    trace = Trace(model, *include, sink=sink)
    # with kept positions, a causal LM makes the logits of those positions only (all of a 32k-token
    # prompt's would take 19 GB), and the trace records them only (and the attention maps of those rows only)
    keeps_logits = "logits_to_keep" in inspect.signature(model.__call__).parameters
    with writer if writer is not None else nullcontext(), trace:
        cache = None
        for index, (start, length) in enumerate(plan):
            now["pass"] = index
            trace.positions = kept if index == 0 else None
            end = start + length
            extra = {"logits_to_keep": kept} if index == 0 and kept is not None and keeps_logits else {}
            result = model(ids[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                           past_key_values=cache, use_cache=len(plan) > 1, **extra)
            cache = result.past_key_values
        if writer is not None:
            writer.finish(manifest)
    return _recorded(writer, out, manifest, tensors, "record_dump")


def record_gradient_dump(model, input_ids, attention_mask, include, backward, prompt=None, chat=False,
                         model_path=None, fingerprint="sha256-f32", positions=None, out=None, overwrite=False):
    """A dump of one forward and backward pass (`qwen2np dump --grad`, docs/gradients.md): the intermediates
    whose names match the globs `include`, the gradients of the intermediates as `name.grad`, and the
    gradients of the parameters as `{parameter name}.grad` (`model.layers.0.self_attn.q_proj.weight.grad`),
    each when its name matches.

    `backward(model, input_ids, attention_mask, params)` runs the pass and returns (loss, {parameter name:
    gradient}) for the parameter names `params` (the command line passes qwen2np.value_and_grad with labels
    = input_ids, -100 at the padding: golden/ never imports the backward pass it records). Tensors are listed
    in the order they are produced: the forward's, then the gradients in backward order (intermediates as
    the backward pass reaches them, then the parameters', from the last to the first), so that `compare`
    names the first gradient that goes wrong in the order the error spreads.
    """
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    include = list(include)
    intermediates = model.intermediate_names()
    names = intermediates + gradient_names(intermediates)
    parameters = [f"{n}.grad" for n in model.params]
    traced = [p for p in include if fnmatch.filter(names, p)]
    for p in include:
        if p not in traced and not fnmatch.filter(parameters, p):
            raise DumpError(f"--include {p!r} matches no intermediate, intermediate gradient or parameter gradient; "
                            f"names look like {names[3]!r}, {names[3]}.grad, {parameters[1]!r}")
    wanted = [n[:-len(".grad")] for n in parameters if any(fnmatch.fnmatchcase(n, p) for p in include)]
    kept = select_positions(positions, ids.shape[1], ids.shape[1])
    options = {"include": include, "decode_steps": 0, "grad": {"labels": "input_ids, -100 at padding"}}
    manifest = _manifest(model, ids, mask, [(0, ids.shape[1])], kept, options, prompt, chat, model_path, fingerprint)
    tensors = {}
    writer = None if out is None else DumpWriter(out, overwrite=overwrite)

    def sink(name, x, copy=True):    # a copy of an intermediate: the pass may reuse its buffer
        array = to_numpy(x)
        if kept is not None:
            array = take_positions(name, array, kept)
        manifest["passes"][0]["tensors"].append(
            {"name": name, "key": name, "shape": list(array.shape), "dtype": array.dtype.name})
        if writer is not None:
            writer.add(name, array)
        else:
            tensors[name] = np.array(array) if copy else array

    with writer if writer is not None else nullcontext():
        with Trace(model, *traced, sink=sink):
            loss, grads = backward(model, ids, mask, wanted)
        for name in reversed(list(grads)):       # the last parameters' gradients are the backward pass's first
            sink(f"{name}.grad", grads[name], copy=False)
        options["grad"]["loss"] = float(loss)
        if writer is not None:
            writer.finish(manifest)
    return _recorded(writer, out, manifest, tensors, "record_gradient_dump")


def _manifest(model, ids, mask, plan, kept, options, prompt, chat, model_path, fingerprint):
    """The manifest of a recording by `model`, its forward passes `plan` listed with no tensor yet (the
    prefill's `kept` positions noted in it and in `options`)."""
    manifest = new_manifest(producer=f"qwen2np {versions()['qwen2np']}", versions=versions(), dtype=model.dtype,
                            input_ids=ids, attention_mask=mask, prompt=prompt, chat=chat,
                            model=model_description(model, model_path, fingerprint), options=options)
    manifest["passes"] = [{"start": start, "length": length, "tensors": []} for start, length in plan]
    if kept is not None:
        options["positions"] = manifest["passes"][0]["positions"] = kept
    return manifest


def _recorded(writer, out, manifest, tensors, where):
    """The dump recorded: read back from `out` when it was written there, else checked in memory."""
    if writer is not None:
        return read_dump(out)
    dump = Dump(manifest, tensors)
    check_dump(dump, where)
    return dump


def select_positions(positions, num_positions, prefill):
    """The absolute prefill positions a selection keeps, sorted, or None for all.

    `positions` is None, a slice, a string "a:b" / "a:b:c" / "3,7,-1", or integers (negative count from
    the end of the N input positions). Positions past the prefill (decode steps) are whole anyway.

    >>> select_positions("-3:", 10, 10), select_positions([0, -1, 0], 10, 8), select_positions(None, 4, 4)
    ([7, 8, 9], [0], None)
    """
    if positions is None:
        return None
    text = positions
    if isinstance(positions, str):
        text = positions.strip()
        try:
            if ":" in text:
                positions = slice(*(int(p) if p.strip() else None for p in text.split(":")))
            else:
                positions = [int(p) for p in text.split(",")]
        except (TypeError, ValueError):
            raise DumpError(f"positions {text!r}: expected a slice like -16: or 0:8, or a list like 0,5,-1") from None
    if isinstance(positions, slice):
        if positions.step == 0:
            raise DumpError(f"positions {text!r}: a slice's step cannot be 0; "
                            f"expected a slice like -16: or 0:8 (0:8:2 takes every other), or a list like 0,5,-1")
        chosen = list(range(num_positions))[positions]
    else:
        chosen = []
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not -num_positions <= p < num_positions:
                raise DumpError(f"positions: {p!r} is not a position of the {num_positions} input positions "
                                f"(0 .. {num_positions - 1}, or negative from the end)")
            chosen.append(int(p) % num_positions)
    kept = sorted({p for p in chosen if p < prefill})
    if not kept:
        raise DumpError(f"positions {positions!r} keep none of the prefill's {prefill} positions")
    return kept


def take_positions(name, array, kept):
    """`array` with only the `kept` positions along its T axis (unchanged if it has none). (qwen2np's own
    dumps keep them while tracing: `Trace.positions`; scripts/dump_transformers.py keeps them so.)"""
    t_axis, _ = position_axes(name, array.ndim)
    if t_axis is None or array.shape[t_axis] == 1 and len(kept) > 1:   # RoPE tables of a decode step, etc.
        return array
    return np.take(array, kept, axis=t_axis)


def model_description(model, path=None, fingerprint="sha256-f32"):
    """The manifest's "model" object for a qwen2np model."""
    return {
        "path": None if path is None else str(path),
        "class": type(model).__name__,
        "config": architecture(model.config),
        "config_fingerprint": config_fingerprint(model.config),
        "weights_fingerprint": None if fingerprint is None else weights_fingerprint(model.state_dict(), fingerprint),
    }
