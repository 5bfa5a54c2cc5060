"""The grader's two promises (qwen2np/teaching/grader.py): a wrong answer is never called right, and
grading never raises on an answer, whatever the reader's function returns.

The named cases are the defects of issue 17 (each failed on the grader before it was fixed); the
property tests throw odd answers (None inside lists, strings of digits, complex numbers, NaN, ragged
lists, ints, dicts of junk) at every exercise that needs no checkpoint.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.generation.logits_process import top_p_filter
from qwen2np.inspection.interp import attribution_names, direct_logit_attribution
from qwen2np.inspection.tracing import trace
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.grader import Verdict, compare_array, compare_steps
from qwen2np.teaching.exercises.layer import attention_inputs

TINY = dict(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
IDS = np.array([[3, 17, 5, 9, 30, 2, 11]])


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=7)


def right_gqa(model):
    """A function returning the model's own steps of layer 0 (so: right)."""
    _, expected = attention_inputs(model, IDS, 0)
    steps = dict(expected)

    def gqa(q, k, v, mask):
        if q.shape[2] != IDS.shape[1]:        # the memory part: one query against many keys
            G = q.shape[1] // k.shape[1]
            B, H, T, HD = q.shape
            s = (q.reshape(B, k.shape[1], G * T, HD) @ k.swapaxes(-1, -2)) * np.float32(HD ** -0.5)
            e = np.exp(s - s.max(-1, keepdims=True))
            return ((e / e.sum(-1, keepdims=True)) @ v).reshape(B, H, T, HD)
        return dict(steps)
    return gqa, steps


# -- issue 17: wrong answers that passed ---------------------------------------------------------------------


@pytest.mark.parametrize("fill", [np.inf, np.nan], ids=["+inf", "nan"])
def test_top_p_does_not_pass_removed_tokens_filled_with_inf_or_nan(fill):
    scores = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))

    def top_p(s, p):
        ref = top_p_filter(s[None], p)[0]
        return np.where(np.isfinite(ref), ref, fill).astype(np.float32)

    verdict = ex.grade_top_p(top_p, scores)
    assert not verdict.passed and "a removed token must be -inf" in str(verdict)


def test_an_answer_without_its_final_result_does_not_pass(model):
    gqa, steps = right_gqa(model)
    assert ex.grade_gqa(gqa, model, IDS).passed
    only_scores = ex.grade_gqa(lambda *a: {"scores": steps["scores"]}, model, IDS)
    assert not only_scores.passed and only_scores.first_wrong == "context" and "missing" in str(only_scores)
    without_context = ex.grade_gqa(lambda *a: {"scores": steps["scores"], "probs": steps["probs"]}, model, IDS)
    assert not without_context.passed and without_context.first_wrong == "context"


def test_head_attribution_with_only_the_best_heads_does_not_pass(model):
    with trace(model, *attribution_names(model)) as t:
        model(IDS)
    grid = direct_logit_attribution(model, t, tokens=[4, 9]).layer_head_map(model)
    best = (grid[..., 0] - grid[..., 1]).argmax(axis=1)                   # right, but the terms are not given
    verdict = ex.grade_head_attribution(lambda t, m, a, o: {"best_heads": best}, model, IDS, 4, 9)
    assert not verdict.passed and verdict.first_wrong == "head_terms" and "missing" in str(verdict)


def test_complex_answers_do_not_pass_with_the_imaginary_part_dropped():
    ref = np.array([1.0, 2.0, 3.0])
    ok, detail = compare_array(ref + 1j, ref)
    assert not ok and "complex numbers" in detail
    ok, detail = compare_array(ref + 0j, ref)
    assert not ok and "take .real" in detail
    verdict = compare_steps("x", [("a", ref)], {"a": ref + 0.5j})
    assert not verdict.passed and verdict.first_wrong == "a"


def test_strings_of_the_right_numbers_do_not_pass():
    ref = np.array([1.0, 2.5, 3.0])
    ok, detail = compare_array(np.array(["1.0", "2.5", "3.0"]), ref)
    assert not ok and "not numbers" in detail
    ok, _ = compare_array(["1.0", "2.5", "3.0"], ref)
    assert not ok
    ok, _ = compare_array(np.array([1.0, 2.5, 3.0], dtype=object), ref)
    assert not ok


def test_wrong_answers_that_made_the_grader_raise_get_a_verdict(model):
    gqa = ex.grade_gqa(lambda q, k, v, m: {"scores": None, "probs": "x"}, model, IDS)   # KeyError before
    assert isinstance(gqa, Verdict) and not gqa.passed
    words = {("a", "b"): 3, ("a", "c"): 1}
    for answer in [3, [[["a", "c"], 1]], [["a", "b", "c"]], [("a", 1)], "ab", [None], {"a": "b"}, [[[["a"]]]]]:
        verdict = ex.grade_bpe_training(lambda w, n, answer=answer: answer, words, 1)
        assert isinstance(verdict, Verdict) and not verdict.passed, answer
    for right in ([["a", "b"]], [[["a", "b"], 3]]):       # lists of lists were a TypeError: now read as pairs
        assert ex.grade_bpe_training(lambda w, n, right=right: right, words, 1).passed


def test_nan_and_inf_where_the_model_has_numbers_are_wrong():
    ref = np.array([[0.0, -np.inf], [1.0, 2.0]])
    assert compare_array(ref.copy(), ref)[0]
    assert not compare_array(np.array([[0.0, np.inf], [1.0, 2.0]]), ref)[0]
    assert not compare_array(np.array([[0.0, -np.inf], [np.nan, 2.0]]), ref)[0]
    assert not compare_array(np.array([[-np.inf, -np.inf], [1.0, 2.0]]), ref)[0]


def test_a_function_that_is_not_callable_or_writes_into_its_inputs():
    assert "expected a function" in str(ex.grade_softmax(np.zeros(3)))

    def in_place(x):                       # writes the answer into its input: must not change the reference
        e = np.exp(x - x.max(-1, keepdims=True))
        x[...] = e / e.sum(-1, keepdims=True)
        return x
    assert ex.grade_softmax(in_place).passed


# -- property: junk never passes and never raises -------------------------------------------------------------

JUNK = st.recursive(
    st.none() | st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4)
    | st.complex_numbers(max_magnitude=10) | st.just(np.nan)
    | st.builds(lambda shape, kind: np.zeros(shape, dtype=kind), st.lists(st.integers(0, 4), max_size=3),
                st.sampled_from(["float32", "int64", "complex64", "bool", "U2", "O"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["scores", "probs", "context", "q", "loss", "output", "weights", "x"]), inner, max_size=3),
    max_leaves=6)


def grader_calls(model):
    """(name, grade(fn)) for exercises cheap enough to run many times."""
    scores = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))
    logits = np.random.default_rng(0).standard_normal((1, 4, 6)).astype(np.float32)
    return [
        ("byte_level", ex.grade_byte_level), ("softmax", ex.grade_softmax), ("causal_mask", ex.grade_causal_mask),
        ("padded_mask", ex.grade_padded_mask), ("attention_head", ex.grade_attention_head),
        ("multi_head", ex.grade_multi_head), ("top_k", lambda f: ex.grade_top_k(f, scores, ks=(2,))),
        ("top_p", lambda f: ex.grade_top_p(f, scores)), ("draw", ex.grade_draw),
        ("repetition", lambda f: ex.grade_repetition_penalty(f, scores, np.array([1, 3]))),
        ("lm_loss", lambda f: ex.grade_lm_loss(f, logits, np.array([[1, 2, -100, 3]]))),
        ("last_token", lambda f: ex.grade_last_token(f, 0)), ("first_divergence", ex.grade_first_divergence),
        ("bpe", lambda f: ex.grade_bpe(f, {("a", "b"): 0}, ["abab"])),
        ("bpe_training", lambda f: ex.grade_bpe_training(f, {("a", "b"): 2}, 1)),
        ("decode", lambda f: ex.grade_decode(f, [["Ġa"]])),
        ("q4k", lambda f: ex.grade_q4k_block(f, np.arange(144, dtype=np.uint8))),
        ("induction", lambda f: ex.grade_induction_scores(f, np.full((1, 1, 4, 4), 0.25), 2)),
        ("rms_norm", lambda f: ex.grade_rms_norm(f, model, IDS)), ("rope", lambda f: ex.grade_rope(f, model, IDS)),
        ("gqa", lambda f: ex.grade_gqa(f, model, IDS)), ("layer", lambda f: ex.grade_decoder_layer(f, model, IDS)),
        ("kv_cache", lambda f: ex.grade_kv_cache_step(f, model, IDS)),
        ("logit_lens", lambda f: ex.grade_logit_lens(f, model, IDS, 4)),
        ("head_attribution", lambda f: ex.grade_head_attribution(f, model, IDS, 4, 9)),
        ("greedy", lambda f: ex.grade_greedy(f, model, IDS, 2)),
        ("rms_norm_backward", ex.grade_rms_norm_backward), ("softmax_backward", ex.grade_softmax_backward),
    ]


def test_every_exercise_is_in_the_property_test(model):
    names = {n for n in dir(ex) if n.startswith("grade_")}
    assert len(grader_calls(model)) == len(names) == 28


@settings(max_examples=40, deadline=None)
@given(answer=JUNK)
def test_junk_answers_never_pass_and_never_raise(model, answer):
    for name, grade in grader_calls(model):
        verdict = grade(lambda *args, answer=answer: answer)
        assert isinstance(verdict, Verdict), name
        assert not verdict.passed, (name, answer, str(verdict))


@settings(max_examples=15, deadline=None)
@given(error=st.sampled_from([ValueError, IndexError, KeyError, ZeroDivisionError, TypeError]))
def test_a_function_that_raises_is_reported(model, error):
    for name, grade in grader_calls(model):
        def boom(*args):
            raise error("boom")
        verdict = grade(boom)
        assert not verdict.passed and f"your function raised {error.__name__}" in str(verdict), name
