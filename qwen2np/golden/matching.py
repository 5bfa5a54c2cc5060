"""Is the model the one the port ran? Checked before isolation recomputes anything: the token ids against its
vocabulary, the dump's shapes against its architecture, and its weights against the dump's fingerprint.

A port whose weights differ from the checkpoint in a few tensors (a weight lost or mangled in its own
conversion) is still isolated: the weights that differ are listed, and the operations that read them are
marked ("your port's weights differ from the checkpoint: a conversion bug?"). Only a dump whose weights
are not those of this checkpoint at all, or of another architecture, is refused: then --model must name
the port's own checkpoint.

The weights are read through `HostWeight`, a block of rows at a time, whatever holds them: an array kept in
memory, a weight converted per use from its file (weights.store.StoredWeight, under a memory budget), an
array on the GPU; each rounded to the dtype the port holds it in.
"""

import re

import numpy as np

from ..errors import DumpError
from ..weights.backend import to_numpy
from ..weights.store import StoredWeight
from .fingerprint import weight_digest
from .rounding import HALF, round_weight

# a fingerprint that matches none of its first weights is another checkpoint (no need to hash the rest)
_SAMPLE = 12


class HostWeight:
    """A weight read into NumPy a block of rows at a time (`w[r0:r1]`, or rows by id: `w[ids]`), rounded to
    `held` ("bfloat16", "float16"; None: as it is)."""

    def __init__(self, name, weight, held=None):
        self.name, self.weight, self.held = name, weight, held
        self.shape = tuple(weight.shape)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))

    def __getitem__(self, index):
        w = self.weight
        if isinstance(index, slice) and isinstance(w, StoredWeight):
            r0, r1, _ = index.indices(self.shape[0])
            rows = w.rows(r0, r1)
        else:
            rows = to_numpy(w[index])
        return rows if self.held is None else round_weight(rows, self.held)

    def whole(self):
        """The whole weight as a NumPy array (as the port holds it)."""
        return self[:]


def check_input_ids(dump, config):
    """Every token id of the dump is a row of the model's embedding: [0, vocab_size)."""
    ids = dump.input_ids
    bad = np.argwhere((ids < 0) | (ids >= config.vocab_size))
    if bad.size:
        row, position = bad[0].tolist()
        raise DumpError(f"{_where(dump)}input_ids[{row}][{position}] = {ids[row, position]}: expected a token "
                        f"id in [0, {config.vocab_size}) (the model's vocabulary); a negative id would silently "
                        f"read a row from the end of the embedding")


def check_layers(dump, config):
    """The dump's layers are the model's: "A has 3 layers, the model 2"."""
    layers = {int(m.group(1)) for _, t in dump.entries() for m in [re.match(r"(?:model\.)?layers\.(\d+)", t["name"])]
              if m}
    declared = ((dump.manifest.get("model") or {}).get("config") or {}).get("num_hidden_layers")
    L = config.num_hidden_layers
    if (layers and max(layers) >= L) or (isinstance(declared, int) and declared != L):
        has = declared if isinstance(declared, int) else f"at least {max(layers) + 1}"
        raise DumpError(f"{_where(dump)}A has {has} layers, the model {L}: A ran another architecture; "
                        f"give --model the port's own checkpoint")


def _where(dump):
    return f"{dump.folder}: " if dump.folder else ""


def port_weights(model, dump):
    """({name: HostWeight}, notes, differing {name: why}): the model's weights as the port holds them, checked
    one by one against the dump's `weights_fingerprint`.

    A half-precision port holds each weight rounded to its dtype (or, some, as they are): each weight is
    matched as it is and rounded, and held the way that matches. DumpError when the fingerprint is of
    another checkpoint (none of the first weights, or fewer than half of them, match).
    """
    weights = model.state_dict()
    fp = (dump.manifest.get("model") or {}).get("weights_fingerprint")
    ways = [dump.dtype, None] if dump.dtype in HALF else [None]
    if not fp or not fp.get("tensors"):
        label = f"rounded to {ways[0]}" if ways[0] else "as loaded"
        return ({n: HostWeight(n, w, ways[0]) for n, w in weights.items()},
                [f"A records no weights fingerprint: the model's weights {label} are assumed to be the ones it "
                 f"ran with"], {})
    method, digests = fp.get("method", "sha256-f32"), fp["tensors"]
    tied = "lm_head.weight" not in digests and getattr(model.config, "tie_word_embeddings", False)
    common = sorted(n for n in weights if n in digests)
    if not common:
        raise DumpError(f"A's weights fingerprint names none of the model's weights (e.g. {sorted(digests)[:2]}): "
                        f"give --model the port's own checkpoint")
    held, differ, preferred = {}, {}, ways[0]
    for i, name in enumerate(common):
        for way in [preferred] + [w for w in ways if w != preferred]:
            w = weights[name] if way is None else round_weight(weights[name], way)
            if weight_digest(w, method) == digests[name]:
                held[name] = preferred = way
                break
        else:
            held[name] = preferred
            differ[name] = "differs from A's fingerprint"
        if i + 1 == _SAMPLE and len(differ) == i + 1:
            break
    if len(differ) == len(held) or len(differ) > len(common) // 2:
        raise DumpError(f"the model's weights are not the ones A ran with: {len(differ)} of the {len(held)} weights "
                        f"checked differ from A's fingerprint (e.g. {next(iter(differ))}; tried as loaded"
                        f"{' and rounded to ' + dump.dtype if dump.dtype in HALF else ''}); give --model the port's "
                        f"own checkpoint")
    lost = [n for n in weights if n not in digests and not (tied and n == "lm_head.weight")]
    for name in lost:
        differ[name] = "not in A's fingerprint"
    extra = sorted(n for n in digests if n not in weights)
    notes = [_weights_note(held, method, len(weights), len(differ))]
    if differ:
        notes.append(f"your port's weights differ from the checkpoint in {len(differ)} of {len(weights)}: "
                     + ", ".join(f"{n} ({why})" for n, why in list(differ.items())[:6]) + (", …" if len(differ) > 6 else "")
                     + ": a conversion bug? the operations that read them are marked")
    if extra:
        notes.append(f"A's fingerprint has weights the model does not: {', '.join(extra[:4])}"
                     f"{', …' if len(extra) > 4 else ''}")
    way_of = {n: held.get(n, preferred) for n in weights}
    if tied:
        way_of["lm_head.weight"] = way_of.get("model.embed_tokens.weight", preferred)
    return {n: HostWeight(n, w, way_of[n]) for n, w in weights.items()}, notes, differ


def _weights_note(held, method, count, differing):
    ways = sorted({w or "" for w in held.values()})
    label = ", ".join(f"{sum((w or '') == way for w in held.values())} rounded to {way}" if way else
                      f"{sum(w is None for w in held.values())} as loaded" for way in ways)
    if len(ways) == 1:
        label = f"rounded to {ways[0]}" if ways[0] else "as loaded"
    but = f" but for {differing} (below)" if differing else ""
    return f"weights: the model's, {label}, equal to A's{but} (fingerprint {method}, {count} weights)"
