"""Notebook 6's exercises (qwen2np/teaching/exercises/training.py): RMSNorm's backward and softmax's backward.
The folded solutions, read from the notebook, pass the grader; the likely wrong answers are caught and
named; and the grader's references are gradients (central differences of L = Σ d_y ⊙ f(x) in float64)."""

import numpy as np
import pytest

from notebook_solutions import solutions
from qwen2np.grad.layers import rms_norm_backward, softmax_backward
from qwen2np.model.layers import rms_norm, softmax
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.exercises.training import rms_norm_inputs, softmax_inputs

SOLUTIONS = solutions("06_training.ipynb")


def wrong(verdict, step, message):
    assert not verdict.passed and verdict.first_wrong == step and message in str(verdict), (message, str(verdict))


def test_the_solutions_pass():
    assert {"rms_norm_backward_mine", "softmax_backward_mine"} <= set(SOLUTIONS)
    verdict = ex.grade_rms_norm_backward(SOLUTIONS["rms_norm_backward_mine"])
    assert verdict.passed and [s[0] for s in verdict.steps] == ["d_x", "d_w"], verdict
    verdict = ex.grade_softmax_backward(SOLUTIONS["softmax_backward_mine"])
    assert verdict.passed and [s[0] for s in verdict.steps] == ["d_s"], verdict
    # a dict of the outputs is read as well
    assert ex.grade_rms_norm_backward(lambda *a: dict(zip(("d_x", "d_w"), rms_norm_backward(*a)))).passed


def test_the_references_are_gradients():
    d_y, x, w, eps = rms_norm_inputs(shape=(1, 2, 6))
    d_x, d_w = rms_norm_backward(d_y, x, w, eps)
    for a, g in ((x, d_x), (w, d_w)):
        for index in np.ndindex(a.shape):
            old, h = a[index], 1e-6 * max(1.0, abs(a[index]))
            a[index] = old + h
            up = (d_y * rms_norm(x, w, eps)).sum()
            a[index] = old - h
            down = (d_y * rms_norm(x, w, eps)).sum()
            a[index] = old
            assert abs((up - down) / (2 * h) - g[index]) <= 1e-6 * np.abs(g).max()
    d_p, p = softmax_inputs(shape=(1, 1, 3, 3))
    s = np.log(np.where(p > 0, p, 1e-300))          # scores that give p back (the masked ones far below)
    d_s = softmax_backward(d_p, softmax(s))
    for index in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[index] = 1e-6
        fd = ((d_p * softmax(s + e)).sum() - (d_p * softmax(s - e)).sum()) / 2e-6
        assert abs(fd - d_s[index]) <= 1e-8


def r_of(x, eps, mean=True, outside=False):
    ms = (x * x).mean(-1, keepdims=True) if mean else (x * x).sum(-1, keepdims=True)
    return 1 / (np.sqrt(ms) + eps) if outside else 1 / np.sqrt(ms + eps)


def rms_mistake(*, r_constant=False, no_weight=False, mean_term=np.mean, sign=-1, eps_outside=False, no_eps=False,
                sum_of_squares=False, d_x_is_d_w=False, d_w_unnormalised=False, d_w_mean=False, d_w_unsummed=False,
                d_w_of_weight=False):
    """A reader's RMSNorm backward with one mistake, written the way a reader would."""
    def fn(d_y, x, weight, eps):
        D = x.shape[-1]
        if eps_outside or sum_of_squares:   # the wrong forward, differentiated by hand correctly
            r = r_of(x, eps, mean=not sum_of_squares, outside=eps_outside)
            g = d_y * weight
            if eps_outside:
                root = np.sqrt((x * x).mean(-1, keepdims=True))
                d_x = r * g - x * r ** 2 / (D * root) * (g * x).sum(-1, keepdims=True)
            else:
                d_x = r * g - x * r ** 3 * (g * x).sum(-1, keepdims=True)
        else:
            r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + (0 if no_eps else eps))
            n = x * r
            g = d_y if no_weight else d_y * weight
            d_x = r * g if r_constant else r * (g + sign * n * mean_term(g * n, axis=-1, keepdims=True))
        n = x * r_of(x, eps)
        if d_x_is_d_w:
            d_x = d_y * n
        per_position = d_y * (x if d_w_unnormalised else weight if d_w_of_weight else n)
        d_w = per_position.reshape(-1, D)
        d_w = d_w if d_w_unsummed else d_w.mean(axis=0) if d_w_mean else d_w.sum(axis=0)
        return d_x, d_w
    return fn


@pytest.mark.parametrize("mistake, step, message", [
    (dict(r_constant=True), "d_x", "r treated as a constant"),
    (dict(no_weight=True), "d_x", "the weight is missing from d_x"),
    (dict(d_x_is_d_w=True), "d_x", "this is the weight's gradient before its sum over positions"),
    (dict(mean_term=np.sum), "d_x", "a sum where the mean belongs"),
    (dict(sign=+1), "d_x", "the sign of r's term"),
    (dict(eps_outside=True), "d_x", "eps is outside the square root"),
    (dict(no_eps=True), "d_x", "eps is missing"),
    (dict(sum_of_squares=True), "d_x", "the root *mean* square divides by D"),
    (dict(d_w_unnormalised=True), "d_w", "the normalised x, not x"),
    (dict(d_w_mean=True), "d_w", "d_w is a sum over the positions, not a mean"),
    (dict(d_w_of_weight=True), "d_w", "the weight multiplies n, so n (not the weight) goes into its gradient"),
    (dict(d_w_unsummed=True), "d_w", "shape (10, 16), the model's is (16,)"),
    (dict(d_w_unsummed=True), "d_w", "d_w must be summed over every position (B and T)"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_rms_norm_mistakes_are_named(mistake, step, message):
    wrong(ex.grade_rms_norm_backward(rms_mistake(**mistake)), step, message)


def test_each_rms_norm_mistake_gets_its_own_message():
    """eps outside the square root and no eps at all differ by 1e-4 of the result here: each is named as
    itself, not as the other."""
    assert "eps is missing" not in str(ex.grade_rms_norm_backward(rms_mistake(eps_outside=True)))
    assert "outside" not in str(ex.grade_rms_norm_backward(rms_mistake(no_eps=True)))


def test_a_right_d_x_with_a_wrong_d_w_names_d_w():
    verdict = ex.grade_rms_norm_backward(lambda *a: (rms_norm_backward(*a)[0], rms_norm_backward(*a)[1] * 2))
    assert verdict.first_wrong == "d_w" and [s[1] for s in verdict.steps] == [True, False]


def sm(d_p, p, axis=-1, keepdims=True):
    return (d_p * p).sum(axis=axis, keepdims=keepdims)


@pytest.mark.parametrize("fn, message", [
    (lambda d_p, p: p * d_p, "only the Jacobian's diagonal"),
    (lambda d_p, p: p * (d_p - sm(d_p, p, axis=-2)), "runs over the keys, the last axis"),
    (lambda d_p, p: p * (d_p - (d_p * p).sum()), "one number per query (per row), summed over the keys only"),
    (lambda d_p, p: p * (d_p + sm(d_p, p)), "the sign of the second term"),
    (lambda d_p, p: p * (d_p - d_p.sum(axis=-1, keepdims=True)), "weighted by p, not Σ_j d_p_j"),
    (lambda d_p, p: d_p - sm(d_p, p), "the factor p is missing"),
], ids=["diagonal", "axis", "all-axes", "sign", "unweighted", "no-p"])
def test_softmax_mistakes_are_named(fn, message):
    wrong(ex.grade_softmax_backward(fn), "d_s", message)


def test_stubs_and_errors_are_reported_not_raised():
    assert "not attempted yet" in str(ex.grade_rms_norm_backward(lambda *a: None))
    assert "not attempted yet" in str(ex.grade_softmax_backward(lambda *a: None))
    assert "raised ZeroDivisionError" in str(ex.grade_softmax_backward(lambda d_p, p: 1 / 0))
    no_keepdims = ex.grade_softmax_backward(lambda d_p, p: p * (d_p - sm(d_p, p, keepdims=False)))   # [B, H, T]
    assert not no_keepdims.passed and "raised ValueError: operands could not be broadcast" in str(no_keepdims)
    assert "expected (d_x, d_w)" in str(ex.grade_rms_norm_backward(lambda *a: np.zeros(3)))
    d_p, p = softmax_inputs()
    assert (p[..., 0, 1:] == 0).all()      # the causal mask: the first query sees one key
