"""Conventions that are not bugs: a port's own layouts, scores taken after the mask, arguments given in the
other order.

Every framework lays out its per-head tensors its own way: token-first `[B, T, H, HD]` (keras-hub,
TransformerLens, most C ports), heads split `[B, T, H, HD]` where qwen2np merges them `[B, T, H·HD]`, no
batch axis `[T, D]`. A dump in such a layout is the port's convention, not a bug: `conform` recognises a
shape that is a known layout (or a unique permutation) of the expected one and says how to read it, and
`normalised` gives a view of a dump in qwen2np's layouts, with a note per kind ("q_rope stored [B, T, H,
HD]"). `masked_scores` recognises scores recorded after the mask (TransformerLens' `hook_attn_scores`:
−inf or `finfo.min` where a key is hidden). `swapped` tells when `compare A B` was given a qwen2np
reference as A and the port as B.

>>> conform("model.layers.0.self_attn.q_rope", (1, 5, 4, 8), (1, 4, 5, 8)).note
'stored [B, T, H, HD]'
>>> conform("model.layers.0.self_attn.context", (1, 5, 4, 8), (1, 5, 32)).note
'stored [B, T, H, HD]'
>>> conform("model.norm", (5, 16), (1, 5, 16)).note
'stored without the batch axis [T, D]'
>>> conform("model.norm", (1, 5, 17), (1, 5, 16)) is None
True
"""

import itertools
import re
from dataclasses import dataclass

import numpy as np

from .tolerances import kind_of

# the axes of each kind of intermediate, as qwen2np lays it out (docs/intermediates.md)
_AXES = {
    "self_attn.q_proj": ("B", "T", "H·HD"), "self_attn.context": ("B", "T", "H·HD"),
    "self_attn.k_proj": ("B", "T", "KV·HD"), "self_attn.v_proj": ("B", "T", "KV·HD"),
    "self_attn.q_rope": ("B", "H", "T", "HD"), "self_attn.k_rope": ("B", "KV", "T", "HD"),
    "self_attn.scores": ("B", "H", "T", "S"), "self_attn.probs": ("B", "H", "T", "S"),
    "self_attn.mask": ("B", "1", "T", "S"), "self_attn.head_out": ("B", "H", "T", "D"),
    "mlp.gate_proj": ("B", "T", "F"), "mlp.up_proj": ("B", "T", "F"), "mlp.act": ("B", "T", "F"),
    "mlp.act_up": ("B", "T", "F"), "logits": ("B", "T", "V"),
    "rotary_emb.cos": ("B", "T", "HD"), "rotary_emb.sin": ("B", "T", "HD"),
}
_SPLIT = {"H·HD": ("H", "HD"), "KV·HD": ("KV", "HD")}


def axes_of(name):
    """The axis labels of intermediate `name` in qwen2np's layout (the residual stream's by default)."""
    return _AXES.get(kind_of(name), ("B", "T", "D"))


def expected_shape(name, config, batch, length, keys=None):
    """The shape qwen2np gives intermediate `name` of a pass of `length` positions; None for an axis that
    may vary (S unless `keys` is given; the RoPE tables' and the mask's batch axis, which may be shared)."""
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    size = {"B": batch, "T": length, "D": config.hidden_size, "H·HD": H * HD, "KV·HD": KV * HD, "H": H,
            "KV": KV, "HD": HD, "S": keys, "1": None, "F": config.intermediate_size, "V": config.vocab_size}
    shape = [size[a] for a in axes_of(name)]
    if kind_of(name) in ("rotary_emb.cos", "rotary_emb.sin", "self_attn.mask"):
        shape[0] = None
    return tuple(shape)


@dataclass(frozen=True)
class Layout:
    """How a recorded array becomes qwen2np's layout: `note` says what was found, `read` converts."""

    note: str
    axes: tuple = None       # a transpose, applied first
    shape: tuple = None      # then a reshape

    def read(self, x):
        if self.axes is not None:
            x = x.transpose(self.axes)
        return x if self.shape is None else x.reshape(self.shape)


def _fits(found, expected):
    return len(found) == len(expected) and all(e is None or f == e for f, e in zip(found, expected))


def _labels(name, found, expected, order):
    """The labels of the found axes, for the note: qwen2np's labels in the order found."""
    labels = list(axes_of(name))
    return "[" + ", ".join(labels[i] for i in order) + "]"


def conform(name, found, expected):
    """The Layout that reads an array of shape `found` as `expected` (None entries: any size), or None
    when none does. Identity when the shapes agree; then, in order: qwen2np's layout with its merged heads
    split ([B, T, H, HD] for [B, T, H·HD]) or head-major ([B, H, T, HD]), the batch axis left out, and
    any permutation of the axes that is the only one to fit."""
    found, expected = tuple(found), tuple(expected)
    if _fits(found, expected):
        return Layout("")
    labels = axes_of(name)
    if len(labels) != len(expected):
        return None
    target = tuple(found[i] if e is None else e for i, e in enumerate(expected)) if len(found) == len(expected) \
        else None
    split = _SPLIT.get(labels[-1])
    if split and len(found) == len(expected) + 1 and None not in expected:
        heads = expected[-1] // found[-1] if found[-1] else 0
        if found[:2] == expected[:2] and found[2] == heads and heads * found[-1] == expected[-1]:
            return Layout(f"stored [{labels[0]}, {labels[1]}, {split[0]}, {split[1]}]", shape=expected)
        if found[0] == expected[0] and found[2] == expected[1] and found[1] * found[3] == expected[2]:
            return Layout(f"stored [{labels[0]}, {split[0]}, {labels[1]}, {split[1]}]", axes=(0, 2, 1, 3),
                          shape=expected)
    if len(found) == len(expected) - 1 and expected[0] in (1, None) and _fits((1, *found), expected):
        return Layout(f"stored without the batch axis [{', '.join(labels[1:])}]", shape=(1, *found))
    if target is None:
        return None
    fitting = [p for p in itertools.permutations(range(len(found))) if _fits(tuple(found[i] for i in p), expected)]
    preferred = (0, 2, 1, 3)     # token-first, every framework's own layout of per-head tensors
    if preferred in fitting:
        fitting = [preferred]
    if len(fitting) != 1:
        return None
    order = fitting[0]
    # found axis order[i] holds expected axis i: the labels found are those of the inverse permutation
    inverse = np.argsort(order).tolist()
    return Layout(f"stored {_labels(name, found, expected, inverse)}", axes=order)


class _Read:
    """A mapping of a dump's tensors, each read through its Layout when it has one (lazily: memory maps
    stay memory maps until a recipe reads them)."""

    def __init__(self, tensors, layouts):
        self._tensors, self._layouts = tensors, layouts

    def __contains__(self, key):
        return key in self._tensors

    def __getitem__(self, key):
        x = self._tensors[key]
        return self._layouts[key].read(x) if key in self._layouts else x

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def keys(self):
        return self._tensors.keys()


def normalised(dump, config, dump_class):
    """(a view of `dump` in qwen2np's layouts, {kind: note}). Raises ValueError naming the first tensor
    whose shape no layout explains (an architecture other than `config`'s)."""
    batch = dump.input_ids.shape[0]
    layouts, notes, manifest = {}, {}, {**dump.manifest, "passes": []}
    for index, p in enumerate(dump.passes):
        length = len(p["positions"]) if p.get("positions") is not None else p["length"]
        entries = []
        for t in p["tensors"]:
            expected = expected_shape(t["name"], config, batch, length)
            layout = conform(t["name"], t["shape"], expected)
            if layout is None:
                raise ValueError(f"{t['key']}: A records shape {t['shape']}, the model makes "
                                 f"{['S' if e is None else e for e in expected]} ({_sizes(t['name'], config)})")
            if layout.note:
                layouts[t["key"]] = layout
                notes.setdefault(kind_of(t["name"]), layout.note)
                shape = list(layout.read(np.empty(t["shape"], dtype=np.bool_)).shape)
                t = {**t, "shape": shape}
            entries.append(t)
        manifest["passes"].append({**p, "tensors": entries})
    if not layouts:
        return dump, {}
    return dump_class(manifest, _Read(dump.tensors, layouts), dump.folder), notes


def _sizes(name, config):
    """The config's sizes that make the shape of `name`, for an error message."""
    fields = {"D": "hidden_size", "H·HD": "num_attention_heads × head_dim",
              "KV·HD": "num_key_value_heads × head_dim",
              "H": "num_attention_heads", "KV": "num_key_value_heads", "HD": "head_dim", "F": "intermediate_size",
              "V": "vocab_size"}
    return ", ".join(f"{fields[a]} {_size(a, config)}" for a in axes_of(name) if a in fields)


def _size(axis, config):
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    return {"D": config.hidden_size, "H·HD": H * HD, "KV·HD": KV * HD, "H": H, "KV": KV, "HD": HD,
            "F": config.intermediate_size, "V": config.vocab_size}[axis]


# -- scores recorded after the mask -------------------------------------------------------------------


def masked_scores(x, hidden, dtype):
    """For recorded scores `x` and the keys the mask hides (`hidden`, boolean, broadcastable): the
    elements to compare (the keys not hidden), when `x` holds −inf or at most half of `finfo(dtype).min`
    exactly where keys are hidden (scores taken after the mask); None when it does not."""
    floor = float(np.finfo(np.float32 if dtype in ("bfloat16", "float64") else dtype).min) / 2
    x = np.asarray(x)
    masked = np.isneginf(x) | (x <= floor)
    if not masked.any():
        return None
    hidden = np.broadcast_to(hidden, x.shape)
    if not np.array_equal(masked, hidden):
        return None
    return ~hidden


# -- arguments in the other order ---------------------------------------------------------------------


def is_qwen2np(dump):
    """Whether a dump was written by qwen2np itself (`qwen2np dump`, record_dump)."""
    return bool(re.match(r"qwen2np \d", str(dump.manifest.get("producer", ""))))


def swapped(a, b):
    """Whether `compare A B` was given the reference first: A written by qwen2np, B by something else."""
    return b is not None and is_qwen2np(a) and not is_qwen2np(b)





