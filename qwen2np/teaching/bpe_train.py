"""Training byte-pair merges the minbpe way, on Qwen2's pre-tokenized pieces (notebook 1).

Qwen2's merges.txt was learned by this loop on a huge corpus: count every adjacent pair of symbols inside
the pre-tokenized pieces, merge the most frequent pair everywhere, record it, repeat. Pieces are counted
once with their frequency, so a pass costs the number of *distinct* pieces, not the corpus length.

>>> words = piece_counts(["low lower lowest low"])
>>> words
{('l', 'o', 'w'): 1, ('Ġ', 'l', 'o', 'w', 'e', 'r'): 1, ('Ġ', 'l', 'o', 'w', 'e', 's', 't'): 1, ('Ġ', 'l', 'o', 'w'): 1}
>>> [pair for pair, count in train_bpe(words, 3)]
[('l', 'o'), ('lo', 'w'), ('Ġ', 'low')]
"""

from collections import Counter

from ..tokenizer.bytes_level import to_byte_level
from ..tokenizer.pretokenize import nfc, pretokenize


def piece_counts(texts):
    """{piece as a tuple of byte-level symbols: how often it occurs} over `texts`, cut as Qwen2 cuts."""
    counts = Counter()
    for text in texts:
        counts.update(to_byte_level(piece) for piece in pretokenize(nfc(text)))
    return {tuple(piece): n for piece, n in counts.items()}


def pair_counts(words):
    """How often each adjacent pair occurs, over pieces weighted by their counts (first seen first)."""
    counts = {}
    for symbols, n in words.items():
        for pair in zip(symbols, symbols[1:]):
            counts[pair] = counts.get(pair, 0) + n
    return counts


def merge_pair(symbols, pair):
    """Every occurrence of `pair` in `symbols` merged into one symbol, left to right.

    >>> merge_pair(("a", "a", "a", "b"), ("a", "a"))
    ('aa', 'a', 'b')
    """
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def merge_everywhere(words, pair):
    """The pieces with `pair` merged (pieces that become equal add their counts)."""
    merged = {}
    for symbols, n in words.items():
        key = merge_pair(symbols, pair) if pair[0] in symbols else symbols
        merged[key] = merged.get(key, 0) + n
    return merged


def train_bpe(words, num_merges):
    """[(pair, count)] of the `num_merges` merges learned from `words` ({symbols: count}), most frequent
    pair first; among equally frequent pairs, the one seen first."""
    merges = []
    for _ in range(num_merges):
        counts = pair_counts(words)
        if not counts:
            break
        best = max(counts, key=counts.get)
        merges.append((best, counts[best]))
        words = merge_everywhere(words, best)
    return merges
