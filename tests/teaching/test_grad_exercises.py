"""Notebook 6's exercises (qwen2np/teaching/grad_exercises.py): the folded solutions pass the grader, and
the typical wrong answers are caught and named, the ones the notebook shows included.

The solutions are read from the notebook itself (its markdown cells tagged `solution`), so the solution
a reader unfolds is the one tested.
"""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

from qwen2np.grad.layers import rms_norm_backward, softmax_backward
from qwen2np.teaching.grad_exercises import (grade_rms_norm_backward, grade_softmax_backward, rms_norm_inputs,
                                             softmax_inputs)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "06_training.ipynb"


def solutions():
    """{name: function} of every folded solution of notebook 6."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    namespace = {"np": np}
    for cell in cells:
        if "solution" in cell.get("metadata", {}).get("tags", []):
            code = re.search(r"```python\n(.*?)```", "".join(cell["source"]), re.S).group(1)
            tree = ast.parse(code)
            tree.body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
            exec(compile(tree, NOTEBOOK.name, "exec"), namespace)
    return namespace


def test_the_solutions_pass():
    found = solutions()
    verdict = grade_rms_norm_backward(found["rms_norm_backward_mine"])
    assert verdict.passed, verdict
    assert [s[0] for s in verdict.steps] == ["d_x", "d_w"]
    verdict = grade_softmax_backward(found["softmax_backward_mine"])
    assert verdict.passed, verdict


def test_the_references_are_gradients():
    """The grader's reference is the gradient: central differences of L = Σ d_y ⊙ f(x) in float64."""
    from qwen2np.model.layers import rms_norm, softmax

    d_y, x, w, eps = rms_norm_inputs(shape=(1, 2, 6))
    d_x, d_w = rms_norm_backward(d_y, x, w, eps)
    for a, g in ((x, d_x), (w, d_w)):
        for index in np.ndindex(a.shape):
            old, h = a[index], 1e-6
            a[index] = old + h
            up = (d_y * rms_norm(x, w, eps)).sum()
            a[index] = old - h
            down = (d_y * rms_norm(x, w, eps)).sum()
            a[index] = old
            assert abs((up - down) / (2 * h) - g[index]) <= 1e-7 * max(1.0, abs(g[index]))
    rng = np.random.default_rng(1)
    s, d_p = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    d_s = softmax_backward(d_p, softmax(s))
    for index in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[index] = 1e-6
        fd = ((d_p * softmax(s + e)).sum() - (d_p * softmax(s - e)).sum()) / 2e-6
        assert abs(fd - d_s[index]) <= 1e-8


def _r_constant(d_y, x, weight, eps):
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return r * d_y * weight, (d_y * x * r).reshape(-1, x.shape[-1]).sum(axis=0)


def _no_weight(d_y, x, weight, eps):
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    n = x * r
    return r * (d_y - n * (d_y * n).mean(axis=-1, keepdims=True)), (d_y * n).reshape(-1, x.shape[-1]).sum(axis=0)


def _right_d_x(d_y, x, weight, eps):
    return rms_norm_backward(d_y, x, weight, eps)[0]


@pytest.mark.parametrize("fn, first_wrong, hint", [
    (_r_constant, "d_x", "r treated as a constant"),
    (_no_weight, "d_x", "the weight is missing from d_x"),
    (lambda d_y, x, w, eps: (_right_d_x(d_y, x, w, eps), (d_y * x * (1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps))).reshape(-1, 16)),
     "d_w", "shape (10, 16), the model's is (16,)"),
    (lambda d_y, x, w, eps: (_right_d_x(d_y, x, w, eps), (d_y * x).reshape(-1, x.shape[-1]).sum(axis=0)),
     "d_w", "with n = x / sqrt(mean(x²) + eps)"),
])
def test_typical_rms_norm_mistakes_are_named(fn, first_wrong, hint):
    verdict = grade_rms_norm_backward(fn)
    assert not verdict.passed and verdict.first_wrong == first_wrong
    assert hint in str(verdict), str(verdict)


@pytest.mark.parametrize("fn, hint", [
    (lambda d_p, p: p * d_p, "only the Jacobian's diagonal"),
    (lambda d_p, p: p * (d_p - (d_p * p).sum(axis=-2, keepdims=True)), "runs over the keys, the last axis"),
    (lambda d_p, p: p * (d_p + (d_p * p).sum(axis=-1, keepdims=True)), "the sign of the second term"),
])
def test_typical_softmax_mistakes_are_named(fn, hint):
    verdict = grade_softmax_backward(fn)
    assert not verdict.passed and verdict.first_wrong == "d_s"
    assert hint in str(verdict), str(verdict)


def test_stubs_and_errors_are_reported_not_raised():
    assert "not attempted yet" in str(grade_rms_norm_backward(lambda *a: None))
    assert "not attempted yet" in str(grade_softmax_backward(lambda *a: None))
    assert "raised ZeroDivisionError" in str(grade_softmax_backward(lambda d_p, p: 1 / 0))
    assert "expected (d_x, d_w)" in str(grade_rms_norm_backward(lambda *a: np.zeros(3)))
    d_p, p = softmax_inputs()
    assert (p[..., 0, 1:] == 0).all()      # the causal mask: the first query sees one key
