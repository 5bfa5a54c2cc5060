"""Byte-pair encoding by merge rank: how one pre-token piece becomes vocabulary tokens.

merges.txt lists symbol pairs in the order they were learned; the line number is the pair's *rank*.
A piece starts as single byte-level characters, and the lowest-ranked adjacent pair is merged again and
again until no adjacent pair has a rank:

    "Ġlower" -> Ġ l o w e r -> Ġ l ow e r -> Ġl ow e r -> Ġlow e r -> Ġlow er -> Ġlower

Three implementations give the same tokens (a test holds them equal):

* `bpe_naive`: the teaching version on strings, GPT-2's loop (find the best pair, merge all of it);
* `bpe_short`: the default for short pieces. It works on token *ids* with a `merge_table` that packs
  each pair into one int key and its (rank, merged id) into one int value, so a merge step is a
  ``min``/``index`` in C and two int-keyed dict lookups, and no string is built;
* `bpe_long`: a heap of candidate merges over a linked list, O(n log n), for long pieces (a 100,000
  character piece with no spaces takes about a second; the loops above would be quadratic).

subtle: the Rust library merges *the leftmost occurrence* of the lowest-ranked pair one at a time,
GPT-2 merges all occurrences at once. With trained merges (a pair's parts always have lower ranks than
the pair) the two agree; `bpe_short` and `bpe_long` follow the Rust order exactly.
"""

import heapq
from itertools import repeat

from ..errors import TokenizerFileError

NO_MERGE = float("inf")  # the rank of a pair that is not in merges.txt (bpe_naive)

ID_BITS = 21  # token ids must be below 2**21 to pack a pair (left << ID_BITS | right) into one int
ID_MASK = (1 << ID_BITS) - 1
NOT_A_MERGE = 1 << 62  # larger than any packed (rank << ID_BITS | merged id)
_NOT_A_MERGE_FOREVER = repeat(NOT_A_MERGE)  # the default argument of table.get, fed by map()
_SHIFT = (1 << ID_BITS).__mul__  # id -> id << ID_BITS, as a C function for map()

LONG_PIECE = 64  # pieces longer than this (in byte-level characters) go to bpe_long


def merge_ranks(merges):
    """``{(left, right): rank}`` from the merges in file order.

    >>> merge_ranks([("Ġ", "t"), ("h", "e")])
    {('Ġ', 't'): 0, ('h', 'e'): 1}
    """
    return dict(zip(merges, range(len(merges))))


def merge_table(merges, vocab):
    """The packed merge table: ``{left_id << ID_BITS | right_id: rank << ID_BITS | merged_id}``.

    Because the rank sits in the high bits, the smallest value is the lowest-ranked merge, and its low
    bits say which token it makes.

    >>> vocab = {"l": 0, "o": 1, "w": 2, "lo": 3, "low": 4}
    >>> table = merge_table([("l", "o"), ("lo", "w")], vocab)
    >>> [(k >> ID_BITS, k & ID_MASK, v >> ID_BITS, v & ID_MASK) for k, v in table.items()]
    [(0, 1, 0, 3), (3, 2, 1, 4)]
    """
    if vocab and max(vocab.values()) > ID_MASK:
        token = max(vocab, key=vocab.get)
        raise TokenizerFileError(f"vocab: token {token!r} has id {vocab[token]}, expected ids up to {ID_MASK}")
    return {(vocab[a] << ID_BITS) | vocab[b]: (rank << ID_BITS) | vocab[a + b] for rank, (a, b) in enumerate(merges)}


def bpe_naive(symbols, ranks):
    """BPE as GPT-2 wrote it: find the lowest-ranked pair, merge every occurrence left to right, repeat.

    `symbols` is a byte-level string; returns the list of tokens.

    >>> ranks = merge_ranks([("l", "o"), ("lo", "w"), ("e", "r"), ("low", "er")])
    >>> bpe_naive("lower", ranks)
    ['lower']
    >>> bpe_naive("lowly", ranks)
    ['low', 'l', 'y']
    """
    word = list(symbols)
    while len(word) > 1:
        pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
        best = min(pairs, key=lambda pair: ranks.get(pair, NO_MERGE))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def bpe_short(ids, table):
    """BPE on a short list of token ids: merge the leftmost lowest-ranked pair, update its neighbours.

    ``merges[i]`` is the packed (rank, merged id) of the pair ``(ids[i], ids[i + 1])``; ``min`` finds the
    best merge and ``index`` its leftmost position, both in C. Returns the list of ids.

    >>> vocab = {"l": 0, "o": 1, "w": 2, "e": 3, "r": 4, "lo": 5, "low": 6, "er": 7, "lower": 8}
    >>> table = merge_table([("l", "o"), ("lo", "w"), ("e", "r"), ("low", "er")], vocab)
    >>> bpe_short([0, 1, 2, 3, 4], table)  # l o w e r
    [8]
    """
    ids = list(ids)
    get = table.get
    merges = list(map(get, map(int.__or__, map(_SHIFT, ids), ids[1:]), _NOT_A_MERGE_FOREVER))  # [len(ids) - 1]
    while merges:
        best = min(merges)
        if best == NOT_A_MERGE:
            break
        i = merges.index(best)  # the leftmost occurrence of the best pair
        new = best & ID_MASK
        ids[i] = new
        del ids[i + 1]
        del merges[i]
        if i:
            merges[i - 1] = get((ids[i - 1] << ID_BITS) | new, NOT_A_MERGE)
        if i < len(merges):
            merges[i] = get((new << ID_BITS) | ids[i + 1], NOT_A_MERGE)
    return ids


def bpe_long(ids, table):
    """BPE on a long list of ids: a heap of (packed merge, position) over a doubly linked list.

    Each step pops the best candidate, checks it is still current (the pair at that position still
    makes the same merge), joins the two symbols and pushes the two new pairs they form with their
    neighbours: O(n log n) for n symbols.

    >>> table = merge_table([("a", "a"), ("aa", "aa")], {"a": 0, "aa": 1, "aaaa": 2})
    >>> bpe_long([0] * 9, table)  # a*9 -> aaaa aaaa a
    [2, 2, 0]
    """
    sym = list(ids)  # sym[i]: the id of the symbol starting at position i (None once merged away)
    n = len(sym)
    nxt = list(range(1, n + 1))  # position of the next live symbol (n: none)
    prv = list(range(-1, n - 1))  # position of the previous live symbol (-1: none)
    packed = map(table.get, map(int.__or__, map(_SHIFT, sym), sym[1:]), _NOT_A_MERGE_FOREVER)
    heap = [(m, i) for i, m in enumerate(packed) if m != NOT_A_MERGE]
    heapq.heapify(heap)
    get = table.get
    while heap:
        m, i = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j >= n or get((sym[i] << ID_BITS) | sym[j]) != m:
            continue  # stale: one of its two symbols has changed since it was pushed
        sym[i], sym[j] = m & ID_MASK, None
        nxt[i] = k = nxt[j]
        if k < n:
            prv[k] = i
            m2 = get((sym[i] << ID_BITS) | sym[k])
            if m2 is not None:
                heapq.heappush(heap, (m2, i))
        h = prv[i]
        if h >= 0:
            m2 = get((sym[h] << ID_BITS) | sym[i])
            if m2 is not None:
                heapq.heappush(heap, (m2, h))
    return [s for s in sym if s is not None]


def bpe(ids, table):
    """The default BPE on ids: `bpe_short` up to `LONG_PIECE` symbols, `bpe_long` beyond.

    >>> vocab = {"Ġ": 0, "l": 1, "o": 2, "w": 3, "Ġl": 4, "ow": 5, "Ġlow": 6}
    >>> bpe([0, 1, 2, 3], merge_table([("Ġ", "l"), ("o", "w"), ("Ġl", "ow")], vocab))
    [6]
    """
    if len(ids) > LONG_PIECE:
        return bpe_long(ids, table)
    return bpe_short(ids, table)
