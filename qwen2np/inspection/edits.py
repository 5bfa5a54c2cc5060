"""Interventions: edits for `trace(..., edits=...)` that zero a head or patch in another run's activations.

>>> import numpy as np
>>> zero_head(1)(np.ones((1, 2, 1, 2), dtype=np.float32))[0, :, 0].tolist()
[[1.0, 1.0], [0.0, 0.0]]
"""

import fnmatch

from ..errors import IntermediateNameError, TraceError
from .names import position_axes


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
    >>> from qwen2np.inspection.tracing import Trace, tap
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
