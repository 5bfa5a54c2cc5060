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

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import DumpError
from ..weights.backend import to_numpy
from ..weights.store import StoredWeight
from .fingerprint import weight_digest
from .rounding import HALF, round_weight

# weights checked against the fingerprint up front: another checkpoint is refused before any work
_SAMPLE = 12


class HostWeight:
    """A weight read into NumPy a block of rows at a time (`w[r0:r1]`, or rows by id: `w[ids]`), rounded to
    `held` ("bfloat16", "float16"; None: as it is). With `digest` (A's sha256 of it, docs/dump-format.md),
    it checks itself as it is read: rows read in order feed the hash, so that a weight converted per use
    is converted once for both the check and the recomputation; any other first read checks it whole."""

    def __init__(self, name, weight, held=None, digest=None):
        self.name, self.weight, self.held, self.digest = name, weight, held, digest
        self.shape = tuple(weight.shape)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.matches = None                  # None: not checked (yet); then whether it equals A's
        self._hash, self._next = hashlib.sha256(), 0

    def __getitem__(self, index):
        rows = self._read(index)
        if self.digest is not None and self.matches is None:
            r0, r1 = index.indices(self.shape[0])[:2] if isinstance(index, slice) else (None, None)
            if r0 == self._next and index.step in (None, 1):
                self._hash.update(np.ascontiguousarray(rows, dtype="<f4").data)
                self._next = r1
                if r1 >= self.shape[0]:
                    self.matches = self._hash.hexdigest() == self.digest
            else:
                self.check()
        return rows

    def _read(self, index):
        w = self.weight
        if isinstance(index, slice) and isinstance(w, StoredWeight):
            r0, r1, _ = index.indices(self.shape[0])
            rows = w.rows(r0, r1)
        else:
            rows = to_numpy(w[index])
        return rows if self.held is None else round_weight(rows, self.held)

    def check(self, held="as set"):
        """Whether the whole weight, held as set (or as `held`), equals A's digest."""
        way = self.held if held == "as set" else held
        values = to_numpy(np.asarray(self.weight))
        equal = weight_digest(values if way is None else round_weight(values, way)) == self.digest
        if held == "as set":
            self.matches = equal
        return equal


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


@dataclass
class PortWeights:
    """The model's weights as the port holds them, and what A's fingerprint says of them."""

    weights: dict                         # name -> HostWeight
    notes: list
    differ: dict = field(default_factory=dict)    # name -> why it is not the port's
    method: str = ""
    ways: tuple = ()                      # how a weight may be held: (rounded to the dump's dtype, as loaded)

    def settle(self):
        """After the recomputation: the weights checked as they were read, in the notes; a weight held the
        other way than assumed (as loaded among rounded ones) said, and any that differ listed."""
        late = [w for w in self.weights.values() if w.matches is False and w.name not in self.differ]
        for w in late:
            other = next((way for way in self.ways if way != w.held and w.check(way)), "none")
            self.differ[w.name] = ("differs from A's fingerprint" if other == "none" else
                                   f"held {'as loaded' if other is None else 'rounded to ' + other} by the port, "
                                   f"recomputed {'as loaded' if w.held is None else 'rounded to ' + w.held}")
        unread = [w.name for w in self.weights.values() if w.digest is not None and w.matches is None]
        if self.differ:
            self.notes.append(
                f"your port's weights differ from the checkpoint in {len(self.differ)} of {len(self.weights)}: "
                + ", ".join(f"{n} ({why})" for n, why in list(self.differ.items())[:6])
                + (", …" if len(self.differ) > 6 else "") + ": a conversion bug? the operations that read them are "
                "marked")
        if unread:
            self.notes.append(f"{len(unread)} weights were not checked against A's fingerprint: no operation isolated "
                              f"reads them whole (e.g. {unread[0]})")
        checked = [w for w in self.weights.values() if w.matches is not None]
        if self.method and len(checked) > 2 * _SAMPLE and sum(not w.matches for w in checked) > len(checked) // 2:
            raise DumpError(f"the model's weights are not the ones A ran with: {sum(not w.matches for w in checked)} "
                            f"of the {len(checked)} weights checked differ from A's fingerprint; give --model the "
                            f"port's own checkpoint")


def port_weights(model, dump):
    """PortWeights: the model's weights as the port holds them, checked against the dump's
    `weights_fingerprint`: a sample of small ones now, each of the others as the recomputation reads it.

    A half-precision port holds each weight rounded to its dtype (or, some, as they are): the sample is
    matched as it is and rounded, and the others held the way the sample is. DumpError when the
    fingerprint is of another checkpoint (none of the sample, or fewer than half of them, match).
    """
    weights = model.state_dict()
    fp = (dump.manifest.get("model") or {}).get("weights_fingerprint")
    ways = (dump.dtype, None) if dump.dtype in HALF else (None,)
    if not fp or not fp.get("tensors"):
        label = f"rounded to {ways[0]}" if ways[0] else "as loaded"
        return PortWeights({n: HostWeight(n, w, ways[0]) for n, w in weights.items()},
                           [f"A records no weights fingerprint: the model's weights {label} are assumed to be the "
                            f"ones it ran with"])
    method, digests = fp.get("method", "sha256-f32"), fp["tensors"]
    tied = "lm_head.weight" not in digests and getattr(model.config, "tie_word_embeddings", False)
    common = [n for n in weights if n in digests]
    if not common:
        raise DumpError(f"A's weights fingerprint names none of the model's weights (e.g. {sorted(digests)[:2]}): "
                        f"give --model the port's own checkpoint")
    held, differ, preferred = {}, {}, ways[0]
    for name in _sample(common, weights, method):
        for way in [preferred] + [w for w in ways if w != preferred]:
            w = to_numpy(np.asarray(weights[name]))
            if weight_digest(w if way is None else round_weight(w, way), method) == digests[name]:
                held[name] = preferred = way
                break
        else:
            held[name] = preferred
            differ[name] = "differs from A's fingerprint"
    if len(differ) == len(held) or len(differ) > len(held) // 2:
        raise DumpError(f"the model's weights are not the ones A ran with: {len(differ)} of the {len(held)} weights "
                        f"checked differ from A's fingerprint (e.g. {next(iter(differ))}; tried as loaded"
                        f"{' and rounded to ' + dump.dtype if dump.dtype in HALF else ''}); give --model the port's "
                        f"own checkpoint")
    for name in weights:
        if name not in digests and not (tied and name == "lm_head.weight"):
            differ[name] = "not in A's fingerprint"
    extra = sorted(n for n in digests if n not in weights)
    notes = [_weights_note(held, method, len(weights))]
    if extra:
        notes.append(f"A's fingerprint has weights the model does not: {', '.join(extra[:4])}"
                     f"{', …' if len(extra) > 4 else ''}")
    # the others: checked as they are read (the sampled method hashes scattered blocks: checked whole)
    lazy = method == "sha256-f32"
    hosts = {}
    for n, w in weights.items():
        digest = digests.get("model.embed_tokens.weight" if tied and n == "lm_head.weight" else n)
        host = HostWeight(n, w, held.get(n, preferred), None if n in held or n in differ else digest)
        if n in held:
            host.matches = n not in differ
        elif host.digest is not None and not lazy:
            host.check()
        hosts[n] = host
    return PortWeights(hosts, notes, differ, method, ways)


def _sample(names, weights, method):
    """The weights checked up front: a dozen small ones, spread over the smaller half by size (cheap to
    convert, yet not only the norms, which a random model holds at one)."""
    by_size = sorted(names, key=lambda n: (int(np.prod(weights[n].shape)), n))[:max(1, len(names) // 2)]
    if len(by_size) <= _SAMPLE:
        return by_size
    return [by_size[(i * (len(by_size) - 1)) // (_SAMPLE - 1)] for i in range(_SAMPLE)]


def _weights_note(held, method, count):
    ways = sorted({w or "" for w in held.values()})
    label = "rounded to " + ways[0] if ways == [ways[0]] and ways[0] else "as loaded" if len(ways) == 1 else \
        "some as loaded, some rounded to " + ways[-1]
    return (f"weights: the model's, {label}, checked against A's fingerprint ({method}, {count} weights: "
            f"{len(held)} up front, the others as they are read)")
