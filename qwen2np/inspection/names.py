"""The names of the intermediates of a forward pass, in forward order, and where their position axes are.

Names follow the checkpoint's module names (`model.layers.3.self_attn.q_proj`); docs/intermediates.md
lists them all with their shapes.
"""

# The names one decoder layer produces, in forward order (docs/intermediates.md), under `…layers.{l}.`;
# the layer's own output (the residual stream after it) is named `…layers.{l}` and comes last.
LAYER_NAMES = (
    "input_layernorm",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_rope", "self_attn.k_rope",
    "self_attn.scores", "self_attn.mask", "self_attn.probs", "self_attn.context", "self_attn.head_out",
    "self_attn.o_proj", "resid_mid", "post_attention_layernorm",
    "mlp.gate_proj", "mlp.up_proj", "mlp.act", "mlp.down_proj",
)
# intermediates laid out [B, heads, T, …]; the last three also have a key axis S: [B, heads, T, S]
_HEAD_MAJOR = {"q_rope", "k_rope", "head_out", "scores", "mask", "probs"}
_KEY_AXIS = {"scores", "mask", "probs"}


def intermediate_names(num_hidden_layers, prefix="model", head=("logits",)):
    """Every intermediate name of a forward pass, in forward order.

    `prefix` is "model" under a head (Qwen2ForCausalLM, …) and "" for a bare Qwen2Model; `head` names the
    head's own intermediates (`("logits",)` for the causal LM, `("score", "logits")` for sequence
    classification).

    >>> names = intermediate_names(2)
    >>> len(names), names[:4], names[-2:]
    (43, ['model.embed_tokens', 'model.rotary_emb.cos', 'model.rotary_emb.sin', 'model.layers.0.input_layernorm'], ['model.norm', 'logits'])
    """
    p = f"{prefix}." if prefix else ""
    names = [f"{p}embed_tokens", f"{p}rotary_emb.cos", f"{p}rotary_emb.sin"]
    for i in range(num_hidden_layers):
        names += [f"{p}layers.{i}.{n}" for n in LAYER_NAMES] + [f"{p}layers.{i}"]
    return names + [f"{p}norm"] + list(head)


# intermediates that are constants of the inputs (no gradient flows into them), and head_out, which the
# backward pass does not form (docs/gradients.md)
NO_GRADIENT = ("rotary_emb.cos", "rotary_emb.sin", "self_attn.mask", "self_attn.head_out")


def gradient_names(names):
    """The names under which a backward pass gives the gradients of the intermediates `names`: each
    differentiable name with `.grad` appended (docs/gradients.md).

    >>> gradient_names(["model.embed_tokens", "model.rotary_emb.cos", "model.layers.0.self_attn.probs"])
    ['model.embed_tokens.grad', 'model.layers.0.self_attn.probs.grad']
    """
    return [f"{n}.grad" for n in names if not n.endswith(NO_GRADIENT)]


def position_axes(name, ndim):
    """(T axis, S axis) of the intermediate `name` with `ndim` dimensions; None where it has no such axis.

    T counts the new positions of the forward pass, S the key positions attended over.

    >>> position_axes("model.layers.3.self_attn.probs", 4), position_axes("model.layers.3.mlp.act", 3)
    ((2, 3), (1, None))
    >>> position_axes("logits", 2)    # sequence classification: one row per sequence, no positions
    (None, None)
    >>> position_axes("model.layers.3.self_attn.probs.grad", 4)   # a gradient: the axes of its tensor
    (2, 3)
    """
    name = name.removesuffix(".grad")
    last = name.rsplit(".", 1)[-1]
    if last in _HEAD_MAJOR and ndim == 4:
        return 2, (3 if last in _KEY_AXIS else None)
    return (1, None) if ndim >= 3 else (None, None)
