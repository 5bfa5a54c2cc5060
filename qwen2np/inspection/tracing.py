"""Named intermediates: record or edit any tensor of the forward pass by its dotted name.

Every intermediate of the forward pass goes through `tap(scope, name, x)`, which returns `x` untouched
unless a `Trace` is active. Names follow the checkpoint's module names (`model.layers.3.self_attn.q_proj`);
docs/intermediates.md lists them all with their shapes, docs/inspection.md shows how to use them.

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

A trace belongs to the model it was opened on and to the thread (more exactly, the `contextvars`
context) that entered it: a forward pass of another model, or of the same model in another thread, is
neither recorded nor edited. `Trace(None, …)` listens to every model, still only in its own context.
"""

import contextvars
import fnmatch
import functools

import numpy as np

from ..errors import IntermediateNameError, TraceError
from ..weights.backend import array_module
from .names import gradient_names, position_axes

# subtle: context variables, not module globals, so that a trace entered in one thread (or asyncio task)
# is invisible to forward passes running in another (docs/inspection.md, "Scope")
_active = contextvars.ContextVar("qwen2np_traces", default=())     # traces entered, innermost last
_running = contextvars.ContextVar("qwen2np_running", default=())   # models whose forward pass is running


def tap(scope, name, x, rows=None):
    """Pass the intermediate `scope.name` (or `scope` when name is None) through the traces listening to
    the running model in this context. `rows` says which query rows of the forward pass `x` holds along
    its position axis when that is not all of them (the kept logits, the attention probabilities of the
    rows a trace keeps: `recorded_rows`).

    Free when no trace is active: the name is only joined when someone listens.
    """
    traces = _active.get()
    if not traces:
        return x
    full_name = None
    for t in _listening(traces):
        full_name = full_name or (scope if name is None else f"{scope}.{name}" if scope else name)
        x = t._visit(full_name, x, rows)
    return x


def recorded_rows(scope, names, num_rows):
    """Which query rows of the intermediates `scope.<names>` the traces listening now need: None when
    none records or edits any of them; all `num_rows` (a range) when one needs them whole (an edit, or a
    trace that keeps every position); else the sorted rows the traces keep (`Trace.positions`).

    For intermediates too big to make whole for a long prompt (the [B, H, T, S] attention probabilities):
    the forward pass makes only these rows for the trace (qwen2np/model/attention.py).

    >>> recorded_rows("demo", ["probs"], 8) is None
    True
    >>> with Trace(None, "demo.probs", positions=[5, 7, 9]):
    ...     recorded_rows("demo", ["probs"], 8)
    [5, 7]
    """
    traces = _active.get()
    if not traces:
        return None
    full = [f"{scope}.{n}" if scope else n for n in names]
    wanted = set()
    listening = False
    for t in _listening(traces):
        edits = any(fnmatch.fnmatchcase(f, p) for f in full for p in t.edits)
        records = any(fnmatch.fnmatchcase(f, p) for f in full for p in t.patterns)
        if edits or (records and t.positions is None):
            return range(num_rows)
        if records:
            listening = True
            wanted.update(r for r in t.positions if r < num_rows)
    return sorted(wanted) if listening else None


def listens(scope, name):
    """True when a trace active in this context, for the running model, records or edits `scope.name`.

    For intermediates that cost something to make and that the forward pass does not need
    (`self_attn.head_out`): they are computed only when someone listens. One context-variable read when
    no trace is active.

    >>> listens("demo", "double")
    False
    >>> with Trace(None, "demo.*"):
    ...     listens("demo", "double"), listens("other", "double")
    (True, False)
    """
    traces = _active.get()
    if not traces:
        return False
    full_name = scope if name is None else f"{scope}.{name}" if scope else name
    return any(t._matches(full_name) for t in _listening(traces))


def edited(scope, name):
    """True when a trace active in this context, for the running model, edits `scope.name` (value_and_grad
    refuses to differentiate through an edit of the forward pass)."""
    traces = _active.get()
    if not traces:
        return False
    full_name = scope if name is None else f"{scope}.{name}" if scope else name
    return any(fnmatch.fnmatchcase(full_name, p) for t in _listening(traces) for p in t.edits)


class quiet:
    """Within, no trace sees any intermediate: for a forward pass run again, whose tensors the traces
    already saw (the backward pass recomputing a layer, docs/gradients.md)."""

    __slots__ = ("token",)

    def __enter__(self):
        self.token = _active.set(())
        return self

    def __exit__(self, *exc):
        _active.reset(self.token)
        return False


def _listening(traces):
    """The traces (of those entered in this context) that act on the forward pass running now."""
    running = _running.get()
    return [t for t in traces if t.model is None or any(t.model is m for m in running)]


def forward_pass(method):
    """Decorates a model's `__call__`: the forward pass runs marked as `running(model)`."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with running(self):
            return method(self, *args, **kwargs)

    return call


class running:
    """Marks `model` as running for the duration of a forward pass, so that the traces opened on it (and
    only those) see its intermediates. A head running its base model marks both.

    Costs one context-variable read when no trace is active.
    """

    __slots__ = ("model", "token")

    def __init__(self, model):
        self.model = model
        self.token = None

    def __enter__(self):
        if _active.get():
            self.token = _running.set(_running.get() + (self.model,))
        return self

    def __exit__(self, *exc):
        if self.token is not None:
            _running.reset(self.token)
        return False


class Trace:
    """Records the tensors whose names match `patterns` (fnmatch globs) and applies `edits`.

    `edits` maps a glob to the replacement: a function `f(x)` (or `f(x, name)`, when `pass_name=True`)
    returning it, or an array. A replacement must keep the shape and dtype. Edits apply before recording,
    so the trace holds what the forward pass actually used. `t[name]` is the tensor from the latest
    forward pass; `t.history(name)` gives one per forward pass (prefill, then each decode step).
    With `sink`, each matched tensor is handed to `sink(name, x)` as it is produced (to be written out
    before the forward pass goes on) and the trace keeps nothing.

    `positions` (query rows of a forward pass: indices >= 0 into its T new positions; None keeps all)
    records only those rows along each tensor's position axis (docs/intermediates.md), and lets the
    forward pass make the [B, H, T, S] attention scores, mask and probabilities for those rows only, so
    that a trace of a long prompt costs what its kept positions cost (qwen2np/model/attention.py). It may
    be changed between forward passes (`qwen2np dump --positions` keeps rows of the prefill only).
    """

    def __init__(self, model, *patterns, edits=None, pass_name=False, sink=None, positions=None):
        self.model = model
        self.sink = sink       # when given, sink(name, x) takes each matched tensor and nothing is kept
        self.positions = positions
        self.patterns = list(patterns)
        self.edits = dict(edits or {})
        self.pass_name = pass_name
        self.records = {}  # name -> [tensor per forward pass], in the order first seen
        known = model.intermediate_names() if hasattr(model, "intermediate_names") else None
        if known is not None:
            known = known + gradient_names(known)     # `name.grad`: its gradient, under value_and_grad
            for p in self.patterns + list(self.edits):
                if not fnmatch.filter(known, p):
                    raise IntermediateNameError(
                        f"trace pattern {p!r} matches no intermediate of this model; "
                        f"names look like {known[3]!r} (docs/intermediates.md lists them)"
                    )

    def __enter__(self):
        _active.set(_active.get() + (self,))
        return self

    def __exit__(self, *exc):
        # by identity, not by token: a trace left out of order (a generator closed late) still leaves
        _active.set(tuple(t for t in _active.get() if t is not self))
        return False

    def _matches(self, name):
        """Whether this trace records or edits `name`."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns) or \
            any(fnmatch.fnmatchcase(name, p) for p in self.edits)

    @property
    def positions(self):
        return self._positions

    @positions.setter
    def positions(self, positions):
        if positions is not None:
            rows = list(positions)
            if not rows or not all(isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_))
                                   and p >= 0 for p in rows):
                raise TraceError(f"positions: expected query rows >= 0 of a forward pass, found {positions!r}")
            positions = sorted({int(p) for p in rows})
        self._positions = positions

    def _visit(self, name, x, rows=None):
        for pattern, edit in self.edits.items():
            if fnmatch.fnmatchcase(name, pattern):
                new = edit if not callable(edit) else edit(x, name) if self.pass_name else edit(x)
                # subtle: a copy, since the forward pass updates some tensors in place after their tap
                # (scores become probs, act is multiplied by up_proj): the caller's array stays as given
                x = x if new is x else _checked(name, x, new).copy()
        if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            kept = self._kept_rows(name, x, rows)
            if self.sink is not None:       # streamed out at once (a dump written as it runs): nothing kept
                self.sink(name, kept)
            else:   # a copy: the forward pass may reuse the buffer of `x` in place afterwards
                self.records.setdefault(name, []).append(kept.copy() if kept is x else kept)
        return x

    def _kept_rows(self, name, x, rows):
        """`x` with only the rows of `self.positions` along its position axis (`x` itself when it keeps all,
        or has no position axis); `rows` are the query rows `x` holds, None for all of them."""
        axis = position_axes(name, x.ndim)[0]
        if self.positions is None or axis is None:
            return x
        held = range(x.shape[axis]) if rows is None else list(rows)
        where = {r: i for i, r in enumerate(held)}
        take = [where[p] for p in self.positions if p in where]
        if len(take) == x.shape[axis]:
            return x
        return array_module(x).take(x, array_module(x).asarray(take, dtype=np.int64), axis=axis)

    def __getitem__(self, name):
        if name not in self.records:
            raise IntermediateNameError(f"{name} was not recorded; recorded: {', '.join(self.records) or 'nothing'}")
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
        self[name]  # the error for a name not recorded
        return list(self.records[name])


def _checked(name, x, new):
    """`new`, if it can stand in for `x` (an array of the same shape and dtype); else a TraceError."""
    if not hasattr(new, "shape") or not hasattr(new, "dtype"):
        raise TraceError(f"edit of {name} must return an array of shape {x.shape} and dtype {x.dtype}, "
                         f"got {type(new).__name__}")
    if new.shape != x.shape or new.dtype != x.dtype:
        raise TraceError(f"edit of {name} must keep shape {x.shape} and dtype {x.dtype}, "
                         f"got {new.shape} {new.dtype}")
    if array_module(new) is not array_module(x):   # a NumPy array into a model on cupy, or the reverse
        raise TraceError(f"edit of {name} must return an array of the model's backend "
                         f"({type(x).__module__.split('.')[0]}), got a {type(new).__module__.split('.')[0]} array")
    return new


def trace(model, *patterns, edits=None, pass_name=False, positions=None):
    """Record the intermediates of `model` whose names match the glob `patterns` (all when none given
    and no edits), applying `edits` on the way. Use as ``with trace(model, "model.layers.3.*") as t:``.

    >>> import numpy as np
    >>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
    >>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
    >>> with trace(model, "model.layers.1.self_attn.probs") as t:
    ...     logits = model(np.array([[1, 2, 3]])).logits
    >>> t["model.layers.1.self_attn.probs"].shape          # [B, H, T, S]
    (1, 4, 3, 3)
    >>> from qwen2np.inspection.edits import zero_head
    >>> with trace(model, edits={"model.layers.1.self_attn.probs": zero_head(2)}) as t:
    ...     edited = model(np.array([[1, 2, 3]])).logits
    >>> bool(np.array_equal(edited, logits))
    False
    """
    if not patterns and not edits:
        patterns = ("*",)
    return Trace(model, *patterns, edits=edits, pass_name=pass_name, positions=positions)


# -- interventions ----------------------------------------------------------------------------------


def active():
    """True while a trace records or edits the running model in this context."""
    traces = _active.get()
    return bool(traces) and bool(_listening(traces))
