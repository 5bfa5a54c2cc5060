"""The float32 and float64 policies of `qwen2np compare`: the largest `rel` error accepted, per tensor kind
(policies.py holds the half-precision and quantized policies, and the isolation limits).

`rel` = max |A - B| / max(max |A|, max |B|) over the compared elements. Every number below is a measured
worst case times a stated headroom; docs/tolerances.md gives the measurements (scripts/measure_tolerances.py
reproduces them) and the reasons.

>>> kind_of("model.layers.5.mlp.up_proj"), kind_of("model.layers.5"), kind_of("logits")
('mlp.up_proj', 'layer', 'logits')
>>> tolerance_for("model.layers.5.mlp.up_proj", "float32") == TOLERANCES["float32"]["*"]
True
>>> tolerance_for("logits", "float32", overrides=[("*", 0.5), ("logits", 0.25)])
0.25
>>> tolerance_for("model.layers.5.mlp.up_proj.grad", "float32"), tolerance_for("model.norm.weight.grad", "float32")
(0.003, 0.01)
"""

import fnmatch
import re

# dtype -> tensor kind -> tolerance on `rel`; "*" covers every kind not listed. Measured worst cases
# (docs/tolerances.md): float32 vs transformers float32, 0.5B checkpoint, T = 1 … 512, padding, decode.
TOLERANCES = {
    "float32": {
        "embed_tokens": 0.0,          # a table lookup: exact
        "self_attn.mask": 0.0,        # compared as its pattern of allowed keys: exact
        "rotary_emb.cos": 1e-6,       # plus 1e-7 per position (PER_POSITION): float32 angles lose digits
        "rotary_emb.sin": 1e-6,
        "self_attn.probs": 5e-4,      # worst 6.1e-5: layer 0's sharp softmax amplifies rounding in the scores
        "self_attn.context": 5e-4,    # worst 5.5e-5, the same cause
        "*": 2e-4,                    # worst 2.1e-5 (layer 0 mlp.gate_proj)
    },
    "float64": {
        "embed_tokens": 0.0,
        "self_attn.mask": 0.0,
        "*": 1e-10,
    },
}

# dtype -> kind -> tolerance added per position (of the pass's last one): a correct float32 RoPE table
# computes the angles position · inv_freq in float32, whose error grows with the position: against float64,
# at most 4.4e-8 · position over positions 0-32767, transformers' and qwen2np's alike
# (scripts/measure_rope_tables.py; 2.2e-6 at position 60)
PER_POSITION = {"float32": {"rotary_emb.cos": 1e-7, "rotary_emb.sin": 1e-7}, "float64": {}}

# Gradients (`qwen2np dump --grad`, docs/gradients.md): qwen2np float32 against torch autograd through
# transformers float32, the 0.5B checkpoint, T = 8, 64, 128 and a padded batch, every intermediate's
# gradient in all 24 layers and the parameters' of layers 0, 12, 23, the final norm and lm_head
# (scripts/measure_grad_tolerances.py). float64 against transformers float64 with its four float32 islands
# lifted, the checkpoint's first 4 layers: worst 8.3e-13 (a layer-0 norm weight's gradient), 121x under 1e-10.
GRAD_TOLERANCES = {
    "float32": {
        "intermediate": 3e-3,     # worst 3.8e-4: layer 0's q_proj.grad, through its sharp softmax (8x)
        "parameter": 3e-3,        # worst 3.1e-4: layer 23's v_proj.bias.grad (10x)
        "norm weight": 1e-2,      # worst 1.3e-3: layer 23's post_attention_layernorm.weight.grad, a sum over
                                  # every position of terms that cancel (8x)
    },
    "float64": {"intermediate": 1e-10, "parameter": 1e-10, "norm weight": 1e-10},
}


def gradient_tolerance(kind, dtype):
    """The tolerance on `rel` of a gradient's kind (`mlp.up_proj.grad`, `grad` for a layer's output,
    `mlp.up_proj.weight.grad`, `norm.weight.grad`), or None when `kind` is not a gradient."""
    if kind != "grad" and not kind.endswith(".grad"):
        return None
    table = GRAD_TOLERANCES[dtype]
    if kind.endswith(("norm.weight.grad", "layernorm.weight.grad")):
        return table["norm weight"]
    return table["parameter"] if kind.endswith((".weight.grad", ".bias.grad")) else table["intermediate"]


_LAYER = re.compile(r"(?:model\.)?layers\.\d+(?:\.(?P<rest>.+))?")


def kind_of(name):
    """The kind of an intermediate: its name without the `model.` prefix and the layer number."""
    m = _LAYER.fullmatch(name)
    if m:
        return m.group("rest") or "layer"
    return name[len("model."):] if name.startswith("model.") else name


def tolerance_for(name, dtype, overrides=None, position=0):
    """The tolerance on `rel` for intermediate `name` of a pass whose last position is `position`: the last
    matching override (glob over the name), else the policy of `dtype` for its kind.

    >>> tolerance_for("model.rotary_emb.cos", "float32", position=60)       # 1e-6 + 1e-7 · 60
    7e-06
    """
    for pattern, value in reversed(overrides or []):
        if fnmatch.fnmatchcase(name, pattern):
            return value
    table, kind = TOLERANCES[dtype], kind_of(name)
    if kind in table:
        return table[kind] + PER_POSITION.get(dtype, {}).get(kind, 0.0) * position
    grad = gradient_tolerance(kind, dtype)
    return table["*"] if grad is None else grad


def parse_tolerance(text):
    """`--tolerance` values: "1e-3" (every tensor) or "GLOB=1e-3" (the tensors whose name matches).

    >>> parse_tolerance("1e-3"), parse_tolerance("*.probs=0.01")
    (('*', 0.001), ('*.probs', 0.01))
    """
    pattern, _, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--tolerance {text!r}: expected a number or GLOB=NUMBER, e.g. 1e-4 or 'logits=1e-3'")
    if not number >= 0:
        raise ValueError(f"--tolerance {text!r}: a tolerance is a number >= 0")
    return (pattern or "*", number)
