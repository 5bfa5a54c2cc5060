"""Named intermediates: record or edit any tensor of the forward pass by its dotted name.

Every intermediate of the forward pass goes through `tap(scope, name, x)`, which returns `x` untouched
unless a `Trace` is active. Names follow the checkpoint's module names (`model.layers.3.self_attn.q_proj`);
docs/intermediates.md lists them all with their shapes.

>>> import numpy as np
>>> with Trace(None, "demo.*") as t:
...     y = tap("demo", "double", np.arange(3) * 2)
>>> t["demo.double"].tolist()
[0, 2, 4]

Edits replace a tensor on its way through the forward pass (zero an attention head, patch an activation
from another prompt):

>>> with Trace(None, edits={"demo.double": lambda x: x + 1}) as t:
...     y = tap("demo", "double", np.arange(3) * 2)
>>> y.tolist()
[1, 3, 5]
"""

import fnmatch

_active = []  # the traces entered and not yet left, innermost last


def tap(scope, name, x):
    """Pass the intermediate `scope.name` (or `scope` when name is None) through the active traces.

    Free when no trace is active: the name is only joined when someone listens.
    """
    if not _active:
        return x
    full_name = scope if name is None else f"{scope}.{name}" if scope else name
    for t in _active:
        x = t._visit(full_name, x)
    return x


class Trace:
    """Records the tensors whose names match `patterns` (fnmatch globs) and applies `edits`.

    `edits` maps a glob to a function `f(x)` (or `f(x, name)`, when `pass_name=True`) returning the
    replacement; it must keep the shape and dtype. `t[name]` is the tensor from the latest forward pass;
    `t.history(name)` gives one per forward pass (prefill, then each decode step).
    """

    def __init__(self, model, *patterns, edits=None, pass_name=False):
        self.model = model
        self.patterns = list(patterns)
        self.edits = dict(edits or {})
        self.pass_name = pass_name
        self.records = {}  # name -> [tensor per forward pass], in the order first seen
        known = model.intermediate_names() if hasattr(model, "intermediate_names") else None
        if known is not None:
            for p in self.patterns + list(self.edits):
                if not fnmatch.filter(known, p):
                    raise KeyError(
                        f"trace pattern {p!r} matches no intermediate of this model; "
                        f"names look like {known[1]!r} (docs/intermediates.md lists them)"
                    )

    def __enter__(self):
        _active.append(self)
        return self

    def __exit__(self, *exc):
        _active.remove(self)
        return False

    def _visit(self, name, x):
        for pattern, edit in self.edits.items():
            if fnmatch.fnmatchcase(name, pattern):
                new = edit(x, name) if self.pass_name else edit(x)
                if new.shape != x.shape or new.dtype != x.dtype:
                    raise ValueError(
                        f"edit of {name} must keep shape {x.shape} and dtype {x.dtype}, "
                        f"got {new.shape} {new.dtype}"
                    )
                x = new
        if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            # a copy: the forward pass may reuse the buffer of `x` in place afterwards
            self.records.setdefault(name, []).append(x.copy())
        return x

    def __getitem__(self, name):
        if name not in self.records:
            raise KeyError(f"{name} was not recorded; recorded: {', '.join(self.records) or 'nothing'}")
        return self.records[name][-1]

    def __contains__(self, name):
        return name in self.records

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def names(self):
        """The recorded names, in the order the forward pass produced them."""
        return list(self.records)

    def history(self, name):
        """One tensor per forward pass run inside the trace, in call order."""
        return list(self.records[name])


def trace(model, *patterns, edits=None, pass_name=False):
    """Record the intermediates of `model` whose names match the glob `patterns` (all when none given
    and no edits), applying `edits` on the way. Use as ``with trace(model, "model.layers.3.*") as t:``.
    """
    if not patterns and not edits:
        patterns = ("*",)
    return Trace(model, *patterns, edits=edits, pass_name=pass_name)
