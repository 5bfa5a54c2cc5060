"""Reproducible sampling: a counter-based SplitMix64 stream and an inverse-CDF draw.

The same seed gives the same tokens on every run, machine and language: everything below is integer
arithmetic modulo 2**64 plus one float64 cumulative sum, written out so it can be ported in a few lines.
docs/sampling.md is the specification, with a worked example that tests/generation/test_generation_sampling.py checks.

* `mix64(z)`: SplitMix64's finaliser (Steele, Lea & Flood 2014; Vigna's splitmix64.c).
* The key of row b of a call seeded with `seed`: `K_b = mix64(mix64(seed) + b)`.
* The uniform for row b at step t (t = 0 for the first new token): `x = mix64(K_b + (t + 1) * GAMMA)`,
  i.e. the (t+1)-th output of a SplitMix64 generator whose state starts at K_b, and
  `u = (x >> 11) / 2**53`, a float64 in [0, 1).
* The draw: `w_i = exp(s_i - max(s))` in float64 over the processed float32 scores s, `c = cumsum(w)`
  left to right in token-id order, token = the first i with `c_i > u * c_last`. Filtered tokens
  (w_i = 0) can never be drawn.

A draw depends only on (seed, row, step), so a row's tokens do not change when other rows finish early.

>>> uniform(42, row=0, step=0)
0.6146409341949204
>>> draw_token(np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)), uniform(42, 0, 0))
3
"""

import secrets

import numpy as np

from ..errors import GenerationError

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, SplitMix64's increment


def mix64(z):
    """SplitMix64's output function on a 64-bit integer.

    >>> hex(mix64(0x9E3779B97F4A7C15))  # the first output of SplitMix64 seeded with 0
    '0xe220a8397b1dcdaf'
    """
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def row_key(seed, row):
    """K_b: the stream key of row `row` for a call seeded with `seed` (0 <= seed < 2**64)."""
    return mix64((mix64(seed) + row) & MASK64)


def uniform(seed, row, step):
    """The float64 in [0, 1) that picks the token of row `row` at step `step` (0 = first new token)."""
    x = mix64((row_key(seed, row) + (step + 1) * GAMMA) & MASK64)
    return (x >> 11) * (1.0 / (1 << 53))


def draw_token(scores, u):
    """Inverse CDF: the first token whose cumulative weight exceeds u times the total weight.

    `scores` [V] are the processed scores of one row (float32, -inf for filtered tokens).

    >>> draw_token(np.array([0.0, -np.inf, 0.0], dtype=np.float32), 0.5)   # weights 1, 0, 1
    2
    """
    scores = np.asarray(scores)
    # Filtered tokens (-inf) have weight exactly 0 and add exactly 0 to every later c_i, so summing over
    # the others only, still in token-id order, gives the same c_i and the same token, much faster
    # after a top-k.
    candidates = np.flatnonzero(scores > -np.inf)  # [n] token ids, ascending
    if candidates.size == 0:
        raise GenerationError("cannot sample: every token was filtered out (all scores are -inf)")
    s = scores[candidates].astype(np.float64)
    m = s.max()
    if not np.isfinite(m):
        raise GenerationError(f"cannot sample: the processed scores have no finite maximum ({m})")
    w = np.exp(s - m)  # [n] float64
    c = np.cumsum(w)  # sequential, left to right
    return int(candidates[np.searchsorted(c, u * c[-1], side="right")])


def sample_tokens(scores, seed, step):
    """One token per row of `scores` [B, V] for generation step `step`: int64 [B]."""
    B = scores.shape[0]
    return np.array([draw_token(scores[b], uniform(seed, b, step)) for b in range(B)], dtype=np.int64)


def fresh_seed():
    """A random seed for unseeded sampling (from the OS), so that results vary between calls."""
    return secrets.randbits(64)
