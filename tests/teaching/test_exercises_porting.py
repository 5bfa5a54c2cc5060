"""Notebook 5's exercises (the first divergence, a Q4_K block by hand): the folded solutions pass, and the
likely wrong answers are caught and named."""

import numpy as np

from notebook_solutions import solutions
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.exercises.porting import divergence_cases, first_divergence_reference
from qwen2np.teaching.quant import q4k_encode

SOLUTIONS = solutions("05_porting_mistakes.ipynb")


def wrong(verdict, message):
    assert not verdict.passed and message in str(verdict), (message, str(verdict))


def test_the_solutions_are_there():
    assert {"first_divergence", "decode_q4k"} <= set(SOLUTIONS)


def test_the_cases_tell_the_mistakes_apart():
    answers = [first_divergence_reference(port, golden) for _, port, golden in divergence_cases()]
    assert answers == ["model.embed_tokens", "model.layers.2", "model.layers.2", None]


def test_the_first_divergence():
    fn = SOLUTIONS["first_divergence"]
    assert ex.grade_first_divergence(fn).passed

    def nan_blind(port, golden, rtol):
        for name, ref in golden.items():
            if np.abs(port[name] - ref).max() / np.abs(ref).max() > rtol:
                return name
        return None

    def alphabetical(port, golden, rtol):
        return fn(port, dict(sorted(golden.items())), rtol)

    def absolute(port, golden, rtol):
        return next((n for n in golden if not np.abs(port[n] - golden[n]).max() <= rtol), None)

    wrong(ex.grade_first_divergence(nan_blind), "NaN > rtol is False")
    wrong(ex.grade_first_divergence(alphabetical), "the first in alphabetical order")
    wrong(ex.grade_first_divergence(absolute), "that is the first *absolute* error")
    assert "not attempted" in str(ex.grade_first_divergence(lambda *a: NotImplemented))
    none = ex.grade_first_divergence(lambda *a: None)                  # an answer: "no divergence", wrong at first
    assert none.first_wrong == "a small tensor off by 1 %" and "yours None" in str(none)


def blocks():
    """Q4_K blocks from the plain encoder: random weights, weights of one sign, a constant run."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.standard_normal(256) * 0.02, np.abs(rng.standard_normal(256)), np.linspace(-3, 1, 256),
                  rng.standard_normal(256) * np.repeat(rng.uniform(0.1, 5, 8), 32)]).astype(np.float32)
    return q4k_encode(x)


def test_a_q4k_block_by_hand():
    decode = SOLUTIONS["decode_q4k"]
    verdict = ex.grade_q4k_block(decode, blocks())
    assert verdict.passed and "4 blocks" in str(verdict), verdict

    def changed(**replace):
        def fn(block):
            out = decode(block)
            s, qs = block[4:16], block[16:].reshape(4, 32)
            for name, f in replace.items():
                out[name] = f(out, s, qs)
            return out
        return fn

    cases = {
        "the nibbles are interleaved": changed(q=lambda o, s, qs: np.stack([qs & 15, qs >> 4], -1).reshape(256)),
        "high nibble first": changed(q=lambda o, s, qs: np.stack([qs >> 4, qs & 15], 1).reshape(256)),
        "sub-blocks 4-7 lack their top 2 bits": changed(scales=lambda o, s, qs: np.concatenate([s[0:4] & 63, s[8:12] & 15])),
        "+ dmin · min": changed(weights=lambda o, s, qs: o["weights"] + 2 * np.repeat(o["dmin"] * o["mins"].astype(np.float32), 32)),
        "without the sub-block scales": changed(weights=lambda o, s, qs: o["d"] * o["q"].astype(np.float32)
                                                - np.repeat(o["dmin"] * o["mins"].astype(np.float32), 32)),
    }
    for message, fn in cases.items():
        wrong(ex.grade_q4k_block(fn, blocks()), message)
    big_endian = ex.grade_q4k_block(changed(d=lambda o, s, qs: np.float32(s[:0].sum()) + 1.0), blocks())
    assert big_endian.first_wrong == "d"
