"""`value_and_grad`: the loss of a Qwen2 head and the gradient of every parameter, by a backward pass
written out by hand.

    loss, grads = value_and_grad(model, input_ids, labels=labels)

The forward half is the model's own: the same functions (rms_norm, linear, apply_rope, the masks,
grouped_query_attention) called in the same order, so the loss is bitwise `model(..., labels=...).loss`;
each layer keeps what its backward needs (`layer_forward`). The backward half runs the layers in reverse
(`layer_backward`), each operation's gradient beside its forward in qwen2np/grad/layers.py and
attention.py. When the activations of every layer do not fit in the memory budget, some layers keep
only their input and are recomputed when the backward pass reaches them (plan.py).

Under `qwen2np.trace`, every differentiable intermediate's gradient is seen as `name.grad`
(`model.layers.3.resid_mid.grad`), recorded or edited like any intermediate (docs/gradients.md).

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> ids = np.array([[1, 2, 3, 4]])
>>> loss, grads = value_and_grad(model, ids, labels=ids)
>>> bool(loss == model(ids, labels=ids).loss), len(grads), grads["model.layers.0.self_attn.k_proj.weight"].shape
(True, 27, (8, 16))
"""

import fnmatch
from dataclasses import dataclass

import numpy as np

from ..errors import ModelInputError, ModelInputTypeError, TraceError
from ..inspection.tracing import edited, quiet, running, tap
from ..model.inputs import as_labels, forward_arguments
from ..model.layers import ACT2FN, linear, rms_norm
from ..model.losses import check_sequence_labels
from ..model.masks import layer_masks
from ..weights.plan import parse_memory
from ..weights.store import StoredWeight, reads_file
from ..weights.system import default_budget
from .attention import AttentionSaved, attention_backward, attention_forward
from .layers import (ACT_BACKWARD, embedding_backward, linear_backward, rms_norm_backward,
                     swiglu_mlp_backward)
from .losses import (causal_lm_loss_and_grad, sequence_classification_loss_and_grad,
                     token_classification_loss_and_grad)
from .plan import plan_backward

HEADS = ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2ForTokenClassification")


class Gradients(dict):
    """{parameter name: gradient}, in the order of the model's parameters (the checkpoint's names; a tied
    lm_head's gradient is part of `model.embed_tokens.weight`'s), and `.plan`, the GradientPlan the
    backward pass followed (which layers were recomputed, and why)."""

    def __init__(self, grads, plan):
        super().__init__(grads)
        self.plan = plan


def value_and_grad(model, input_ids=None, labels=None, attention_mask=None, *, position_ids=None,
                   inputs_embeds=None, use_cache=None, num_items_in_batch=None, params=None, max_memory=None,
                   checkpoint=None):
    """(loss, Gradients): the loss `model(input_ids, labels=labels, attention_mask=...)` returns, and its
    gradient with respect to every parameter, as arrays in the model's dtype keyed by checkpoint name.

    `model` is a Qwen2ForCausalLM (labels [B, T] of token ids or -100, shifted inside as transformers
    does), a Qwen2ForSequenceClassification (labels [B], or [B, num_labels] for multi-label and
    regression) or a Qwen2ForTokenClassification (labels [B, T]), in float32 or float64.
    `use_cache` plays its part in the forward pass: as transformers, packed sequences (position_ids that
    restart inside a row, no attention_mask) are told apart only without a cache, so pass use_cache=False
    (transformers' Trainer sets config.use_cache = False) to train on them. `num_items_in_batch` (causal
    LM): divide the summed loss by this count, as transformers does for
    accumulated micro-batches, instead of averaging over this call's labels. `params`: glob patterns of the
    parameters to differentiate (default all); the others cost nothing. `max_memory` replaces the model's
    memory budget for this backward pass; `checkpoint` True recomputes every layer, False none, None lets
    the budget decide (`grads.plan.description` says what it chose).
    """
    head = _head_kind(model)
    if model.xp is not np:
        raise ModelInputTypeError(f"value_and_grad runs on NumPy arrays; this model's are on {model.xp.__name__} "
                                  f"(model.to('numpy') first)")
    if model.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ModelInputTypeError(f"value_and_grad computes in float32 or float64; this model computes in "
                                  f"{model.dtype.name} (load it with dtype='float32', or model.to('float32'))")
    config, base = model.config, model.model
    args = forward_arguments(config, model.dtype, np, input_ids, inputs_embeds, attention_mask, position_ids,
                             use_cache=use_cache, output_attentions=False, output_hidden_states=False)
    B, T = args.batch, args.length
    labels, problem_type = _checked_labels(model, head, labels, args, num_items_in_batch)
    wanted = _parameters(model, params)
    plan = plan_backward(config, model.dtype.itemsize, B, T,
                         sum(np.prod(model.params[n].shape) for n in wanted) * model.dtype.itemsize,
                         _room(model, max_memory),
                         outputs=config.vocab_size if head == "Qwen2ForCausalLM" else config.num_labels,
                         checkpoint=checkpoint, what=f"value_and_grad of {type(model).__name__}")
    # the files unchanged, the forward's temporaries within budget (the causal LM's logits at every position)
    model.check_can_run(args, logits=B * T if head == "Qwen2ForCausalLM" else 0)
    with running(model), running(base):        # traces opened on the model see its intermediates and their grads
        _refuse_forward_edits(model)
        loss, grads = _forward_backward(model, base, head, args, labels, problem_type, num_items_in_batch,
                                        plan, wanted)
    return loss, Gradients({n: grads[n] for n in model.params if n in grads}, plan)


# -- one decoder layer ----------------------------------------------------------------------------------


@dataclass
class LayerSaved:
    """What a decoder layer's backward needs of its forward."""

    x: object          # [B, T, D]  the layer's input
    attn: AttentionSaved
    mid: object        # [B, T, D]  the residual stream after attention
    h: object          # [B, T, D]  post_attention_layernorm(mid), the MLP's input
    gate: object       # [B, T, F]
    up: object         # [B, T, F]
    act: object        # [B, T, F]  act(gate)


def layer_forward(x, w, cos, sin, mask, config, scope):
    """decoder_layer (qwen2np/model/modeling.py), keeping what the backward needs.  x [B, T, D] -> [B, T, D]"""
    eps = config.rms_norm_eps
    h = tap(scope, "input_layernorm", rms_norm(x, w["input_layernorm.weight"], eps))      # [B, T, D]
    attn, a = attention_forward(h, w["self_attn"], cos, sin, mask, config, f"{scope}.self_attn")
    mid = tap(scope, "resid_mid", x + attn)                                              # residual
    h = tap(scope, "post_attention_layernorm", rms_norm(mid, w["post_attention_layernorm.weight"], eps))
    m = f"{scope}.mlp"
    gate = tap(m, "gate_proj", linear(h, w["mlp.gate_proj.weight"]))                    # [B, T, D] -> [B, T, F]
    up = tap(m, "up_proj", linear(h, w["mlp.up_proj.weight"]))                          # [B, T, D] -> [B, T, F]
    act = tap(m, "act", ACT2FN[config.hidden_act](gate))                                # [B, T, F]
    down = tap(m, "down_proj", linear(act * up, w["mlp.down_proj.weight"]))             # [B, T, F] -> [B, T, D]
    return tap(scope, None, mid + down), LayerSaved(x, a, mid, h, gate, up, act)        # residual


def layer_backward(d_out, s, w, cos, sin, config, scope, need):
    """decoder_layer backwards: d_out [B, T, D] (the gradient of the layer's output) -> d_x [B, T, D] (of
    its input), and {in-layer name: gradient} for the weights `need(name)` asks for.

    x_out = mid + mlp(norm(mid)) and mid = x + attn(norm(x)): each residual passes the gradient through
    unchanged and adds what its branch sends back.
    """
    eps = config.rms_norm_eps
    d_out = tap(scope, "grad", d_out)                                                    # [B, T, D]
    mlp_w = {k[len("mlp."):]: v for k, v in w.items() if k.startswith("mlp.")}
    d_h, grads = swiglu_mlp_backward(d_out, s.h, s.gate, s.up, s.act, mlp_w, ACT_BACKWARD[config.hidden_act],
                                     f"{scope}.mlp", lambda n: need(f"mlp.{n}"))
    grads = {f"mlp.{n}": g for n, g in grads.items()}
    d_h = tap(scope, "post_attention_layernorm.grad", d_h)
    d_mid, grads["post_attention_layernorm.weight"] = rms_norm_backward(d_h, s.mid, w["post_attention_layernorm.weight"], eps)
    d_mid = tap(scope, "resid_mid.grad", d_out + d_mid)                                  # residual
    d_h, attn_grads = attention_backward(d_mid, s.attn, w["self_attn"], cos, sin, config, f"{scope}.self_attn",
                                         lambda n: need(f"self_attn.{n}"))
    grads.update({f"self_attn.{n}": g for n, g in attn_grads.items()})
    d_h = tap(scope, "input_layernorm.grad", d_h)
    d_x, grads["input_layernorm.weight"] = rms_norm_backward(d_h, s.x, w["input_layernorm.weight"], eps)
    return d_mid + d_x, {n: g for n, g in grads.items() if need(n)}                     # residual


# -- the whole model --------------------------------------------------------------------------------------


def _forward_backward(model, base, head, args, labels, problem_type, num_items_in_batch, plan, wanted):
    """The forward pass keeping activations (or, for the layers the plan recomputes, their inputs), the
    head's loss, and the backward pass through the head, the final norm, the layers and the embedding."""
    config, dtype, scope = model.config, model.dtype, base.scope
    prefix = f"{scope}." if scope else ""
    B, T = args.batch, args.length
    # subtle: the masks the forward pass would make with this call's cache (empty, and then discarded): with
    # one, packed sequences are not told apart, as in transformers (docs/masks.md)
    masks = layer_masks(config, args.attention_mask, args.position_ids, args.cache, B, T, dtype)   # -> [B, 1, T, S]
    x = base.embed_tokens[args.ids] if args.embeds is None else args.embeds                  # [B, T] -> [B, T, D]
    x = tap(scope, "embed_tokens", x)
    cos, sin = base.rotary_emb(args.positions)                                               # -> [B or 1, T, HD]
    cos, sin = tap(scope, "rotary_emb.cos", cos), tap(scope, "rotary_emb.sin", sin)
    saved = []
    for i, (w, layer_scope, kind) in enumerate(base.layers):
        x, s = layer_forward(x, w, cos, sin, masks[kind], config, layer_scope)               # [B, T, D]
        saved.append(s if plan.keeps(i) else s.x)        # a recomputed layer keeps its input only
    norm_w = base.params["norm.weight"]
    h = tap(scope, "norm", rms_norm(x, norm_w, config.rms_norm_eps))                        # [B, T, D]

    grads = {}
    loss, d_h = HEAD_BACKWARD[head](model, h, args, labels, problem_type, num_items_in_batch, wanted, grads)
    d_h = tap(scope, "norm.grad", d_h)
    d_x, d_norm = rms_norm_backward(d_h, x, norm_w, config.rms_norm_eps)                    # [B, T, D]
    _keep(grads, wanted, f"{prefix}norm.weight", d_norm)
    for i in reversed(range(len(base.layers))):
        w, layer_scope, kind = base.layers[i]
        s = saved.pop()
        if not plan.keeps(i):                            # activation checkpointing: run the layer again
            with quiet():                                # the traces saw its intermediates the first time
                _, s = layer_forward(s, w, cos, sin, masks[kind], config, layer_scope)
        d_x, layer_grads = layer_backward(d_x, s, w, cos, sin, config, layer_scope,
                                          lambda n, i=i: f"{prefix}layers.{i}.{n}" in wanted)
        del s
        for n, g in layer_grads.items():
            grads[f"{prefix}layers.{i}.{n}"] = g
    d_x = tap(scope, "embed_tokens.grad", d_x)                                               # [B, T, D]
    name = f"{prefix}embed_tokens.weight"
    if args.ids is not None and name in wanted:
        d_e = embedding_backward(d_x, args.ids, config.vocab_size, config.pad_token_id)      # [V, D]
        if name in grads:                                # tied: the embedding is also lm_head
            d_e += grads[name]
        grads[name] = d_e
    return loss, grads


def _causal_lm_head(model, h, args, labels, problem_type, num_items_in_batch, wanted, grads):
    """logits = h · lm_headᵀ, the shifted next-token loss, and back to h."""
    tied = "lm_head.weight" not in model.params            # then lm_head *is* model.embed_tokens.weight
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    logits = tap(None, "logits", linear(h, model.lm_head))                                  # [B, T, D] -> [B, T, V]
    loss, d_logits = causal_lm_loss_and_grad(logits, labels, num_items_in_batch)
    del logits
    d_logits = tap(None, "logits.grad", d_logits)
    d_h, d_w, _ = linear_backward(d_logits, h, model.lm_head, need_weight=name in wanted)   # -> [B, T, D]
    _keep(grads, wanted, name, d_w)
    return loss, d_h


def _sequence_classification_head(model, h, args, labels, problem_type, num_items_in_batch, wanted, grads):
    """score at every position, pooled at each row's last token that is not padding, the loss, and back."""
    w = model.params["score.weight"]
    scores = tap(None, "score", linear(h, w))                                               # [B, T, C]
    B, T = scores.shape[:2]
    pad = model.config.pad_token_id
    if pad is None or args.ids is None:
        last = np.full(B, T - 1)
    else:   # as the model: the rightmost token that is not padding (a row of padding pools position 0)
        last = np.argmax(np.arange(T) * (args.ids != pad), axis=-1)
    rows = np.arange(B)
    pooled = tap(None, "logits", scores[rows, last])                                        # -> [B, C]
    model.config.problem_type = problem_type           # stored on the config, as transformers does
    loss, d_pooled = sequence_classification_loss_and_grad(pooled, labels, problem_type)
    d_pooled = tap(None, "logits.grad", d_pooled)
    d_scores = np.zeros_like(scores)
    d_scores[rows, last] = d_pooled                      # only the pooled position of each row
    d_scores = tap(None, "score.grad", d_scores)
    d_h, d_w, _ = linear_backward(d_scores, h, w, need_weight="score.weight" in wanted)
    _keep(grads, wanted, "score.weight", d_w)
    return loss, d_h


def _token_classification_head(model, h, args, labels, problem_type, num_items_in_batch, wanted, grads):
    """score (with bias) at every position, the per-token loss, and back."""
    w, b = model.params["score.weight"], model.params["score.bias"]
    logits = tap(None, "logits", linear(h, w, b))                                           # [B, T, C]
    loss, d_logits = token_classification_loss_and_grad(logits, labels)
    d_logits = tap(None, "logits.grad", d_logits)
    d_h, d_w, d_b = linear_backward(d_logits, h, w, bias="score.bias" in wanted, need_weight="score.weight" in wanted)
    _keep(grads, wanted, "score.weight", d_w)
    _keep(grads, wanted, "score.bias", d_b)
    return loss, d_h


HEAD_BACKWARD = {"Qwen2ForCausalLM": _causal_lm_head, "Qwen2ForSequenceClassification": _sequence_classification_head,
                 "Qwen2ForTokenClassification": _token_classification_head}


def _keep(grads, wanted, name, g):
    if name in wanted and g is not None:
        grads[name] = g


# -- the checks before anything runs ---------------------------------------------------------------------


def _head_kind(model):
    for cls in type(model).__mro__:
        if cls.__name__ in HEADS:
            return cls.__name__
    raise ModelInputTypeError(f"value_and_grad needs a model with a loss ({', '.join(HEADS)}); "
                              f"got {type(model).__name__}")


def _checked_labels(model, head, labels, args, num_items_in_batch):
    """The labels on the host, checked for the head (and the sequence classifier's problem type)."""
    config, B, T = model.config, args.batch, args.length
    if labels is None:
        raise ModelInputError(f"value_and_grad needs labels to compute a loss ({head}: "
                              f"{'[B, T] token ids, e.g. labels=input_ids' if head != 'Qwen2ForSequenceClassification' else '[B] class ids'})")
    if num_items_in_batch is not None:
        if head != "Qwen2ForCausalLM":
            raise ModelInputError(f"num_items_in_batch: transformers 5.24 does not pass it to the loss of "
                                  f"{head}; only the causal LM divides by it")
        if not np.isfinite(float(num_items_in_batch)) or float(num_items_in_batch) <= 0:
            raise ModelInputError(f"num_items_in_batch: expected a positive count of labels, found {num_items_in_batch!r}")
    if head == "Qwen2ForCausalLM":
        return as_labels(labels, config.vocab_size, (B, T)), None
    if head == "Qwen2ForTokenClassification":
        return as_labels(labels, config.num_labels, (B, T)), None
    if config.pad_token_id is None and B != 1:
        raise ModelInputError("Cannot handle batch sizes > 1 if no padding token is defined.")
    problem_type = check_sequence_labels(labels, B, config)
    return np.asarray(labels), problem_type


def _parameters(model, patterns):
    """The names of the parameters to differentiate: all, or those matching the glob `patterns`."""
    names = list(model.params)
    if patterns is None:
        return set(names)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = set()
    for p in patterns:
        matched = fnmatch.filter(names, p)
        if not matched:
            raise ModelInputError(f"params: {p!r} matches no parameter of {type(model).__name__}; names look like "
                                  f"{names[min(2, len(names) - 1)]!r}")
        chosen.update(matched)
    return chosen


def _room(model, max_memory):
    """Bytes the backward pass may use beside the weights: what the model's weight plan left for
    temporaries (as a forward pass is checked), or `max_memory` (or the memory available) less the
    weights held in memory."""
    plan = model.weight_plan
    if max_memory is None and plan is not None and plan.budget is not None:
        return plan.figures["activations"] + plan.figures["room_left"]
    budget = default_budget() if max_memory is None else parse_memory(max_memory)
    if budget is None:
        return None
    held = sum(a.stored.nbytes if isinstance(a, StoredWeight) else 0 if reads_file(a) else a.nbytes
               for a in model.params.values())
    return max(0, budget - held)


def _refuse_forward_edits(model):
    """A trace may record anything and edit gradients (`….grad`), but an edit of the forward pass is a
    function value_and_grad cannot differentiate: refused, naming it."""
    for name in model.intermediate_names():
        if edited(None, name):
            raise TraceError(f"value_and_grad cannot differentiate through the trace's edit of {name}: edit "
                             f"gradients ({name}.grad) or run the edited forward pass without gradients")
