"""Attention masks: which keys each query may see, as an additive bias of 0 (visible) or finfo.min (hidden).

Three rules combine (docs/masks.md):
* causal: a query sees keys at or before its own index;
* padding: a key whose attention_mask entry is 0 is hidden from every query;
* sliding window (layers marked "sliding_attention"): a query sees only the W most recent keys,
  itself included: visible iff 0 <= q - k < W.

Queries and keys are numbered by their index in the whole sequence (past + new), not by position_ids,
exactly like transformers 5.24. The one exception is a packed batch (several sequences concatenated in a
row, told apart by position_ids that restart) with no attention_mask and no cache: then the rules apply to
positions, and a query never sees another sequence.

>>> import numpy as np
>>> visible = visibility(q_start=0, q_len=3, kv_start=0, kv_len=3, sliding_window=2)
>>> visible.astype(int)
array([[1, 0, 0],
       [1, 1, 0],
       [0, 1, 1]])
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import ModelInputError
from ..weights.backend import array_module


def visible_keys(q, k, sliding_window=None):
    """The rule: does query index q see key index k? Causal, and within the window on a sliding layer.
    q and k are arrays of sequence indices that broadcast (q [n, 1] against k [1, m] -> [n, m] bool)."""
    visible = k <= q
    if sliding_window is not None:
        # subtle: W keys including the query itself (k > q - W), as the 5.24 masks do; older
        # flash-attention paths saw W + 1 (docs/sliding-window.md)
        visible = visible & (k > q - sliding_window)
    return visible


def visibility(q_start, q_len, kv_start, kv_len, sliding_window=None):
    """Causal (and sliding-window) visibility of keys by queries, by sequence index.  -> [T, S] bool"""
    q = np.arange(q_start, q_start + q_len, dtype=np.int64)[:, None]      # [T, 1]
    k = np.arange(kv_start, kv_start + kv_len, dtype=np.int64)[None, :]   # [1, S]
    return visible_keys(q, k, sliding_window)


def packed_sequence_ids(position_ids):
    """Index of the packed sequence each position belongs to, or None when no row restarts.  [B, T] -> [B, T]

    >>> packed_sequence_ids(np.array([[0, 1, 2, 0, 1]])).tolist()
    [[0, 0, 0, 1, 1]]
    """
    previous = np.concatenate([position_ids[:, :1] - 1, position_ids[:, :-1]], axis=1)
    ids = np.cumsum(position_ids - previous != 1, axis=1)
    return None if (ids[:, -1] == 0).all() else ids


def packed_visibility(position_ids, sequence_ids, sliding_window=None):
    """Visibility for a packed batch: the rules on positions, within one sequence.  -> [B, T, T] bool"""
    q, k = position_ids[:, :, None], position_ids[:, None, :]   # [B, T, 1], [B, 1, T]
    return visible_keys(q, k, sliding_window) & (sequence_ids[:, :, None] == sequence_ids[:, None, :])


def attention_bias(visible, dtype, xp=np):
    """Boolean visibility [B, 1, T, S] -> the additive mask: 0 where visible, finfo(dtype).min elsewhere.

    subtle: finfo.min, not -inf, as transformers. A query that sees no key at all (a left-padding
    position) then gets equal scores everywhere, so a uniform softmax instead of NaN.
    """
    visible = xp.asarray(visible)
    lowest = dtype.type(ml_dtypes.finfo(dtype).min)            # ml_dtypes.finfo also knows bfloat16
    return xp.where(visible, dtype.type(0), lowest).astype(dtype, copy=False)


def build_attention_bias(batch, q_start, q_len, kv_start, kv_len, attention_mask, position_ids,
                         sliding_window, dtype, packed_ids=None, xp=np):
    """The additive mask of one layer type for one forward pass.  -> [B, 1, T, S]

    attention_mask is None or [B, past + T] (1 keep, 0 pad); its columns kv_start:kv_start+kv_len are
    the keys this layer still holds (a sliding layer's cache forgets older ones).
    """
    if packed_ids is not None:
        visible = packed_visibility(position_ids, packed_ids, sliding_window)[:, None]   # [B, 1, T, T]
    else:
        visible = visibility(q_start, q_len, kv_start, kv_len, sliding_window)[None, None]   # [1, 1, T, S]
    if attention_mask is not None:
        keep = attention_mask[:, kv_start:kv_start + kv_len].astype(bool)     # [B, S]
        visible = visible & keep[:, None, None, :]                            # -> [B, 1, T, S]
    visible = np.broadcast_to(visible, (batch, 1, q_len, kv_len))
    return attention_bias(visible, np.dtype(dtype), xp)


def layer_masks(config, attention_mask, position_ids, cache, batch, q_len, dtype, xp=np):
    """layer type -> AttentionMask for one forward pass of q_len new positions: the additive bias
    [B, 1, T, S], made whole or a block at a time when attention asks for it, and its causal span when no
    key is padding (then attention may skip the hidden triangle).

    attention_mask is None, a padding mask [B, past + T] or a custom additive mask [B or 1, 1, T, S] (used
    as given); position_ids the caller's positions [B or 1, T], None when the caller gave none; `cache`
    the DynamicCache the pass extends (None without one): its layers say which keys each layer type keeps.

    >>> from qwen2np import Qwen2Config
    >>> config = Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> masks = layer_masks(config, None, None, None, batch=1, q_len=3, dtype=np.dtype(np.float32))
    >>> (masks["full_attention"].bias[0, 0] == 0).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    B, T = batch, q_len
    past = cache.get_seq_length() if cache is not None else 0
    kinds = set(config.layer_types)
    if attention_mask is not None and attention_mask.ndim == 4:   # a custom mask, used as given
        S = past + T
        if attention_mask.shape not in ((B, 1, T, S), (1, 1, T, S)):
            raise ModelInputError(f"attention_mask: a 4D mask must have shape [B, 1, T, S] = ({B}, 1, {T}, {S}), "
                                  f"found {attention_mask.shape}")
        bias = xp.asarray(attention_mask).astype(dtype, copy=False)
        return {kind: AttentionMask.given(bias) for kind in kinds}
    # subtle: packed sequences (positions restart inside a row) are only detected without a mask or a
    # cache, as in transformers (docs/masks.md)
    packed = None
    if position_ids is not None and attention_mask is None and cache is None:
        packed = packed_sequence_ids(np.broadcast_to(position_ids, (B, T)))
    masks = {}
    for kind in kinds:
        window = config.sliding_window if kind == "sliding_attention" else None
        if cache is not None:
            kv_len, kv_start = cache.get_mask_sizes(T, config.layer_types.index(kind))
        else:
            kv_len, kv_start = T, 0
        if packed is not None:
            visible = packed_visibility(np.broadcast_to(position_ids, (B, T)), packed, window)[:, None]
            masks[kind] = AttentionMask.given(attention_bias(visible, np.dtype(dtype), xp))   # [B, 1, T, T]
            continue
        keep = None
        if attention_mask is not None and not attention_mask.all():
            keep = attention_mask[:, kv_start:kv_start + kv_len].astype(bool)           # [B, S]
        span = CausalSpan(past, kv_start, window) if keep is None else None
        masks[kind] = AttentionMask(B, T, kv_len, np.dtype(dtype), xp, past, kv_start, window, keep, span)
    return masks


class AttentionMask:
    """One layer type's mask for one forward pass: causal (maybe sliding), with padding (`keep`), made on
    demand. `bias` is the whole additive mask [B, 1, T, S], made once; `block(rows, k0, k1)` only the
    query rows `rows` (a slice or row indices) and key columns [k0, k1), so that a long prompt attended
    over in blocks never holds its [T, S] mask (4.3 GB at 32k positions in float32). `span` is the
    CausalSpan when no key is padding (attention may then skip the hidden keys), else None.

    `AttentionMask.given(bias)` wraps a mask made whole (a caller's 4D mask, a packed batch's).
    """

    def __init__(self, batch, q_len, kv_len, dtype, xp=np, q_start=0, kv_start=0, window=None, keep=None,
                 span=None, bias=None):
        self.shape = (batch, 1, q_len, kv_len)                  # [B, 1, T, S]
        self.dtype, self.xp = np.dtype(dtype), xp
        self.q_start, self.kv_start, self.window = q_start, kv_start, window
        self.keep = keep                                        # [B, S] bool: keys that are not padding, or None
        self.span = span
        self._bias = bias
        self._seen = None                                       # the running count of kept keys, once made

    @classmethod
    def given(cls, bias):
        B, _, T, S = bias.shape
        return cls(B, T, S, bias.dtype, array_module(bias), bias=bias)

    @property
    def bias(self):
        """The whole additive mask [B, 1, T, S]: 0 where a query sees a key, finfo(dtype).min elsewhere."""
        if self._bias is None:
            self._bias = self.block(slice(None), 0, self.shape[3])
        return self._bias

    def block(self, rows, k0, k1):
        """The additive mask of query rows `rows` (a slice, or an array of row indices) and key columns
        [k0, k1): [B, 1, len(rows), k1 - k0] ([1, …] for a caller's mask of one row)."""
        if self._bias is not None:
            return self._bias[:, :, rows, k0:k1]
        q = np.arange(self.shape[2], dtype=np.int64)[rows] + self.q_start        # [n] sequence indices
        k = np.arange(self.kv_start + k0, self.kv_start + k1, dtype=np.int64)    # [m]
        visible = visible_keys(q[:, None], k[None, :], self.window)[None, None]   # [1, 1, n, m]
        if self.keep is not None:
            visible = visible & self.keep[:, None, None, k0:k1]                  # -> [B, 1, n, m]
        visible = np.broadcast_to(visible, (self.shape[0], 1) + visible.shape[2:])   # -> [B, 1, n, m]
        return attention_bias(visible, self.dtype, self.xp)

    def hidden_rows(self, rows=slice(None)):
        """[B, n] bool: which of the query rows `rows` see no key at all (left padding), or None when every
        row sees one (no padding, a packed batch, a caller's mask).

        subtle: with sdpa, transformers' default attention, such a row attends to nothing and its output is
        zero (torch's kernels, given transformers' boolean mask); eager adds finfo.min everywhere, which in
        float16 overflows to -inf and gives NaN (docs/masks.md).
        """
        if self.keep is None:
            return None
        q = np.arange(self.shape[2], dtype=np.int64)[rows] + self.q_start - self.kv_start   # [n] in key columns
        # the keys row q may see are columns [lo, q]; count the kept ones with a running sum [B, S + 1]
        if self._seen is None:
            self._seen = np.concatenate([np.zeros((self.keep.shape[0], 1), np.int64),
                                         np.cumsum(self.keep, axis=1)], axis=1)
        seen = self._seen
        hi = np.clip(q + 1, 0, self.shape[3])
        lo = np.zeros_like(hi) if self.window is None else np.clip(q - self.window + 1, 0, self.shape[3])
        return (seen[:, hi] - seen[:, lo]) == 0                                    # [B, n]


@dataclass(frozen=True)
class CausalSpan:
    """What a purely causal (maybe sliding) mask with no padding lets each query row see, as a key range.

    With such a mask, query row r of this pass (sequence index q_start + r) sees exactly the keys of
    sequence index in (q_start + r - W, q_start + r]. Attention can then skip the hidden triangle.
    Keys are counted from kv_start, the sequence index of the layer's first kept key.

    >>> CausalSpan(q_start=0, kv_start=0, window=None).keys(128, 256)
    (0, 256)
    >>> CausalSpan(q_start=10, kv_start=7, window=4).keys(0, 2)    # queries 10, 11 see keys 7..11
    (0, 5)
    """

    q_start: int
    kv_start: int
    window: int | None

    def keys(self, r0, r1):
        """The key columns [k0, k1) that query rows [r0, r1) of this pass may see."""
        lo = self.kv_start if self.window is None else max(self.kv_start, self.q_start + r0 - self.window + 1)
        return lo - self.kv_start, self.q_start + r1 - self.kv_start
