"""Run a qwen2np model under a trace and make a dump of the intermediates (what `qwen2np dump` does).

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> dump = record_dump(model, [[1, 2, 3, 4]], include=["model.layers.1.*", "logits"], decode_steps=1)
>>> len(dump.passes), dump.names()[:2], dump["logits@1"].shape
(2, ['model.layers.1.input_layernorm', 'model.layers.1.self_attn.q_proj'], (1, 1, 32))
"""

import numpy as np

from ..backend import to_numpy
from ..errors import DumpError
from ..tracing import trace
from .dump import new_dump, plan_passes
from .fingerprint import architecture, config_fingerprint, weights_fingerprint


def versions():
    """The versions a qwen2np dump records."""
    from .. import __version__

    return {"qwen2np": __version__, "numpy": np.__version__}


def record_dump(model, input_ids, attention_mask=None, include=("*",), decode_steps=0, prompt=None, chat=False,
                model_path=None, fingerprint="sha256-f32"):
    """Dump the intermediates of `model` whose names match the globs `include`.

    input_ids [B, N] (and attention_mask [B, N], 1 = token, 0 = padding) run as plain forward calls, as
    `model(input_ids, attention_mask=…)` does: a prefill of the first N - decode_steps positions, then one
    forward pass per remaining position through the KV cache. `fingerprint` is a method of
    fingerprint.py, or None to skip hashing the weights.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DumpError(f"input_ids: expected a non-empty [B, N] array of integers, found shape {ids.shape} "
                        f"{ids.dtype}")
    mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask is not None and mask.shape != ids.shape:
        raise DumpError(f"attention_mask: expected the shape of input_ids {ids.shape}, found {mask.shape}")
    plan = plan_passes(ids.shape[1], decode_steps)
    with trace(model, *include) as t:
        cache = None
        for start, length in plan:
            end = start + length
            out = model(ids[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                        past_key_values=cache, use_cache=len(plan) > 1)
            cache = out.past_key_values
    passes = [{"start": start, "length": length, "tensors": [(n, to_numpy(t.history(n)[i])) for n in t.names()]}
              for i, (start, length) in enumerate(plan)]
    return new_dump(producer=f"qwen2np {versions()['qwen2np']}", versions=versions(), dtype=model.dtype,
                    input_ids=ids, attention_mask=mask, prompt=prompt, chat=chat, passes=passes,
                    model=model_description(model, model_path, fingerprint),
                    options={"include": list(include), "decode_steps": decode_steps})


def model_description(model, path=None, fingerprint="sha256-f32"):
    """The manifest's "model" object for a qwen2np model."""
    return {
        "path": None if path is None else str(path),
        "class": type(model).__name__,
        "config": architecture(model.config),
        "config_fingerprint": config_fingerprint(model.config),
        "weights_fingerprint": None if fingerprint is None else weights_fingerprint(model.state_dict(), fingerprint),
    }
