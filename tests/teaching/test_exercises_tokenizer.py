"""Notebook 1's exercises: the folded solutions pass, and the wrong answers a learner is likely to write
are caught and named (qwen2np/teaching/exercises/tokenizer.py)."""

from pathlib import Path

import pytest

from notebook_solutions import solutions
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.bpe_train import piece_counts, train_bpe
from qwen2np.tokenizer.bpe import merge_ranks
from qwen2np.tokenizer.bytes_level import bytes_to_unicode, to_byte_level

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = solutions("01_tokenizer.ipynb")
PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def test_the_solutions_are_there():
    assert {"byte_table", "bpe", "train", "decode"} <= set(SOLUTIONS)


def numbered(printable):
    """GPT-2's rule with another set of printable bytes."""
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    return {**table, **{b: chr(256 + n) for n, b in enumerate(others)}}


def test_the_byte_level_alphabet():
    assert ex.grade_byte_level(SOLUTIONS["byte_table"]).passed
    assert SOLUTIONS["byte_table"]() == bytes_to_unicode()
    wrong = {
        "chr(256 + b) happens to be right for the bytes 0..32 only":
            lambda: {b: chr(b) if b in PRINTABLE else chr(256 + b) for b in range(256)},
        "Byte 173 (0xAD, a soft hyphen)": lambda: numbered(PRINTABLE + [0xAD]),
        "is not printable: bytes outside": lambda: {b: chr(b) for b in range(256)},
        "byte 255 is missing": lambda: {b: c for b, c in bytes_to_unicode().items() if b != 255},
        "the keys must be the byte values": lambda: {str(b): c for b, c in bytes_to_unicode().items()},
    }
    for message, fn in wrong.items():
        verdict = ex.grade_byte_level(fn)
        assert not verdict.passed and message in str(verdict), (message, str(verdict))


def small_ranks():
    return merge_ranks([("a", "b"), ("c", "d"), ("ab", "cd"), ("a", "a"), ("aa", "a"), ("Ġ", "t")])


WORDS = ["abcd", "aaaa", "Ġtabcd", "xyz"]


def test_the_bpe_merge_loop():
    ranks = small_ranks()
    verdict = ex.grade_bpe(SOLUTIONS["bpe"], ranks, WORDS)
    assert verdict.passed, verdict

    def one_merge(word, ranks):
        pairs = [p for p in zip(word, word[1:]) if p in ranks]
        if not pairs:
            return list(word)
        best = min(pairs, key=ranks.get)
        i = list(zip(word, word[1:])).index(best)
        return list(word[:i]) + [best[0] + best[1]] + list(word[i + 2:])

    def highest_first(word, ranks):
        symbols = list(word)
        while (pairs := [p for p in zip(symbols, symbols[1:]) if p in ranks]):
            best = max(pairs, key=ranks.get)
            i = list(zip(symbols, symbols[1:])).index(best)
            symbols[i:i + 2] = [best[0] + best[1]]
        return symbols

    for fn, message in [(one_merge, "the loop stopped too early"), (highest_first, "highest rank first"),
                        (lambda w, r: list(w), "the state after 0 merge(s)"), (lambda w, r: [w[:-1]], "lost or added"),
                        (lambda w, r: "".join(w), "expected a list of strings")]:
        verdict = ex.grade_bpe(fn, ranks, WORDS)
        assert not verdict.passed and message in str(verdict), (message, str(verdict))


def test_the_bpe_merge_loop_leftmost_pair_first():
    ranks = merge_ranks([("a", "b"), ("b", "c"), ("c", "d"), ("ab", "c"), ("d", "e")])   # three mistakes, three results

    def leftmost(word, ranks):
        symbols = list(word)
        while (pairs := [p for p in zip(symbols, symbols[1:]) if p in ranks]):
            i = list(zip(symbols, symbols[1:])).index(pairs[0])
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    verdict = ex.grade_bpe(leftmost, ranks, ["abcde"])
    assert not verdict.passed and "the leftmost known pair first" in str(verdict), str(verdict)


def test_the_bpe_training_loop_and_an_unweighted_count():
    words = piece_counts([(ROOT / "LICENSE").read_text(encoding="utf-8")])
    train = SOLUTIONS["train"]
    assert ex.grade_bpe_training(train, words, 30).passed
    assert train(words, 30) == [pair for pair, _ in train_bpe(words, 30)]

    def unweighted(words, n):
        return [pair for pair, _ in train_bpe({w: 1 for w in words}, n)]

    verdict = ex.grade_bpe_training(unweighted, words, 30)
    assert verdict.first_wrong == "merge 2" and "('ĠĠ', 'ĠĠ')" in str(verdict)
    assert "weight each piece by how often it occurs" in str(verdict)
    too_few = ex.grade_bpe_training(lambda w, n: train(w, n - 1), words, 30)
    assert too_few.first_wrong == "count" and "29 merges, 30 asked for" in str(too_few)


def test_bpe_training_ties_are_any_of_the_most_frequent_pairs():
    words = {("a", "b"): 1, ("c", "d"): 1}
    assert ex.grade_bpe_training(lambda w, n: [("c", "d"), ("a", "b")], words, 2).passed
    assert ex.grade_bpe_training(lambda w, n: [("a", "b"), ("c", "d"), ("x", "y")], words, 3).first_wrong == "merge 3"


TOKENS = [[to_byte_level(t) for t in ["na", "ï", "ve", " café", " "]] + ["ðŁ", "¦", "ľ"], [to_byte_level("x²")]]


def test_decoding_by_hand():
    assert ex.grade_decode(SOLUTIONS["decode"], TOKENS).passed
    back = {c: b for b, c in bytes_to_unicode().items()}
    wrong = {
        "still the byte-level alphabet": lambda tokens: "".join(tokens),
        "you decoded token by token": lambda tokens: "".join(
            bytes(back[c] for c in t).decode("utf-8", errors="replace") for t in tokens),
        "the bytes are UTF-8, not latin-1": lambda tokens: bytes(back[c] for c in "".join(tokens)).decode("latin-1"),
        "expected the text (a str)": lambda tokens: bytes(back[c] for c in "".join(tokens)),
    }
    for message, fn in wrong.items():
        verdict = ex.grade_decode(fn, TOKENS)
        assert not verdict.passed and message in str(verdict), (message, str(verdict))


@pytest.mark.parametrize("answer", [None, 3, ["a"], {"text": 5}])
def test_decoding_odd_answers(answer):
    verdict = ex.grade_decode(lambda tokens: answer, TOKENS)
    assert not verdict.passed
