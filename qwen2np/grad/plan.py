"""The memory plan of a backward pass: which layers keep their activations, which are recomputed.

A backward pass needs, besides the weights: the gradients asked for (one array per parameter, in the
model's dtype), the activations each layer's backward reads (`layer_activation_bytes`), and the
temporaries of one layer's backward and of the head (the logits and their gradient). When all the
layers' activations do not fit in the memory budget, some layers keep only their input (B·T·D numbers)
and are run forward again, one at a time, when the backward reaches them: *activation checkpointing*,
which trades one more forward pass of those layers for their memory. The plan keeps as many layers as
fit; `GradientPlan.description` says what was chosen, as the weight plan's does (docs/gradients.md).

The budget is the model's own (`from_pretrained(max_memory=...)`, by default the memory available), less
what its weights take; `value_and_grad(max_memory=...)` overrides it.

>>> from qwen2np import Qwen2Config
>>> config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
...                      num_attention_heads=4, num_key_value_heads=2)
>>> plan = plan_backward(config, 4, batch=1, length=8, grad_bytes=10_000, room=10**9)
>>> plan.kept, plan.recomputed
(4, 0)
>>> full, light = layer_activation_bytes(config, 4, 1, 8), checkpoint_bytes(config, 4, 1, 8)
>>> room = 10_000 + working_bytes(config, 4, 1, 8, 32) + 4 * light + (full - light)   # one layer's worth
>>> plan = plan_backward(config, 4, 1, 8, 10_000, room=room)
>>> plan.kept, plan.recomputed
(1, 3)
"""

from dataclasses import dataclass, field

from ..errors import ModelTooLargeError
from ..weights.system import format_bytes


def layer_activation_bytes(config, itemsize, batch, length):
    """Bytes one decoder layer keeps for its backward: its input x, the normalised h, q, k, v (after RoPE),
    the attention probabilities [B, H, T, S], the context, the residual after attention and its norm, and
    the MLP's gate, up and act [B, T, F] (S = T: training runs without a cache)."""
    B, T, D, F = batch, length, config.hidden_size, config.intermediate_size
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_position = 4 * D + 2 * H * HD + 2 * KV * HD + 3 * F
    return itemsize * (B * T * per_position + B * H * T * T)


def checkpoint_bytes(config, itemsize, batch, length):
    """Bytes a recomputed layer keeps: its input, [B, T, D]."""
    return itemsize * batch * length * config.hidden_size


def working_bytes(config, itemsize, batch, length, outputs):
    """The temporaries of a backward pass besides what layers keep: one layer recomputed and its
    backward's gradients (twice a layer's activations), and the head's `outputs` per position (the logits
    V, or the C classes) three times over (logits, probabilities, their gradient)."""
    return 2 * layer_activation_bytes(config, itemsize, batch, length) + 3 * itemsize * batch * length * outputs


@dataclass
class GradientPlan:
    """How a backward pass holds its activations: `kept` layers keep them (layers 0 … kept − 1), the
    `recomputed` others keep their input and run forward again in the backward pass. `figures` are the
    bytes behind it."""

    kept: int
    recomputed: int
    figures: dict = field(default_factory=dict)
    description: str = ""

    def keeps(self, layer):
        return layer < self.kept


def plan_backward(config, itemsize, batch, length, grad_bytes, room, outputs=None, checkpoint=None,
                  what="the backward pass"):
    """A GradientPlan for `batch` x `length` positions, gradients of `grad_bytes`, within `room` bytes
    (None: no limit known). `checkpoint` None chooses; True recomputes every layer; False recomputes none
    (refused when that does not fit). Refuses, with the figures, a room below what any plan needs."""
    L = config.num_hidden_layers
    outputs = config.vocab_size if outputs is None else outputs
    full = layer_activation_bytes(config, itemsize, batch, length)
    light = checkpoint_bytes(config, itemsize, batch, length)
    working = working_bytes(config, itemsize, batch, length, outputs)
    fixed = grad_bytes + working
    if checkpoint is True:
        kept = 0
    elif room is None:
        kept = L
    else:
        least = fixed + L * light
        if room < least or (checkpoint is False and room < fixed + L * full):
            needed = fixed + L * (full if checkpoint is False else light)
            raise ModelTooLargeError(
                f"{what} of {batch} x {length} positions needs at least {format_bytes(needed)} beside the weights "
                f"(gradients {format_bytes(grad_bytes)}, temporaries {format_bytes(working)}, "
                f"{'activations' if checkpoint is False else 'layer inputs'} {format_bytes(L * (full if checkpoint is False else light))}), "
                f"but the memory budget leaves {format_bytes(room)}; ask for fewer gradients (params=...), "
                f"pass fewer positions at once, or allow more memory (max_memory=...)")
        kept = L if checkpoint is False else min(L, (room - least) // max(1, full - light))
    figures = {"room": room, "gradients": grad_bytes, "working": working, "layer_activations": full,
               "layer_input": light, "activations": kept * full + (L - kept) * light}
    plan = GradientPlan(int(kept), int(L - kept), figures)
    plan.description = describe(plan, L)
    return plan


def describe(plan, layers):
    """One line, e.g. "gradients 2.5 GB; every layer keeps its activations (24 x 9.9 MB)" or "…; layers
    0-9 keep their activations (10 x 1.1 GB), 14 are recomputed from their inputs (activation
    checkpointing)"."""
    f = plan.figures
    head = f"gradients {format_bytes(f['gradients'])}"
    each = format_bytes(f["layer_activations"])
    if plan.recomputed == 0:
        how = f"every layer keeps its activations ({layers} x {each})"
    elif plan.kept == 0:
        how = (f"every layer is recomputed from its input in the backward pass (activation checkpointing; "
               f"{layers} x {format_bytes(f['layer_input'])} kept)")
    else:
        how = (f"layers 0-{plan.kept - 1} keep their activations ({plan.kept} x {each}), the other "
               f"{plan.recomputed} are recomputed from their inputs (activation checkpointing)")
    room = "" if f["room"] is None else f", within {format_bytes(f['room'])} left by the weights"
    return f"{head}; {how}{room}"
