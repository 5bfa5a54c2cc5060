"""Notebook 3's exercises (the logit lens, the most important head of every layer, an induction-head
detector): the folded solutions pass, and the likely wrong answers are caught and named."""

import numpy as np
import pytest

from notebook_solutions import solutions
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.inspection.interp import softmax64
from qwen2np.inspection.tracing import trace
from qwen2np.model.layers import linear, rms_norm
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.exercises.inspection import induction_reference, repeated_random_tokens

SOLUTIONS = solutions("03_inspection.ipynb")
IDS = np.array([[3, 17, 5, 9, 30, 2, 11]])


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    m = Qwen2ForCausalLM(config, seed=7)
    w = dict(m.state_dict())
    w["model.norm.weight"] = (1 + np.random.default_rng(2).standard_normal(64) * 0.5).astype(np.float32)
    m.load_state_dict(w)
    return m


def wrong(verdict, message):
    assert not verdict.passed and message in str(verdict), (message, str(verdict))


def test_the_solutions_are_there():
    assert {"lens", "head_attribution", "induction_scores"} <= set(SOLUTIONS)


def test_the_logit_lens(model):
    lens = SOLUTIONS["lens"]
    verdict = ex.grade_logit_lens(lens, model, IDS, 4)
    assert verdict.passed and [s[0] for s in verdict.steps] == ["normed", "logits", "p_token"], verdict
    w = model.state_dict()

    def raw(streams, model, token):
        return softmax64(linear(streams, w["lm_head.weight"]))[:, token]

    def unweighted(streams, model, token):
        return softmax64(linear(rms_norm(streams, np.ones(64, np.float32), model.config.rms_norm_eps), w["lm_head.weight"]))[:, token]

    wrong(ex.grade_logit_lens(raw, model, IDS, 4), "lm_head was applied to the raw stream")
    wrong(ex.grade_logit_lens(unweighted, model, IDS, 4), "the norm's weight is missing")
    wrong(ex.grade_logit_lens(lambda *a: lens(*a)["logits"][:, 4], model, IDS, 4), "the logit of the token, not its probability")
    wrong(ex.grade_logit_lens(lambda *a: {"normed": lens(*a)["normed"]}, model, IDS, 4), "missing")


def test_the_most_important_head(model):
    fn = SOLUTIONS["head_attribution"]
    assert ex.grade_head_attribution(fn, model, IDS, answer=4, other=9).passed
    assert ex.grade_head_attribution(lambda *a: fn(*a)["head_terms"], model, IDS, answer=4, other=9).passed

    def no_scale(t, model, answer, other):
        w = model.state_dict()
        d = (w["lm_head.weight"][answer].astype(np.float64) - w["lm_head.weight"][other]) * w["model.norm.weight"]
        return np.stack([t[f"model.layers.{l}.self_attn.head_out"][0, :, -1] @ d for l in range(3)])

    verdict = ex.grade_head_attribution(no_scale, model, IDS, answer=4, other=9)
    assert verdict.first_wrong == "head_terms" and "the final norm's 1 / rms is missing" in str(verdict)
    swapped = ex.grade_head_attribution(lambda *a: -fn(*a)["head_terms"], model, IDS, answer=4, other=9)
    assert swapped.first_wrong == "head_terms" and "answer and other are swapped" in str(swapped)
    best_wrong = ex.grade_head_attribution(lambda *a: {**fn(*a), "best_heads": fn(*a)["head_terms"].argmin(1)},
                                           model, IDS, answer=4, other=9)
    assert best_wrong.first_wrong == "best_heads"


def test_induction_scores(model):
    n = 6
    ids = repeated_random_tokens(n, 48, seed=1, low=1)
    assert ids.shape == (1, 12) and (ids[0, :n] == ids[0, n:]).all()
    with trace(model, "model.layers.*.self_attn.probs") as t:
        model(ids)
    probs = np.stack([t[f"model.layers.{l}.self_attn.probs"][0] for l in range(3)])
    fn = SOLUTIONS["induction_scores"]
    assert ex.grade_induction_scores(fn, probs, n).passed
    np.testing.assert_array_equal(fn(probs, n), induction_reference(probs, n))
    rows = np.arange(n, 2 * n)
    cases = {
        "that is a duplicate-token head": lambda p, n: p[:, :, rows, rows - n].mean(-1),
        "a previous-token head": lambda p, n: p[:, :, rows, rows - 1].mean(-1),
        "the mean starts one position early": lambda p, n: p[:, :, np.arange(n - 1, 2 * n), np.arange(n - 1, 2 * n) - n + 1].mean(-1),
        "summed, not averaged": lambda p, n: p[:, :, rows, rows - n + 1].sum(-1),
    }
    for message, f in cases.items():
        wrong(ex.grade_induction_scores(f, probs, n), message)
