"""Interpretability on named intermediates: the logit lens, direct logit attribution, patching sweeps.

All three read a causal LM's residual stream, which the forward pass builds as a plain sum
(docs/intermediates.md, "The residual stream and the heads' shares"):

    model.layers.{L-1} = embed_tokens + Σ_l ( Σ_h self_attn.head_out[h] + mlp.down_proj )     # [B, T, D]
    logits             = lm_head · rms_norm(model.layers.{L-1})                                 # [B, T, V]

* `logit_lens`: apply the final norm and lm_head to the stream after any layer, as if the model stopped
  there (nostalgebraist's "logit lens").
* `direct_logit_attribution`: the final norm divides the whole stream by one number per position, so the
  logits are a sum over the stream's parts; each part's term is what it adds to a token's logit
  directly (not through later layers). In float64 the terms sum to the model's logits within 1e-12
  (tests/inspection/test_interp.py).
* `patching_sweep`: run a corrupted prompt with the clean prompt's activation at one layer and one
  position, for every layer and position, and measure how much of the clean answer comes back.

Shapes: B batch, T positions, D hidden size, H query heads, V vocabulary, L layers; N the number of
streams read, C the number of parts, K the number of tokens asked about.

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM, trace
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), dtype="float64", seed=0)
>>> with trace(model, *attribution_names(model)) as t:
...     logits = model(np.array([[1, 2, 3]])).logits
>>> dla = direct_logit_attribution(model, t, tokens=[5, 7])
>>> len(dla.names), dla.terms.shape                 # embed + 2 layers x (4 heads + mlp): [C, K]
(11, (11, 2))
>>> bool(np.abs(dla.terms.sum(axis=0) - logits[0, -1, [5, 7]]).max() < 1e-12)
True
"""

from dataclasses import dataclass

import numpy as np

from ..errors import IntermediateNameError, TraceError
from ..model.layers import linear, rms_norm
from ..weights.backend import to_numpy
from ..weights.store import as_array
from .names import position_axes
from .tracing import trace


def _head(model):
    """(name prefix of the base model, final norm weight [D], lm_head weight [V, D]) of a causal LM."""
    weights = model.state_dict()
    if "lm_head.weight" not in weights:
        raise TraceError(f"{type(model).__name__} has no lm_head: the logit lens and direct logit attribution "
                         f"need a Qwen2ForCausalLM")
    return "model.", weights["model.norm.weight"], weights["lm_head.weight"]


def stream_names(model, mid=False):
    """The names of the residual stream, in forward order: before layer 0, after each layer (and after
    each attention block when `mid`).

    >>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
    >>> m = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
    ...                                  num_attention_heads=2, num_key_value_heads=1), seed=0)
    >>> stream_names(m, mid=True)
    ['model.embed_tokens', 'model.layers.0.resid_mid', 'model.layers.0', 'model.layers.1.resid_mid', 'model.layers.1']
    """
    p, _, _ = _head(model)
    names = [f"{p}embed_tokens"]
    for l in range(model.config.num_hidden_layers):
        names += ([f"{p}layers.{l}.resid_mid"] if mid else []) + [f"{p}layers.{l}"]
    return names


def _recorded(t, name, step=-1):
    if name not in t:
        raise IntermediateNameError(f"{name} was not recorded: trace it (e.g. qwen2np.trace(model, "
                                    f"*qwen2np.inspection.interp.stream_names(model))) before asking for this")
    history = t.history(name)
    n = len(history)
    return to_numpy(history[_index(step, f"{name}: step", n, f"the {n} forward pass(es) the trace recorded")])


def _index(value, what, size, axis):
    """`value` as an index into `axis` of length `size` (negative from the end), or a TraceError: an
    integer, not a float, a bool or anything else that would be silently rounded or reinterpreted."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TraceError(f"{what}: expected an integer, found {value!r} ({type(value).__name__})")
    if not -size <= value < size:
        raise TraceError(f"{what} {value} is outside {axis}")
    return int(value)


def _indices(values, what, size, axis, allow_negative=True):
    """A list of indices as an int64 array [N] (see `_index`); token ids (`allow_negative=False`) count
    from 0 only: a negative id is not "from the end" of the vocabulary."""
    array = np.asarray(values)
    if array.dtype == object or array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise TraceError(f"{what}: expected integers, found {array.tolist()!r:.80} of dtype {array.dtype}")
    array = array.astype(np.int64).reshape(-1)
    bad = array[(array < (-size if allow_negative else 0)) | (array >= size)]
    if bad.size:
        raise TraceError(f"{what} {bad.tolist()} {'are' if bad.size > 1 else 'is'} outside {axis}")
    return array

def _count(value, what):
    """A positive integer (a number of things to return), or a TraceError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TraceError(f"{what}: expected an integer >= 1, found {value!r}")
    return int(value)


def unembed(model, stream):
    """What the model would predict from residual stream `stream`: final norm, then lm_head.  [..., D] -> [..., V]"""
    _, norm_w, lm_head = _head(model)
    return linear(rms_norm(stream, norm_w, model.config.rms_norm_eps), lm_head)


def softmax64(logits):
    """Softmax along the last axis in float64 (probabilities to print and plot)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class LogitLens:
    names: list            # [N] the streams read, in forward order
    positions: np.ndarray  # [P] the positions read (indices along T)
    top_ids: np.ndarray    # [N, P, k] the k most likely next tokens read from each stream at each position
    top_probs: np.ndarray  # [N, P, k] their probabilities (float64)
    tokens: list           # [K] the tokens asked about
    token_probs: np.ndarray  # [N, P, K] their probabilities (float64)


def logit_lens(model, t, names=None, positions=None, top_k=1, tokens=(), batch=0, step=-1):
    """The logit lens: each recorded stream of row `batch`, through the final norm and lm_head.

    `t` is a trace that recorded the streams `names` (default: `stream_names(model)`); `positions` along T
    (default: all). The last stream read this way gives the model's own logits (up to rounding: its norm
    and product run on one row at a time here).
    """
    names = stream_names(model) if names is None else list(names)
    first = _recorded(t, names[0], step)
    B, T = first.shape[:2]
    positions = np.arange(T) if positions is None else _indices(positions, "logit_lens: positions", T, f"the T axis of length {T}")
    if positions.size == 0:
        raise TraceError("logit_lens: positions is empty")
    batch = _index(batch, "logit_lens: batch", B, f"the {B} row(s) the trace recorded") % B
    top_k = _count(top_k, "logit_lens: top_k")
    tokens = _indices(tokens, "logit_lens: tokens", model.config.vocab_size,
                      f"the ids [0, {model.config.vocab_size})", allow_negative=False).tolist()
    top_ids, top_probs, token_probs = [], [], []
    for name in names:
        x = _recorded(t, name, step)[batch, positions]                     # [P, D]
        p = softmax64(unembed(model, x))                                    # [P, V]
        best = _top_k(p, top_k)                                             # [P, k]
        top_ids.append(best)
        top_probs.append(np.take_along_axis(p, best, axis=-1))
        token_probs.append(p[:, tokens])                                    # [P, K]
    return LogitLens(names, positions, np.stack(top_ids), np.stack(top_probs), tokens, np.stack(token_probs))


def _top_k(p, k):
    """The indices of the k largest values of each row of p [P, V], largest first (among equal values,
    the lower index first; a tie at the k-th place keeps any of them).  -> [P, k]"""
    k = min(k, p.shape[-1])
    part = np.argpartition(-p, k - 1, axis=-1)[:, :k]                       # the k best, unordered
    values = np.take_along_axis(p, part, axis=-1)
    order = np.lexsort((part, -values), axis=-1)                            # by value, then by index
    return np.take_along_axis(part, order, axis=-1)


def attribution_names(model, heads=True):
    """The intermediates `direct_logit_attribution` reads: the embeddings, each layer's attention (per head
    with `heads`, else whole) and MLP outputs, the last layer's output, and the logits."""
    p, _, _ = _head(model)
    L = model.config.num_hidden_layers
    attn = "self_attn.head_out" if heads else "self_attn.o_proj"
    names = [f"{p}embed_tokens"]
    for l in range(L):
        names += [f"{p}layers.{l}.{attn}", f"{p}layers.{l}.mlp.down_proj"]
    return names + [f"{p}layers.{L - 1}", "logits"]


@dataclass
class Attribution:
    names: list           # [C] the parts: "model.embed_tokens", "model.layers.3.self_attn.head_out.5", ...
    tokens: list          # [K]
    terms: np.ndarray     # [C, K] float64: what each part adds directly to each token's logit
    logits: np.ndarray    # [K] the model's logits of the tokens at that position
    scale: float          # the final norm's 1 / sqrt(mean(x²) + eps) at that position

    def layer_head_map(self, model):
        """The per-head terms as [L, H, K] (NaN where the attribution was made per block)."""
        L, H = model.config.num_hidden_layers, model.config.num_attention_heads
        out = np.full((L, H, len(self.tokens)), np.nan)
        for name, term in zip(self.names, self.terms):
            parts = name.split(".")
            if "head_out" in parts:
                out[int(parts[parts.index("layers") + 1]), int(parts[-1])] = term
        return out


def direct_logit_attribution(model, t, tokens, position=-1, batch=0, step=-1):
    """Each part of the residual stream's direct contribution to the logits of `tokens` at `position`.

    `t` recorded `attribution_names(model)` (per head) or `attribution_names(model, heads=False)`. The final
    norm is `w ⊙ x · s` with one scale s = 1/sqrt(mean(x²) + eps) per position, so with x = Σ parts,
    logit[v] = Σ_parts Σ_d lm_head[v, d] · w[d] · part[d] · s: a part's term. The terms are computed in
    float64 from the recorded parts; they sum to the model's logits up to the rounding of the model's own
    dtype (within 1e-12 for a float64 model).
    """
    p, norm_w, lm_head = _head(model)
    L = model.config.num_hidden_layers
    final = _recorded(t, f"{p}layers.{L - 1}", step)                  # [B, T, D]
    B, T, D = final.shape
    position = _index(position, "direct_logit_attribution: position", T, f"the T axis of length {T}")
    batch = _index(batch, "direct_logit_attribution: batch", B, f"the {B} row(s) the trace recorded") % B
    V = lm_head.shape[0]
    tokens = _indices(tokens, "direct_logit_attribution: tokens", V, f"the ids [0, {V})", allow_negative=False).tolist()
    if not tokens:
        raise TraceError("direct_logit_attribution: tokens is empty")
    heads = f"{p}layers.0.self_attn.head_out" in t

    names, parts = [f"{p}embed_tokens"], [_recorded(t, f"{p}embed_tokens", step)[batch, position]]
    for l in range(L):
        if heads:
            shares = _recorded(t, f"{p}layers.{l}.self_attn.head_out", step)[batch, :, position]   # [H, D]
            names += [f"{p}layers.{l}.self_attn.head_out.{h}" for h in range(shares.shape[0])]
            parts += list(shares)
        else:
            names.append(f"{p}layers.{l}.self_attn.o_proj")
            parts.append(_recorded(t, f"{p}layers.{l}.self_attn.o_proj", step)[batch, position])
        names.append(f"{p}layers.{l}.mlp.down_proj")
        parts.append(_recorded(t, f"{p}layers.{l}.mlp.down_proj", step)[batch, position])
    parts = np.stack(parts).astype(np.float64)                         # [C, D]

    x = final[batch, position].astype(np.float64)                      # [D]: the stream the norm reads
    eps = model.config.rms_norm_eps
    scale = 1.0 / np.sqrt((x * x).mean() + eps)                        # as rms_norm computes it
    w = to_numpy(as_array(norm_w)).astype(np.float64)                  # [D]
    # a fresh [K, D] array (rows picked by index are a copy), scaled in place: for the whole vocabulary
    # that is one array of V x D float64, not three
    direction = to_numpy(lm_head[np.asarray(tokens, dtype=np.int64)]).astype(np.float64, copy=False)
    direction *= w
    direction *= scale                                                 # [K, D]: lm_head[v] ⊙ w / rms
    terms = parts @ direction.T                                         # [C, D] @ [D, K] -> [C, K]
    if "logits" in t and _recorded(t, "logits", step).shape[1] == T:
        logits = _recorded(t, "logits", step)[batch, position, tokens].astype(np.float64)
    else:
        logits = to_numpy(unembed(model, final[batch:batch + 1, position])[0, tokens]).astype(np.float64)
    return Attribution(names, tokens, terms, logits, float(scale))


@dataclass
class PatchingSweep:
    names: list            # [N] the patched intermediates (one per layer)
    positions: list        # [P] positions along T
    values: np.ndarray     # [N, P] the normalised metric: 0 = the corrupted run, 1 = the clean run
    raw: np.ndarray        # [N, P] the metric itself
    clean: float           # the metric on the clean run
    corrupt: float         # the metric on the corrupted run


def patching_sweep(model, clean_ids, corrupt_ids, metric, name="model.layers.{l}", layers=None, positions=None):
    """Activation patching over every layer and position: run `corrupt_ids` [1, T] with the clean run's
    `name.format(l=l)` at one position p, for every (l, p), and score the last position's logits.

    `metric(logits [V] float64) -> float`, e.g. the logit difference between the clean and the corrupted
    answers. Normalised: (metric - corrupt) / (clean - corrupt), so 1 means the patch restores the clean
    answer and 0 means it changes nothing. The P positions of one layer run as one batch of P rows.
    """
    clean_ids, corrupt_ids = np.asarray(clean_ids), np.asarray(corrupt_ids)
    if clean_ids.shape != corrupt_ids.shape or clean_ids.ndim != 2 or clean_ids.shape[0] != 1:
        raise TraceError(f"patching_sweep: the clean and corrupted prompts must both be [1, T] with the same T, "
                         f"found {clean_ids.shape} and {corrupt_ids.shape}")
    T = clean_ids.shape[1]
    layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    positions = list(range(T)) if positions is None else _indices(positions, "patching_sweep: positions", T,
                                                                 f"the T axis of length {T}").tolist()
    if not positions:
        raise TraceError("patching_sweep: positions is empty")
    names = [name.format(l=l) for l in layers]

    def score(ids, edits=None):
        with trace(model, edits=edits or {}):
            logits = model(ids, logits_to_keep=1).logits                   # [B, 1, V]
        return [float(metric(to_numpy(row[-1]).astype(np.float64))) for row in logits]

    with trace(model, *names) as clean:
        model(clean_ids, logits_to_keep=1)
    m_clean, m_corrupt = score(clean_ids)[0], score(corrupt_ids)[0]
    if not np.isfinite(m_clean - m_corrupt) or m_clean == m_corrupt:
        raise TraceError(f"patching_sweep: the metric is {m_clean} on the clean prompt and {m_corrupt} on the "
                         f"corrupted one; it must differ (and be finite) to be normalised")
    P = len(positions)
    rows = np.repeat(corrupt_ids, P, axis=0)                                # [P, T]: one row per position
    raw = np.empty((len(names), P))
    for i, n in enumerate(names):
        source = clean[n]                                                   # [1, …, T, …]
        t_axis, _ = position_axes(n, source.ndim)

        def patch(x, source=source, t_axis=t_axis):
            y = x.copy()
            for r, pos in enumerate(positions):          # row r gets the clean value at position pos only
                where = (r,) + (slice(None),) * (t_axis - 1) + (pos,)
                y[where] = source[(0,) + where[1:]]
            return y

        raw[i] = score(rows, {n: patch})
    values = (raw - m_corrupt) / (m_clean - m_corrupt)
    return PatchingSweep(names, positions, values, raw, m_clean, m_corrupt)
