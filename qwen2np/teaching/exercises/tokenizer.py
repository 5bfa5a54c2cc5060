"""Exercises of notebook 1 (the tokenizer): the byte-level alphabet, the BPE merge loop of encoding,
the merge loop of training, and decoding ids back to text.

>>> print(grade_byte_level(lambda: {b: chr(b) for b in range(256)}))
the byte-level alphabet: wrong. The first wrong operation is `byte 0x00`.
  byte 0x00  WRONG yours is '\\x00' (U+0000), GPT-2's is 'Ā' (U+0100). Byte 0 is not printable: bytes outside !..~, ¡..¬ and ®..ÿ get U+0100, U+0101, … in byte order
"""

from ...tokenizer.bpe import bpe_naive
from ...tokenizer.bytes_level import bytes_to_unicode, unicode_to_bytes
from ..bpe_train import merge_everywhere, pair_counts
from ..grader import Verdict, call, fail, graded

_NICE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def _char(c):
    return f"{c!r} (U+{ord(c):04X})" if isinstance(c, str) and len(c) == 1 else repr(c)


# -- the byte-level alphabet ------------------------------------------------------------------------------


@graded("the byte-level alphabet")
def grade_byte_level(fn):
    """`fn()` -> GPT-2's table {byte value: stand-in character} (256 entries; a list of 256 characters,
    indexed by byte, is accepted too). Checked byte by byte; the first byte that is wrong is named, with
    what the usual mistakes look like."""
    exercise = "the byte-level alphabet"
    out, failed = call(exercise, fn)
    if failed:
        return failed
    if isinstance(out, (list, tuple)) and len(out) == 256:
        out = dict(enumerate(out))
    if not isinstance(out, dict):
        return Verdict(exercise, False, note=f"wrong: expected a dict {{byte: character}}, found {type(out).__name__}")
    table = bytes_to_unicode()
    steps = []
    keys = [k for k in out if not (isinstance(k, int) and 0 <= k < 256)]
    if keys:
        return fail(exercise, steps, "keys", f"the keys must be the byte values 0..255 (ints); found {keys[0]!r}")
    for b in range(256):
        mine = out.get(b)
        if mine != table[b]:
            if mine is None:
                detail = f"byte {b} is missing from your table"
            else:
                detail = f"yours is {_char(mine)}, GPT-2's is {_char(table[b])}. " + _byte_hint(b, mine, out)
            return fail(exercise, steps, f"byte 0x{b:02X}", detail.rstrip(". "))
        if b in (0x21, 0x20, 0x7F, 0xAD):
            steps.append((f"byte 0x{b:02X}", True, f"{_char(mine)}"))
    if len(set(out.values())) != 256:
        return fail(exercise, steps, "one to one", "two bytes share a character: decoding could not tell them apart")
    steps.append(("all 256", True, "188 printable bytes stand for themselves, 68 others get U+0100 … U+0143"))
    return Verdict(exercise, True, steps)


def _byte_hint(b, mine, out):
    if b not in _NICE:
        if b == 0xAD and mine == chr(0xAD):
            return ("Byte 173 (0xAD, a soft hyphen) is invisible: GPT-2 leaves it out of the printable ranges "
                    "(¡..¬ then ®..ÿ), so it gets a stand-in like the control bytes")
        if mine == chr(b):
            return (f"Byte {b} is not printable: bytes outside !..~, ¡..¬ and ®..ÿ get U+0100, U+0101, … in "
                    f"byte order")
        if isinstance(mine, str) and len(mine) == 1 and ord(mine) == 256 + b:
            return ("chr(256 + b) happens to be right for the bytes 0..32 only: the 68 bytes that are not "
                    "printable are numbered 256, 257, 258, … one after the other, in byte order")
        others = [c for c in range(256) if c not in _NICE]
        n = others.index(b)
        return f"it is number {n} (counting from 0) of the 68 bytes that are not printable, so it gets chr(256 + {n})"
    return f"byte {b} is printable ({chr(b)!r}) and stands for itself"


# -- BPE: the merge loop of encoding ---------------------------------------------------------------------


@graded("the BPE merge loop")
def grade_bpe(fn, ranks, words):
    """`fn(word, ranks)` -> the tokens of `word` (a byte-level string such as "Ġtokenization"), merging
    the lowest-ranked adjacent pair again and again (ranks: {(left, right): rank}). Graded on each of
    `words`; the first word whose tokens are wrong is named, with the mistake it looks like."""
    exercise = "the BPE merge loop"
    steps = []
    for word in words:
        out, failed = call(exercise, fn, word, ranks)
        if failed:
            return failed
        expected = bpe_naive(word, ranks)
        if isinstance(out, tuple):
            out = list(out)
        if not isinstance(out, list) or not all(isinstance(s, str) for s in out):
            return fail(exercise, steps, repr(word), f"expected a list of strings, found {type(out).__name__}: "
                                                     f"{str(out)[:80]}")
        if out != expected:
            return fail(exercise, steps, repr(word), f"yours {out}, expected {expected}. "
                        + _bpe_hint(word, ranks, out, expected))
        steps.append((repr(word), True, str(expected)))
    return Verdict(exercise, True, steps)


def _bpe_states(word, ranks, pick):
    """The states of a merge loop that picks the pair to merge with `pick(pairs)` (None: stop)."""
    word, states = list(word), []
    while len(word) > 1:
        pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
        best = pick([p for p in pairs if p in ranks])
        if best is None:
            break
        i = pairs.index(best)
        word = word[:i] + [best[0] + best[1]] + word[i + 2:]
        states.append(list(word))
    return states


def _bpe_hint(word, ranks, out, expected):
    if "".join(out) != word:
        return "Joined together, your tokens are not the word: a merge lost or added characters"
    lowest = _bpe_states(word, ranks, lambda pairs: min(pairs, key=ranks.get) if pairs else None)
    if out in lowest[:-1] or out == list(word):
        n = 0 if out == list(word) else lowest.index(out) + 1
        return f"yours is the state after {n} merge(s) of {len(lowest)}: the loop stopped too early"
    highest = _bpe_states(word, ranks, lambda pairs: max(pairs, key=ranks.get) if pairs else None)
    if highest and out == highest[-1]:
        return "yours merges the highest rank first: the lowest rank (the earliest learned merge) goes first"
    leftmost = _bpe_states(word, ranks, lambda pairs: pairs[0] if pairs else None)
    if leftmost and out == leftmost[-1]:
        return "yours merges the leftmost known pair first: the pair with the lowest rank goes first, wherever it is"
    return "compare your loop with the one printed above, merge by merge"


# -- BPE training ------------------------------------------------------------------------------------------


def _as_merge(m):
    """A pair (a, b) of strings from a merge given as (a, b), [a, b] or ((a, b), count); else None."""
    if isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], (tuple, list)):
        m = m[0]
    if isinstance(m, (tuple, list)) and len(m) == 2 and all(isinstance(s, str) for s in m):
        return tuple(m)
    return None


@graded("the BPE training loop")
def grade_bpe_training(fn, words, num_merges):
    """`fn(words, num_merges)` -> the list of merges learned, each a pair (a, b) (or (pair, count)), from
    `words` ({tuple of byte-level symbols: count}).

    The grader replays your merges one by one: each must be a most frequent pair of the pieces as your
    earlier merges left them (any of several equally frequent pairs is right), and there must be
    `num_merges` of them (fewer only when no pair is left)."""
    exercise = "the BPE training loop"
    out, failed = call(exercise, fn, dict(words), num_merges)
    if failed:
        return failed
    if not isinstance(out, (list, tuple)):
        return Verdict(exercise, False, note=f"wrong: expected a list of merges (pairs of strings), found "
                                             f"{type(out).__name__}: {str(out)[:60]}")
    steps, state = [], dict(words)
    for i, given in enumerate(out):
        pair = _as_merge(given)
        if pair is None:
            return fail(exercise, steps, f"merge {i + 1}", f"{given!r} is not a pair of strings (left, right)")
        counts = pair_counts(state)
        if not counts:
            return fail(exercise, steps, f"merge {i + 1}", f"{pair}, but no pair is left to merge")
        best = max(counts, key=counts.get)
        if counts.get(pair, 0) != counts[best]:
            detail = (f"you merged {pair}, which occurs {counts.get(pair, 0)} times; the most frequent pair "
                      f"occurs {counts[best]} times: {best}")
            unweighted = pair_counts({w: 1 for w in state})
            if unweighted and unweighted.get(pair, 0) == max(unweighted.values()):
                detail += (". Yours is the most frequent pair if every distinct piece counts once: weight each "
                           "piece by how often it occurs")
            return fail(exercise, steps, f"merge {i + 1}", detail)
        if i < 3 or i == len(out) - 1:
            steps.append((f"merge {i + 1}", True, f"{pair}, {counts[pair]} times"))
        elif i == 3:
            steps.append(("…", True, ""))
        state = merge_everywhere(state, pair)
    if len(out) != num_merges and (len(out) > num_merges or pair_counts(state)):
        return fail(exercise, steps, "count", f"{len(out)} merges, {num_merges} asked for")
    return Verdict(exercise, True, steps)


# -- decoding ------------------------------------------------------------------------------------------------


@graded("decoding by hand")
def grade_decode(fn, token_lists):
    """`fn(tokens)` -> the text that the byte-level tokens (e.g. ['na', 'Ã¯', 've']) stand for, or a dict
    {"bytes": the UTF-8 bytes, "text": the text}. Graded on each list of `token_lists`."""
    exercise = "decoding by hand"
    back = unicode_to_bytes()
    steps = []
    for tokens in token_lists:
        raw = bytes(back[c] for c in "".join(tokens))
        text = raw.decode("utf-8", errors="replace")
        out, failed = call(exercise, fn, list(tokens))
        if failed:
            return failed
        given = out if isinstance(out, dict) else {"text": out}
        name = repr("".join(tokens))[:40]
        if "bytes" in given and given["bytes"] != raw:
            return fail(exercise, steps, f"{name}: bytes", f"yours {given['bytes']!r}, expected {raw!r}")
        mine = given.get("text")
        if not isinstance(mine, str):
            return fail(exercise, steps, f"{name}: text", f"expected the text (a str), found {type(mine).__name__}")
        if mine != text:
            return fail(exercise, steps, f"{name}: text", f"yours {mine!r}, expected {text!r}. "
                        + _decode_hint(tokens, mine, back))
        steps.append((name, True, repr(text)))
    return Verdict(exercise, True, steps)


def _decode_hint(tokens, mine, back):
    if mine == "".join(tokens):
        return "that is still the byte-level alphabet: map each character back to its byte, then decode UTF-8"
    one_by_one = "".join(bytes(back[c] for c in t).decode("utf-8", errors="replace") for t in tokens)
    if mine == one_by_one:
        return ("you decoded token by token: a character whose bytes are spread over two tokens becomes �. "
                "Join the bytes of all tokens first, then decode once")
    if mine == bytes(back[c] for c in "".join(tokens)).decode("latin-1"):
        return "the bytes are UTF-8, not latin-1: a character of 2 to 4 bytes is one character"
    return ""
