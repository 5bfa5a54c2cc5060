"""The reproducible sampler is the one docs/sampling.md specifies: its reference vectors, its worked
example, and the distribution it draws from."""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np.errors import GenerationError
from qwen2np.generation import sampling
from qwen2np.generation.testing import TinyCountingLM

DOC = Path(__file__).resolve().parents[2] / "docs" / "sampling.md"


def test_splitmix64_reference_vectors():
    # the outputs of SplitMix64 seeded with 1234567, as published with the generator (Vigna's splitmix64.c)
    # and quoted in docs/sampling.md
    text = DOC.read_text(encoding="utf-8")
    quoted = re.search(r"seeded with 1234567 its first outputs are ([\d, ]+)", text.replace("\n", " ")).group(1)
    expected = [int(v) for v in quoted.split(",")]
    state, outputs = 1234567, []
    for _ in expected:
        state = (state + sampling.GAMMA) & sampling.MASK64
        outputs.append(sampling.mix64(state))
    assert outputs == expected


def test_worked_example_of_the_docs():
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) +\| (\d) +\| (0x[0-9a-f]+) \| ([\d.]+) +\| (\d) +\|$", text, flags=re.M)
    assert len(rows) == 6
    scores = np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
    for row, step, x, u, token in rows:
        row, step = int(row), int(step)
        key = sampling.row_key(42, row)
        assert sampling.mix64((key + (step + 1) * sampling.GAMMA) & sampling.MASK64) == int(x, 16)
        assert repr(sampling.uniform(42, row, step)) == u
        assert sampling.draw_token(scores, float(u)) == int(token)
    for name, value in re.findall(r"`(K_1|mix64\(42\)) = (0x[0-9a-f]+)`", text):
        got = sampling.row_key(42, 1) if name == "K_1" else sampling.mix64(42)
        assert got == int(value, 16)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**64 - 1), row=st.integers(0, 64), step=st.integers(0, 10_000))
def test_uniform_is_in_unit_interval_and_repeats(seed, row, step):
    u = sampling.uniform(seed, row, step)
    assert 0.0 <= u < 1.0 and u == sampling.uniform(seed, row, step)


def test_draw_follows_the_distribution():
    # 40,000 draws from one seed: frequencies within 1% of the probabilities (deterministic, not flaky)
    p = np.array([0.05, 0.0, 0.15, 0.3, 0.5])
    with np.errstate(divide="ignore"):
        scores = np.log(p).astype(np.float32)
    counts = np.bincount([sampling.draw_token(scores, sampling.uniform(7, 0, t)) for t in range(40_000)],
                         minlength=5)
    assert counts[1] == 0  # a filtered token (-inf) is never drawn
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.01)


def test_draw_edges():
    scores = np.array([-np.inf, 1.0, -np.inf], dtype=np.float32)
    assert {sampling.draw_token(scores, u) for u in (0.0, 0.5, 0.999999)} == {1}
    with pytest.raises(GenerationError, match="cannot sample"):
        sampling.draw_token(np.full(3, -np.inf, dtype=np.float32), 0.5)


def test_generate_uses_the_documented_draws():
    # a stub whose logits are log(0.1..0.4) everywhere: generate must reproduce the table of the docs
    class FourTokens(TinyCountingLM):
        def __call__(self, input_ids, **kw):
            out = super().__call__(input_ids, **kw)
            out.logits = np.broadcast_to(np.log(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)),
                                         out.logits.shape[:2] + (4,)).copy()
            return out

    lm = FourTokens(vocab_size=4)
    out = lm.generate([[0], [0]], max_new_tokens=3, do_sample=True, seed=42, top_k=0)
    assert out[:, 1:].tolist() == [[3, 2, 1], [0, 3, 1]]
