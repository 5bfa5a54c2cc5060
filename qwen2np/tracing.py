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

from .backend import array_module
from .errors import IntermediateNameError, TraceError

# subtle: context variables, not module globals, so that a trace entered in one thread (or asyncio task)
# is invisible to forward passes running in another (docs/inspection.md, "Scope")
_active = contextvars.ContextVar("qwen2np_traces", default=())     # traces entered, innermost last
_running = contextvars.ContextVar("qwen2np_running", default=())   # models whose forward pass is running

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


def tap(scope, name, x):
    """Pass the intermediate `scope.name` (or `scope` when name is None) through the traces listening to
    the running model in this context.

    Free when no trace is active: the name is only joined when someone listens.
    """
    traces = _active.get()
    if not traces:
        return x
    full_name = None
    for t in _listening(traces):
        full_name = full_name or (scope if name is None else f"{scope}.{name}" if scope else name)
        x = t._visit(full_name, x)
    return x


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


def position_axes(name, ndim):
    """(T axis, S axis) of the intermediate `name` with `ndim` dimensions; None where it has no such axis.

    T counts the new positions of the forward pass, S the key positions attended over.

    >>> position_axes("model.layers.3.self_attn.probs", 4), position_axes("model.layers.3.mlp.act", 3)
    ((2, 3), (1, None))
    >>> position_axes("logits", 2)    # sequence classification: one row per sequence, no positions
    (None, None)
    """
    last = name.rsplit(".", 1)[-1]
    if last in _HEAD_MAJOR and ndim == 4:
        return 2, (3 if last in _KEY_AXIS else None)
    return (1, None) if ndim >= 3 else (None, None)


class Trace:
    """Records the tensors whose names match `patterns` (fnmatch globs) and applies `edits`.

    `edits` maps a glob to the replacement: a function `f(x)` (or `f(x, name)`, when `pass_name=True`)
    returning it, or an array. A replacement must keep the shape and dtype. Edits apply before recording,
    so the trace holds what the forward pass actually used. `t[name]` is the tensor from the latest
    forward pass; `t.history(name)` gives one per forward pass (prefill, then each decode step).
    With `sink`, each matched tensor is handed to `sink(name, x)` as it is produced (to be written out
    before the forward pass goes on) and the trace keeps nothing.
    """

    def __init__(self, model, *patterns, edits=None, pass_name=False, sink=None):
        self.model = model
        self.sink = sink       # when given, sink(name, x) takes each matched tensor and nothing is kept
        self.patterns = list(patterns)
        self.edits = dict(edits or {})
        self.pass_name = pass_name
        self.records = {}  # name -> [tensor per forward pass], in the order first seen
        known = model.intermediate_names() if hasattr(model, "intermediate_names") else None
        if known is not None:
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

    def _visit(self, name, x):
        for pattern, edit in self.edits.items():
            if fnmatch.fnmatchcase(name, pattern):
                new = edit if not callable(edit) else edit(x, name) if self.pass_name else edit(x)
                # subtle: a copy, since the forward pass updates some tensors in place after their tap
                # (scores become probs, act is multiplied by up_proj): the caller's array stays as given
                x = x if new is x else _checked(name, x, new).copy()
        if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            if self.sink is not None:       # streamed out at once (a dump written as it runs): nothing kept
                self.sink(name, x)
            else:   # a copy: the forward pass may reuse the buffer of `x` in place afterwards
                self.records.setdefault(name, []).append(x.copy())
        return x

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


def trace(model, *patterns, edits=None, pass_name=False):
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
    >>> with trace(model, edits={"model.layers.1.self_attn.probs": zero_head(2)}) as t:
    ...     edited = model(np.array([[1, 2, 3]])).logits
    >>> bool(np.array_equal(edited, logits))
    False
    """
    if not patterns and not edits:
        patterns = ("*",)
    return Trace(model, *patterns, edits=edits, pass_name=pass_name)


# -- interventions ----------------------------------------------------------------------------------


def zero_head(head, head_dim=None):
    """An edit that zeroes query head `head` (or KV head, on k_rope) of a per-head intermediate.

    Tensors with heads split, [B, heads, T, …] (q_rope, k_rope, scores, probs), lose `x[:, head]`;
    zeroed probs make the head's context zero. Tensors with heads merged, [B, T, H·HD] (q_proj, context),
    need `head_dim` and lose the features `head·HD : (head+1)·HD`.

    >>> import numpy as np
    >>> zero_head(1)(np.ones((1, 2, 1, 2), dtype=np.float32))[0, :, 0].tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    >>> zero_head(0, head_dim=2)(np.ones((1, 1, 4), dtype=np.float32)).tolist()
    [[[0.0, 0.0, 1.0, 1.0]]]
    """

    def edit(x, name="this intermediate"):
        if x.ndim == 4:
            heads, where = x.shape[1], (slice(None), head)
        elif x.ndim == 3 and head_dim is not None:
            heads, where = x.shape[2] // head_dim, (Ellipsis, slice(head * head_dim, (head + 1) * head_dim))
        else:
            raise TraceError(f"zero_head({head}) on {name} of shape {x.shape}: expected [B, heads, T, …], or "
                             f"[B, T, H·HD] with head_dim given")
        if not 0 <= head < heads:
            raise TraceError(f"zero_head({head}) on {name} of shape {x.shape}: it has heads 0..{heads - 1}")
        y = x.copy()
        y[where] = 0
        return y

    edit.__qualname__ = f"zero_head({head})"
    return edit


def patch_from(recorded, names, positions=None, step=-1):
    """Edits that substitute tensors recorded in another run: activation patching.

    `recorded` is a Trace of the source run; `names` are intermediate names or globs over its recorded
    names. Each edit replaces the tensor with the recording of forward pass `step` (default: the latest),
    at every position, or only at `positions` (indices along the T axis). Use the result as `edits=`.

    >>> import numpy as np
    >>> with Trace(None, "demo.x") as source:
    ...     _ = tap("demo", "x", np.array([[[1.0], [2.0]]]))          # [B, T, D] = [1, 2, 1]
    >>> with Trace(None, edits=patch_from(source, ["demo.x"], positions=[1])):
    ...     patched = tap("demo", "x", np.zeros((1, 2, 1)))
    >>> patched[0, :, 0].tolist()
    [0.0, 2.0]
    """
    names = [names] if isinstance(names, str) else list(names)
    edits = {}
    for pattern in names:
        matched = fnmatch.filter(recorded.names(), pattern)
        if not matched:
            raise IntermediateNameError(f"patch_from: {pattern!r} matches nothing the source trace recorded; "
                                        f"recorded: {', '.join(recorded.names()) or 'nothing'}")
        for name in matched:
            history = recorded.history(name)
            if not -len(history) <= step < len(history):
                raise TraceError(f"patch_from({name!r}, step={step}): the source trace recorded "
                                 f"{len(history)} forward pass(es), so step is in [{-len(history)}, {len(history) - 1}]")
            edits[name] = _patch(name, history[step], positions)
    return edits


def _patch(name, source, positions):
    def edit(x, _name=None):
        if x.shape != source.shape or x.dtype != source.dtype:
            raise TraceError(f"patch of {name}: the recorded tensor has shape {source.shape} {source.dtype}, "
                             f"this run's has {x.shape} {x.dtype} (patch between prompts of the same length)")
        if positions is None:
            return source          # the trace copies what an edit returns
        t_axis, _ = position_axes(name, x.ndim)
        if t_axis is None:
            raise TraceError(f"patch of {name}: it has no position axis, so positions= does not apply")
        T = x.shape[t_axis]
        bad = [p for p in positions if not -T <= p < T]
        if bad:
            raise TraceError(f"patch of {name}: positions {bad} are outside its T axis of length {T}")
        y = x.copy()
        where = (slice(None),) * t_axis + (list(positions),)
        y[where] = source[where]
        return y

    edit.__qualname__ = f"patch_from({name})"
    return edit


def active():
    """True while a trace records or edits the running model in this context: the forward pass then keeps
    every intermediate whole."""
    traces = _active.get()
    return bool(traces) and bool(_listening(traces))
