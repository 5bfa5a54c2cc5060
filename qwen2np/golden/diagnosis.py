"""After isolation: what each root cause is, which failures are only a layout in the dump, and the verdict
joined with a comparison.

* **The porting mistake.** Each root cause is replayed through catalogue.py's known mistakes for its kind,
  on the port's own inputs and in its rounding orders; the first replay the policy accepts names it
  ("reproduced exactly by KV head h % KV (tile) instead of h // G").
* **A layout in the dump.** A tensor reproduced by a layout mistake (heads merged (HD, H)) may be stored so
  in the dump while the port computed with the right layout: its consumers then fail on the tensor as
  recorded and pass on it restored. Then it is no root cause and neither are they: a layout mistake in
  the dump, not a bug in the port.
* **The joint verdict** (`explain`) sorts the comparison's failures: root causes; probable root causes (the
  first failure in forward order that could not be isolated: never an "ok", never "inherits"); failures
  that inherit an error from upstream; those with no upstream at all (they agree with their
  recomputation from the config, so B differs there); and those that accumulate, when nothing upstream
  is wrong.
"""

from dataclasses import dataclass, field

import numpy as np

from .catalogue import mistakes_for
from .recipes import NotIsolated
from .tolerances import kind_of

# root causes of one kind tried, each against every entry, before the catalogue gives up on that kind
_GIVE_UP = 3


def diagnose(isolation, ops, learned, judge, catalogue=True):
    """Name the mistake behind each root cause (with `catalogue`) and recognise layouts in the dump.
    `judge(check, expected)` measures a recomputation into a check and applies the policy.

    Kind by kind: every entry is replayed on the first root cause some entry reproduces; when several do,
    they are ranked by how many of the kind's other root causes they reproduce, then by how many of its
    passing tensors they leave right (a global mistake must not break them), so that "sliding windows on
    the wrong layers" is told from "a sliding window everywhere". Each root cause then gets the first
    entry, in that ranking, that reproduces it."""
    if not catalogue:
        return isolation
    kinds = {}
    for c in isolation.root_causes:
        if not c.mistake:
            kinds.setdefault(kind_of(c.name), []).append(c)
    for kind, checks in kinds.items():
        entries = mistakes_for(kind, ops.config)
        ranked, score = None, {}
        for c in checks[:_GIVE_UP]:
            found = [m for m in entries if reproduces(ops, m, c, learned, judge)]
            if found:
                found, score = _ranked(found, checks, [p for p in isolation.checks if p.ok and kind_of(p.name) == kind],
                                       ops, learned, judge)
                ranked = found + [m for m in entries if m not in found]
                break
        for c in checks if ranked else ():
            m = next((m for m in ranked if reproduces(ops, m, c, learned, judge)), None)
            if m is None:
                continue
            c.mistake = m.says
            tied = list(dict.fromkeys(t.says for t in found if t.says != m.says and score.get(t.name) == score.get(
                m.name) and reproduces(ops, t, c, learned, judge)))
            if tied:        # as good an explanation on this port: say so
                c.mistake += f" (or, as well: {'; '.join(tied)})"
            if m.restore is not None:
                _layout_or_bug(isolation, ops, c, m, learned, judge)
    return isolation


def _ranked(found, roots, passing, ops, learned, judge):
    """(the entries `found` ranked, {name: score}): the ones explaining the most root causes of the kind first,
    then those that leave the most passing tensors of the kind right (a sample of each, in other layers)."""
    if len(found) == 1:
        return found, {}

    def sample(checks):
        layers, out = set(), []
        for c in checks:
            layer = ops.operation(c.name)[0]
            if layer not in layers and len(out) < 3:
                layers.add(layer)
                out.append(c)
        return out

    others, right = sample(roots[1:]), sample(passing)
    score = {m.name: (sum(reproduces(ops, m, c, learned, judge) for c in others),
                      sum(reproduces(ops, m, c, learned, judge, unchanged=True) for c in right)) for m in found}
    return sorted(found, key=lambda m: (-score[m.name][0], -score[m.name][1])), score


def reproduces(ops, mistake, check, learned, judge, unchanged=False):
    """Whether the replay of `mistake` on `check`'s inputs agrees with the port's output under the policy
    (`unchanged`: a replay that does not apply counts as agreeing)."""
    layer = ops.operation(check.name)[0]
    if mistake.unless and all(ops.has(ops.input_name(n, layer), check.pass_index) for n in mistake.unless):
        return unchanged
    ops.used = []
    try:
        expected = ops.expected(check.name, check.pass_index, learned, (mistake.compute, mistake.inputs,
                                                                        mistake.weights))
        if expected is None:
            return unchanged
        trial = judge(check, expected)
        # an exact kind (the embedding) replayed in float64 is not the port's float32 to the bit
        return bool(trial.ok or trial.limit == "rel ≤ 0.0e+00" and trial.rel <= 1e-6)
    except (NotIsolated, KeyError, ValueError, IndexError):   # inputs it lacks; a shape it cannot make
        return unchanged


def _layout_or_bug(isolation, ops, check, mistake, learned, judge):
    """`check` is reproduced by a layout (`mistake.restore`): ask its consumers which layout the port used."""
    consumers = [c for c in isolation.checks if check.key in c.inputs and c.ok is not None]
    if not consumers:
        check.notes.append("or only its layout in the dump: record its consumer too, to tell")
        return
    ctx = ops.context(check.name, check.pass_index, ops.operation(check.name)[0])
    ops.substitutes[check.key] = mistake.restore(ctx, np.asarray(ops.dump[check.key], dtype=np.float64))
    try:
        trials = []
        for c in consumers:
            ops.used = []
            trials.append(judge(c, ops.expected(c.name, c.pass_index, learned)))
    finally:
        ops.substitutes.pop(check.key)
    if all(t.ok for t in trials) and not all(c.ok for c in consumers):
        check.ok = True
        check.layout = (f"stored {_layout_words(mistake)} in the dump; the port computed with qwen2np's layout "
                        f"({', '.join(c.key for c in consumers[:2])} agree{'s' * (len(consumers) == 1)} with it "
                        f"restored)")
        for c, t in zip(consumers, trials):
            _adopt(c, t)
            c.notes.append(f"recomputed from {check.key} in the port's own layout")


def _layout_words(mistake):
    return {"merged (HD, H)": "with its heads merged (HD, H)"}.get(mistake.name, "token-first [B, T, heads, HD]")


def _adopt(check, trial):
    for f in ("compared", "max_abs", "rel", "nmse_db", "off", "beyond", "max_ulps", "limit", "ok"):
        setattr(check, f, getattr(trial, f))


# -- the verdict with a comparison --------------------------------------------------------------------


@dataclass
class Explanation:
    """The comparison's failures, sorted by what isolation says of each."""

    root_causes: list = field(default_factory=list)      # wrong on their own inputs
    probable: list = field(default_factory=list)         # (key, why not isolated): first failures not isolated
    dump_layouts: list = field(default_factory=list)     # right values stored in another layout
    inherited: list = field(default_factory=list)        # right on their inputs, a root cause upstream
    downstream: list = field(default_factory=list)       # right on their inputs, a probable root cause upstream
    unknown: list = field(default_factory=list)          # not isolated, after a cause: inherit or not
    no_upstream: list = field(default_factory=list)      # agree with their recomputation, with no recorded input
    accumulated: list = field(default_factory=list)      # right on their inputs, nothing wrong upstream

    @property
    def ok(self):
        return not (self.root_causes or self.probable or self.inherited or self.downstream or self.unknown
                    or self.no_upstream or self.accumulated)

    def to_json(self):
        return {"root_causes": self.root_causes, "probable_root_causes": [{"key": k, "not_isolated": why}
                                                                          for k, why in self.probable],
                "dump_layouts": self.dump_layouts, "inherited": len(self.inherited),
                "downstream_of_probable": len(self.downstream), "unknown": self.unknown,
                "no_upstream": self.no_upstream, "accumulated": self.accumulated}


def explain(isolation, comparison):
    """Each tensor out of tolerance against the reference, in forward order, said for what it is."""
    e = Explanation()
    checks = {c.key: c for c in isolation.checks}
    order = {c.key: i for i, c in enumerate(isolation.checks)}
    causes = sorted(order[c.key] for c in isolation.root_causes)
    for t in comparison.tensors:
        if t.ok:
            continue
        c = checks.get(t.key)
        cause = bool(causes and causes[0] < order.get(t.key, 0))
        if c is None or c.ok is None:
            if cause or e.probable:
                e.unknown.append(t.key)
            else:
                e.probable.append((t.key, c.missing if c else "not in A's isolation"))
        elif c.ok is False:
            e.root_causes.append(t.key)
        elif c.layout:
            e.dump_layouts.append(t.key)
        elif not c.inputs:
            e.no_upstream.append(t.key)
        elif cause:
            e.inherited.append(t.key)
        elif e.probable:
            e.downstream.append(t.key)
        else:
            e.accumulated.append(t.key)
    return e
