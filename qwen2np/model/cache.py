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

from contextlib import contextmanager

from ..errors import CacheError
from ..weights.backend import array_module


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
            raise CacheError(
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

    def state(self):
        """What `restore` needs to undo later updates: the buffers (updates only write past `end`, and
        `_make_room` copies into new ones, so the kept positions in these stay intact) and the counters."""
        return self._k, self._v, self._start, self._end, self.seen

    def restore(self, state):
        self._k, self._v, self._start, self._end, self.seen = state

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
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window if "sliding_attention" in self.layer_types else None
        self.layers = [
            CacheLayer(sliding_window if kind == "sliding_attention" else None) for kind in layer_types
        ]

    @classmethod
    def from_config(cls, config):
        return cls(config.layer_types, config.sliding_window)

    def check_fits(self, config, batch, dtype):
        """Refuse, before anything is written, a cache made for another model or another batch.

        A cache matches a config when it has the same layers, sliding the same way, and, once it holds
        keys, the same KV heads, head dim, batch size and dtype. The error names both sides.
        """
        layer_types = list(config.layer_types)
        window = config.sliding_window if "sliding_attention" in layer_types else None
        kept = next((layer for layer in self.layers if layer.keys is not None), None)
        if kept is not None:
            B, KV, _, HD = kept.keys.shape
            cache_dtype = kept.keys.dtype
        mismatch = (self.layer_types != layer_types or self.sliding_window != window
                    or (kept is not None and (KV, HD, cache_dtype) != (config.num_key_value_heads, config.head_dim,
                                                                       dtype)))
        if mismatch:
            held = "" if kept is None else f", KV={KV}, HD={HD}, {cache_dtype}"
            raise CacheError(
                f"past_key_values: this cache was made for {_describe(self.layer_types, self.sliding_window)}"
                f"{held}; this model has {_describe(layer_types, window)}, KV={config.num_key_value_heads}, "
                f"HD={config.head_dim}, {dtype} (make one with DynamicCache.from_config(model.config))"
            )
        if kept is not None and B != batch:
            raise CacheError(f"past_key_values: the cache holds a batch of {B} rows, this call has {batch}")

    def state(self):
        """A snapshot `restore` returns to: a forward pass that raises leaves the cache as it found it."""
        return [layer.state() for layer in self.layers]

    def restore(self, state):
        for layer, s in zip(self.layers, state):
            layer.restore(s)

    @contextmanager
    def rollback_on_error(self):
        """Within it, any exception (a trace edit that raises, Ctrl-C, out of memory: BaseException) hands
        the cache back as it was on entering, not with some layers one step ahead; then it propagates.

        >>> import numpy as np
        >>> cache = DynamicCache(["full_attention"])
        >>> k = np.zeros((1, 1, 2, 4), dtype=np.float32)
        >>> try:
        ...     with cache.rollback_on_error():
        ...         _ = cache.update(k, k, 0)
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> cache.get_seq_length()
        0
        """
        before = self.state()
        try:
            yield self
        except BaseException:
            self.restore(before)
            raise

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


def _describe(layer_types, window):
    sliding = sum(kind == "sliding_attention" for kind in layer_types)
    slides = f", {sliding} sliding with a window of {window}" if sliding else ", no sliding window"
    return f"{len(layer_types)} layers{slides}"


def kv_bytes(cache):
    """Bytes held by the kept keys and values (not the spare room)."""
    return sum(0 if l.keys is None else l.keys.nbytes + l.values.nbytes for l in cache.layers)

