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
    return table.get(kind, table["*"]) + PER_POSITION.get(dtype, {}).get(kind, 0.0) * position


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
