"""The per-tokenizer BPE cache: piece -> ids, bounded in bytes, safe to share between threads.

Real text repeats its words, so most pieces of a text were seen before: a dictionary hit instead of BPE.
The cache must stay correct when it evicts (a long-running process sees millions of distinct pieces)
and when several threads encode with one tokenizer. Three rules make it so:

* **Eviction swaps dictionaries, it never empties one in place.** An encode call takes a reference to
  the current dictionary and reads only that; an eviction by another thread (or by this call) replaces
  the tokenizer's dictionary with a new one, so every dictionary a reader holds only ever grows.
* **A call never relies on an entry surviving between lookup and use.** The ids of the pieces it did not
  find are kept in a local dictionary for the call, and the result is read from that and from the
  dictionary it looked in.
* **A lock guards mutation only** (inserting, swapping, clearing). The hit path, a set difference and a
  ``map`` in C, takes no lock: it reads one dictionary that nobody removes keys from.

Eviction is generational (an approximation of least-recently-used): new entries go into ``recent``;
when ``recent`` holds half the byte budget it becomes ``older`` and a new empty ``recent`` starts, the
old ``older`` being dropped. A piece found in ``older`` is copied back into ``recent`` (a reference, no
BPE), so pieces in use survive every swap. The hit path looks in ``recent`` only.

Size: each entry is charged an estimate of the memory it holds, `entry_bytes` (measured with tracemalloc
on Latin, Cyrillic and Chinese pieces: within about 25%). Pieces of `MAX_PIECE_BYTES` UTF-8 bytes or more
are not cached, as the Rust library does not cache them: they rarely repeat, and one 200 kB piece would
otherwise hold megabytes of ids.

>>> cache = BPECache(max_bytes=1_000_000)
>>> cache.ids(["ab", "c", "ab"], lambda piece: [ord(ch) for ch in piece])
[97, 98, 99, 97, 98]
>>> len(cache), cache.nbytes
(2, 351)
>>> cache.clear(); len(cache)
0
"""

import threading
from itertools import chain

from ..errors import TokenizerInputError, TokenizerTypeError

DEFAULT_MAX_BYTES = 64 * 2**20  # 64 MiB: about 200,000 to 300,000 typical pieces
MAX_PIECE_BYTES = 256  # pieces this long or longer (UTF-8 bytes) are computed every time, never cached
ENTRY_OVERHEAD = 120  # bytes: the dict slot, the str and list headers (tracemalloc, CPython 3.11)
ID_BYTES = 36  # bytes per id: a list slot (8) and an int object (28)


def entry_bytes(piece_utf8_len, n_ids):
    """The estimated memory of one cache entry, in bytes.

    >>> entry_bytes(5, 2)  # " aaaa" -> two ids
    197
    """
    return ENTRY_OVERHEAD + piece_utf8_len + ID_BYTES * n_ids


class BPECache:
    """``piece -> list of ids`` for one tokenizer, bounded by `max_bytes` (estimated; see the module doc).

    `max_bytes` can be changed at any time (0 turns caching off); `clear()` empties the cache; `nbytes`
    and ``len()`` say what it holds. A pickled or copied cache comes back empty, with the same bound.
    """

    def __init__(self, max_bytes=DEFAULT_MAX_BYTES):
        self._lock = threading.Lock()
        self._recent = {}  # written under the lock, read without it (see the module doc)
        self._older = {}
        self._recent_bytes = 0
        self._older_bytes = 0
        self._max_bytes = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self):
        """The bound in (estimated) bytes; each of the two generations holds up to half of it."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value):
        if type(value) is not int:
            raise TokenizerTypeError(f"BPECache.max_bytes: expected an int number of bytes, found {type(value).__name__}")
        if value < 0:
            raise TokenizerInputError(f"BPECache.max_bytes: expected 0 or more bytes, found {value}")
        with self._lock:
            self._max_bytes = value
            # each generation must fit in half the new bound (a swap makes `recent` the `older`)
            if max(self._recent_bytes, self._older_bytes) > value // 2:
                self._recent, self._older, self._recent_bytes, self._older_bytes = {}, {}, 0, 0

    @property
    def nbytes(self):
        """The estimated bytes held (a piece copied back from ``older`` is counted in both generations)."""
        return self._recent_bytes + self._older_bytes

    def __len__(self):
        """How many distinct pieces are cached."""
        recent, older = self._recent, self._older
        return len(recent) + len(older.keys() - recent.keys())

    def clear(self):
        """Forget every cached piece (the bound stays)."""
        with self._lock:
            # subtle: new dictionaries, not .clear(): a concurrent encode may be reading the old ones
            self._recent, self._older, self._recent_bytes, self._older_bytes = {}, {}, 0, 0

    def ids(self, pieces, compute):
        """The ids of `pieces`, concatenated: cached ones looked up, the others made with ``compute(piece)``
        (a list of ids) and cached."""
        recent = self._recent  # subtle: this call reads only this dictionary, which never loses a key
        missing = set(pieces).difference(recent)
        if not missing:  # the hit path: no lock, no Python loop
            return list(chain.from_iterable(map(recent.__getitem__, pieces)))
        older = self._older
        found = {}  # this call's own ids for the pieces `recent` did not have
        for piece in missing:
            ids = older.get(piece)
            found[piece] = compute(piece) if ids is None else ids
        self._insert(found)
        return list(chain.from_iterable(map(found.get, pieces, map(recent.get, pieces))))

    def _insert(self, found):
        """Add `found` to ``recent``, swapping generations whenever ``recent`` would pass half the bound."""
        entries = []
        for piece, ids in found.items():
            n = len(piece.encode("utf-8", "surrogatepass"))
            if n < MAX_PIECE_BYTES:
                entries.append((piece, ids, entry_bytes(n, len(ids))))
        if not entries:
            return
        with self._lock:
            half = self._max_bytes // 2
            for piece, ids, cost in entries:
                if cost > half:
                    continue  # larger than a generation (a tiny bound): not cached
                if piece in self._recent:
                    continue  # another thread put it there meanwhile
                if self._recent_bytes + cost > half:
                    # subtle: swap, never empty in place (a reader may hold `recent` or `older`)
                    self._older, self._older_bytes = self._recent, self._recent_bytes
                    self._recent, self._recent_bytes = {}, 0
                self._recent[piece] = ids
                self._recent_bytes += cost

    def __getstate__(self):
        return {"max_bytes": self._max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])

    def __repr__(self):
        return f"BPECache({len(self)} pieces, {self.nbytes} of {self._max_bytes} bytes)"
