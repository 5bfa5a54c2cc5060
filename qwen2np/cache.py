"""The KV cache: the rotated keys and the values of past positions, per layer, for incremental decoding.

A full-attention layer keeps every past position. A sliding-window layer keeps only the last W - 1
(the next query, with those W - 1, makes the W keys it may see), as transformers 5.24's
DynamicSlidingWindowLayer does. Both grow in place in a buffer with spare room, so a decode step appends
without copying the history (amortized O(1)).

>>> import numpy as np
>>> cache = DynamicCache(["full_attention", "sliding_attention"], sliding_window=3)
>>> k = np.ones((1, 2, 5, 4), dtype=np.float32)          # [B, KV, T, HD]: 5 new positions
>>> [tuple(cache.update(k, k, layer)[0].shape) for layer in (0, 1)]   # keys to attend over
[(1, 2, 5, 4), (1, 2, 5, 4)]
>>> cache.get_seq_length(), cache.layers[0].keys.shape[2], cache.layers[1].keys.shape[2]
(5, 5, 2)
"""

from .backend import array_module


class CacheLayer:
    """Keys and values of one layer: [B, KV, S, HD] views into a buffer that has room to grow.

    `window` is None for full attention, W for a sliding layer (which keeps W - 1 past positions).
    """

    def __init__(self, window=None):
        self.window = window
        self.seen = 0            # positions seen so far (transformers' cumulative_length)
        self._k = self._v = None  # buffers [B, KV, capacity, HD]
        self._start = self._end = 0   # the kept positions are buffer[:, :, start:end]

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, self._start:self._end]

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, self._start:self._end]

    def get_mask_sizes(self, q_len):
        """(S, offset): the key positions a forward of q_len new positions attends over start at `offset`
        in the whole sequence and number S."""
        if self.window is None:
            return self.seen + q_len, 0
        kept = min(self.seen, self.window - 1)
        return kept + q_len, self.seen - kept

    def update(self, k, v):
        """Append the new keys/values [B, KV, T, HD]; return the ones to attend over [B, KV, S, HD]."""
        xp = array_module(k)
        B, KV, T, HD = k.shape
        if self._k is None:
            capacity = max(2 * T, 64)
            self._k = xp.empty((B, KV, capacity, HD), dtype=k.dtype)
            self._v = xp.empty((B, KV, capacity, HD), dtype=v.dtype)
        elif self._k.shape[0] != B or self._k.shape[1] != KV or self._k.shape[3] != HD:
            raise ValueError(
                f"cache holds keys of shape [B, KV, S, HD] = {tuple(self.keys.shape)}; "
                f"new keys {tuple(k.shape)} do not match"
            )
        if self._end + T > self._k.shape[2]:
            self._make_room(T, xp)
        self._k[:, :, self._end:self._end + T] = k
        self._v[:, :, self._end:self._end + T] = v
        self._end += T
        self.seen += T
        visible_keys, visible_values = self.keys, self.values
        if self.window is not None:  # keep W - 1; this step still attends over all it was given
            self._start = max(self._start, self._end - (self.window - 1))
        return visible_keys, visible_values

    def _make_room(self, T, xp):
        """Move the kept positions to the front, and double the buffer if that is not enough."""
        kept = self._end - self._start
        capacity = self._k.shape[2]
        if kept + T > capacity // 2:
            capacity = max(2 * (kept + T), 64)
        k = xp.empty(self._k.shape[:2] + (capacity,) + self._k.shape[3:], dtype=self._k.dtype)
        v = xp.empty_like(k)
        k[:, :, :kept] = self._k[:, :, self._start:self._end]
        v[:, :, :kept] = self._v[:, :, self._start:self._end]
        self._k, self._v, self._start, self._end = k, v, 0, kept


class DynamicCache:
    """The cache of a whole model: one CacheLayer per decoder layer, made by the model on first use.

    `cache.layers[i].keys` / `.values` are [B, KV, S, HD]; `cache[i]` is the pair. Keys are stored
    after RoPE, as in transformers.
    """

    def __init__(self, layer_types, sliding_window=None):
        self.layers = [
            CacheLayer(sliding_window if kind == "sliding_attention" else None) for kind in layer_types
        ]

    @classmethod
    def from_config(cls, config):
        return cls(config.layer_types, config.sliding_window)

    def update(self, k, v, layer_idx):
        return self.layers[layer_idx].update(k, v)

    def get_seq_length(self, layer_idx=0):
        """Positions seen so far (the `past` of the next forward pass)."""
        return self.layers[layer_idx].seen

    def get_mask_sizes(self, q_len, layer_idx):
        return self.layers[layer_idx].get_mask_sizes(q_len)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, layer_idx):
        layer = self.layers[layer_idx]
        return layer.keys, layer.values

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        kept = [0 if layer.keys is None else layer.keys.shape[2] for layer in self.layers]
        return f"DynamicCache(seen={self.get_seq_length()}, kept per layer={kept})"


def kv_bytes(cache):
    """Bytes held by the kept keys and values (not the spare room)."""
    return sum(0 if l.keys is None else l.keys.nbytes + l.values.nbytes for l in cache.layers)

