"""The BPE cache (qwen2np/tokenizer/bpe_cache.py) and the module-level caches: correct under eviction and under
threads, bounded in bytes, clearable; a long-running tokenizer gives the ids of a fresh one."""

import copy
import itertools
import pickle
import random
import string
import threading
import tracemalloc

import pytest

from qwen2np import Qwen2Tokenizer
from qwen2np.errors import TokenizerInputError, TokenizerTypeError
from qwen2np.tokenizer import BPECache, clear_caches, tables, unicode_compat
from qwen2np.tokenizer.bpe_cache import DEFAULT_MAX_BYTES, MAX_PIECE_BYTES, entry_bytes


def four_letter_words():
    """' aaaa', ' aaab', ...: 456,976 distinct pieces, each its own regex piece."""
    return (" " + "".join(p) for p in itertools.product(string.ascii_lowercase, repeat=4))


@pytest.fixture(scope="module")
def fresh_ids():
    """ids of a text by a tokenizer that caches nothing: the reference for every cached result."""
    reference = Qwen2Tokenizer.from_pretrained()
    reference.bpe_cache.max_bytes = 0
    return reference.encode


# ---------------------------------------------------------------- eviction
def test_issue_reproduction_eviction_during_encode():
    """The issue's reproduction. Before the fix, the cache held 200,000 pieces and was emptied *during*
    the third encode (199,990 + 2 cached + 21 new > 200,000), after 'Hello' had been found in it and
    before it was read back: KeyError: 'Hello'."""
    tok = Qwen2Tokenizer.from_pretrained()
    words = four_letter_words()
    tok.encode("".join(itertools.islice(words, 199_990)))
    assert tok.encode("Hello world") == [9707, 1879]
    tail = "".join(itertools.islice(words, 20))
    assert tok.encode("Hello" + tail) == [9707] + Qwen2Tokenizer.from_pretrained().encode(tail)


def test_eviction_keeps_results_exact(fresh_ids):
    """A cache of ~5,000 entries against 40,000 distinct pieces, old and new words mixed: it swaps
    generations dozens of times, and every result equals the uncached one."""
    tok = Qwen2Tokenizer.from_pretrained()
    tok.bpe_cache.max_bytes = 1_000_000
    words = list(itertools.islice(four_letter_words(), 40_000))
    rng = random.Random(0)
    for k in range(0, len(words), 400):
        text = "".join(words[k:k + 400] + rng.sample(words[: k + 400], 200))
        assert tok.encode(text) == fresh_ids(text)
        assert tok.bpe_cache.nbytes <= tok.bpe_cache.max_bytes
    assert 0 < len(tok.bpe_cache) < 40_000


def test_hit_path_and_older_generation():
    """Pieces found in the older generation are copied back (no BPE); the hit path computes nothing."""
    cache = BPECache(max_bytes=2 * (entry_bytes(1, 1) * 3))  # a generation holds 3 one-byte pieces
    calls = []

    def compute(piece):
        calls.append(piece)
        return [ord(piece)]

    assert cache.ids(list("abc"), compute) == [97, 98, 99] and sorted(calls) == ["a", "b", "c"]
    assert cache.ids(list("d"), compute) == [100]  # swap: older = {a, b, c}, recent = {d}
    calls.clear()
    assert cache.ids(list("abd"), compute) == [97, 98, 100] and calls == []  # from older and recent
    assert cache.ids(list("dd"), compute) == [100, 100] and calls == []


# ---------------------------------------------------------------- threads
def test_threads_share_one_cache(fresh_ids):
    """4 threads, one tokenizer with a small cache (constant eviction), overlapping words: every
    result equals the uncached one, and no thread raises."""
    tok = Qwen2Tokenizer.from_pretrained()
    tok.bpe_cache.max_bytes = 200_000
    words = list(itertools.islice(four_letter_words(), 12_000))
    results, errors = [], []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                text = "".join(rng.sample(words, 150))
                results.append((text, tok.encode(text)))
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 240
    assert all(ids == fresh_ids(text) for text, ids in results)


@pytest.mark.slow
def test_long_running_tokenizer_with_threads():
    """One tokenizer, 4 threads, 400,000 distinct pieces, each text half new words and half words seen
    before: the default 64 MiB bound (about 250 bytes per entry here, so a generation swap every ~130,000
    new pieces) evicts twice, every result equals a fresh tokenizer's, and the cache stays within its
    bound. (About 15 s on an idle 2-core machine.)"""
    tok = Qwen2Tokenizer.from_pretrained()
    words = list(itertools.islice(four_letter_words(), 400_000))
    per_thread = len(words) // 4
    results, errors = [], []

    def work(t):
        rng = random.Random(t)
        mine = words[t * per_thread:(t + 1) * per_thread]
        try:
            for k in range(0, len(mine), 500):
                seen = mine[: k + 500]
                text = "".join(mine[k:k + 500] + rng.choices(seen, k=500))
                results.append((text, tok.encode(text)))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 4 * (per_thread // 500)
    assert tok.bpe_cache.nbytes <= DEFAULT_MAX_BYTES
    assert len(tok.bpe_cache) < 400_000  # it evicted
    fresh = Qwen2Tokenizer.from_pretrained()
    assert all(ids == fresh.encode(text) for text, ids in results)


# ---------------------------------------------------------------- the bound in bytes
def test_long_pieces_are_not_cached():
    """Before the fix, 150 distinct 200 kB pieces kept 570 MB. Pieces of MAX_PIECE_BYTES or more are
    never cached now: 150 of them (with a stand-in BPE giving 100,000 ids each) leave the cache empty."""
    cache = BPECache()
    for k in range(150):
        piece = f"{k:03d}" + "x" * 199_997
        assert len(cache.ids([piece], lambda p: list(range(100_000)))) == 100_000
    assert (len(cache), cache.nbytes) == (0, 0)
    # and with the real tokenizer
    tok = Qwen2Tokenizer.from_pretrained()
    tok.encode("".join(random.Random(0).choices(string.ascii_lowercase, k=200_000)))  # one piece
    assert (len(tok.bpe_cache), tok.bpe_cache.nbytes) == (0, 0)
    assert len(tok.bpe_cache.ids(["y" * (MAX_PIECE_BYTES - 1)], tok._bpe_ids)) > 0 and len(tok.bpe_cache) == 1


def test_bound_holds_in_measured_memory():
    """30,000 distinct pieces of 200 bytes through a 4 MiB cache: the estimate stays under the bound,
    and the memory tracemalloc measures for the cache stays within 1.5x of it."""
    cache = BPECache(max_bytes=4 * 2**20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(300):
            pieces = [f"{k:04d}{i:04d}" * 25 for i in range(100)]  # 200 bytes each, all distinct
            cache.ids(pieces, lambda p: list(range(1000, 1100)))  # 100 fresh int objects per piece
            assert cache.nbytes <= cache.max_bytes
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1.5 * cache.max_bytes, f"{held / 2**20:.1f} MiB held for a 4 MiB bound"
    assert len(cache) < 30_000


def test_max_bytes_setting():
    tok = Qwen2Tokenizer.from_pretrained()
    assert tok.bpe_cache.max_bytes == DEFAULT_MAX_BYTES
    tok.encode("Hello world, hello again")
    assert len(tok.bpe_cache) > 0
    held = tok.bpe_cache.nbytes
    tok.bpe_cache.max_bytes = held + 1  # still above what it holds, but a generation must fit in half
    assert (len(tok.bpe_cache), tok.bpe_cache.nbytes) == (0, 0)
    for word in itertools.islice(four_letter_words(), 200):
        tok.encode(word)
        assert tok.bpe_cache.nbytes <= held + 1
    tok.bpe_cache.max_bytes = 0  # off
    assert tok.encode("Hello world") == [9707, 1879] and len(tok.bpe_cache) == 0
    with pytest.raises(TokenizerInputError, match="max_bytes: expected 0 or more bytes, found -1"):
        tok.bpe_cache.max_bytes = -1
    with pytest.raises(TokenizerTypeError, match="max_bytes: expected an int number of bytes, found str"):
        tok.bpe_cache.max_bytes = "64MB"
    assert tok.bpe_cache.max_bytes == 0  # refused values leave it as it was


# ---------------------------------------------------------------- clear
def test_clear():
    tok = Qwen2Tokenizer.from_pretrained()
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    assert len(tok.bpe_cache) == 9 and tok.bpe_cache.nbytes > 0
    tok.bpe_cache.clear()
    assert (len(tok.bpe_cache), tok.bpe_cache.nbytes) == (0, 0)
    assert tok.encode("The quick brown fox jumps over the lazy dog") == ids


def test_caches_are_per_tokenizer_and_copies_start_empty():
    a, b = Qwen2Tokenizer.from_pretrained(), Qwen2Tokenizer.from_pretrained()
    a.encode("only in a")
    assert len(a.bpe_cache) == 3 and len(b.bpe_cache) == 0
    a.bpe_cache.max_bytes = 12345
    for twin in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert len(twin.bpe_cache) == 0 and twin.bpe_cache.max_bytes == 12345
        assert twin.encode("only in a") == a.encode("only in a")


def test_clear_caches_empties_module_level_caches(tmp_path):
    tok = Qwen2Tokenizer.from_pretrained()
    tok.encode("\U00012550:A e\u0301")  # fills the Unicode-table caches
    assert tables._FILE_CACHE and unicode_compat.suspect_chars.cache_info().currsize == 1
    clear_caches()
    assert not tables._FILE_CACHE and unicode_compat.suspect_chars.cache_info().currsize == 0
    assert tok.encode("Hello world") == [9707, 1879]  # a tokenizer keeps its own tables
    assert Qwen2Tokenizer.from_pretrained().encode("\U00012550:A") == tok.encode("\U00012550:A")


def test_file_cache_is_bounded_least_recently_used_out(tmp_path, monkeypatch):
    from test_tokenizer_files import write_folder

    folders = [write_folder(tmp_path / name) for name in "abc"]
    one = tables.model_bytes(tables.load_model_files(folders[0] / "vocab.json", folders[0] / "merges.txt"))
    monkeypatch.setattr(tables, "_FILE_CACHE_MAX_BYTES", 2 * one)
    clear_caches()
    for folder in folders[:2] + folders[:1] + folders[2:]:  # a, b, a again, c: b is the least recent
        Qwen2Tokenizer.from_pretrained(folder)
    cached = {key[1][0] for key in tables._FILE_CACHE}
    assert cached == {str(folders[0] / "vocab.json"), str(folders[2] / "vocab.json")}
    clear_caches()
