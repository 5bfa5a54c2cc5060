"""Each operation's backward (qwen2np/grad/layers.py, attention.py, losses.py) against central finite
differences of the model's own forward function, in float64, on shapes hypothesis draws.

For a forward y = f(x, w), the scalar L = Σ y ⊙ r with a random r has d_y = r; the backward's d_x and d_w
must then be L's derivatives, checked element by element.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grad_support
from grad_support import directional_fd, elementwise_fd
from qwen2np.grad.attention import AttentionSaved, attention_core_backward, rope_backward
from qwen2np.grad.layers import (ACT_BACKWARD, embedding_backward, linear_backward, rms_norm_backward,
                                 softmax_backward, swiglu_mlp_backward)
from qwen2np.grad.losses import (causal_lm_loss_and_grad, cross_entropy_and_grad,
                                 sequence_classification_loss_and_grad, unbroadcast)
from qwen2np.model.attention import grouped_query_attention
from qwen2np.model.layers import ACT2FN, linear, rms_norm, softmax, swiglu_mlp
from qwen2np.model.losses import IGNORE_INDEX, causal_lm_loss, cross_entropy
from qwen2np.model.rope import apply_rope

TOL = 1e-8   # float64 with fourth-order differences: the errors seen are 1e-11 … 1e-10


def relative_error(fd, g):
    return grad_support.relative_error(fd, g, floor=1e-3)


def numeric(f, x):
    """Every partial derivative of the scalar f() with respect to the elements of x (changed in place)."""
    return elementwise_fd(f, x, range(x.size)).reshape(x.shape)


@settings(max_examples=20)
@given(n=st.integers(1, 4), d_in=st.integers(1, 5), d_out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_linear(n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    x, w, b, r = rng.standard_normal((2, n, d_in)), rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out), \
        rng.standard_normal((2, n, d_out))

    def loss():
        return float((linear(x, w, b) * r).sum())

    d_x, d_w, d_b = linear_backward(r, x, w, bias=True)
    for got, array in ((d_x, x), (d_w, w), (d_b, b)):
        assert got.shape == array.shape and relative_error(numeric(loss, array), got) <= TOL


def test_linear_leaves_out_what_is_not_asked_for():
    x, w = np.ones((1, 3, 2)), np.ones((4, 2))
    d_x, d_w, d_b = linear_backward(np.ones((1, 3, 4)), x, w, need_weight=False)
    assert d_w is None and d_b is None and d_x.shape == (1, 3, 2)


@settings(max_examples=20)
# subtle: from d = 2. With one feature the norm is x / sqrt(x² + eps) ≈ sign(x), whose derivative eps / |x|³
# is ~1e-4 where finite differences resolve 1e-11 (x = 0.12; hypothesis found it) and bends on the scale of
# |x| where it is large (x = 0.018: a truncation error of 1e-8): no step checks it to 1e-8 everywhere
@given(d=st.integers(2, 7), eps=st.sampled_from([1e-6, 1e-2]), seed=st.integers(0, 2**16))
def test_rms_norm(d, eps, seed):
    rng = np.random.default_rng(seed)
    x, w, r = rng.standard_normal((2, 3, d)), rng.standard_normal(d), rng.standard_normal((2, 3, d))

    def loss():
        return float((rms_norm(x, w, eps) * r).sum())

    d_x, d_w = rms_norm_backward(r, x, w, eps)
    assert relative_error(numeric(loss, x), d_x) <= TOL
    assert relative_error(numeric(loss, w), d_w) <= TOL


def test_rms_norm_of_one_feature_away_from_zero():
    x, w, r = np.array([[[0.7], [-1.3], [2.0]]]), np.array([1.5]), np.array([[[0.3], [-0.8], [1.1]]])

    def loss():
        return float((rms_norm(x, w, 1e-2) * r).sum())

    d_x, d_w = rms_norm_backward(r, x, w, 1e-2)
    assert relative_error(numeric(loss, x), d_x) <= TOL and relative_error(numeric(loss, w), d_w) <= TOL


def test_rms_norm_backward_keeps_float32():
    x = np.ones((1, 2, 4), np.float32)
    d_x, d_w = rms_norm_backward(x, x, np.ones(4, np.float32), 1e-6)
    assert d_x.dtype == d_w.dtype == np.float32


@pytest.mark.parametrize("act", sorted(ACT_BACKWARD))
def test_activations(act):
    x = np.concatenate([np.linspace(-6, 6, 25), [-100.0, 40.0]])   # far out: exp overflows quietly
    x = x[np.abs(x) > 1e-3] if act == "relu" else x                  # relu has no derivative at 0
    r = np.random.default_rng(0).standard_normal(x.shape)

    def loss():
        return float((ACT2FN[act](x) * r).sum())

    assert relative_error(numeric(loss, x), ACT_BACKWARD[act](r, x)) <= TOL


@settings(max_examples=15)
@given(t=st.integers(1, 4), f=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_swiglu_mlp(t, f, seed):
    rng = np.random.default_rng(seed)
    D = 3
    x, r = rng.standard_normal((1, t, D)), rng.standard_normal((1, t, D))
    w = {"gate_proj.weight": rng.standard_normal((f, D)), "up_proj.weight": rng.standard_normal((f, D)),
         "down_proj.weight": rng.standard_normal((D, f))}

    def loss():
        return float((swiglu_mlp(x, w["gate_proj.weight"], w["up_proj.weight"], w["down_proj.weight"]) * r).sum())

    gate, up = linear(x, w["gate_proj.weight"]), linear(x, w["up_proj.weight"])
    d_x, grads = swiglu_mlp_backward(r, x, gate, up, ACT2FN["silu"](gate), w, ACT_BACKWARD["silu"], None,
                                     lambda n: True)
    assert relative_error(numeric(loss, x), d_x) <= TOL
    for name, array in w.items():
        assert relative_error(numeric(loss, array), grads[name]) <= TOL, name


@settings(max_examples=20)
@given(s=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_softmax(s, seed):
    rng = np.random.default_rng(seed)
    x, r = rng.standard_normal((3, s)) * 3, rng.standard_normal((3, s))

    def loss():
        return float((softmax(x.copy()) * r).sum())

    assert relative_error(numeric(loss, x), softmax_backward(r, softmax(x.copy()))) <= TOL


@settings(max_examples=15)
@given(hd=st.sampled_from([2, 4, 8]), t=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rope(hd, t, seed):
    rng = np.random.default_rng(seed)
    x, r = rng.standard_normal((2, 3, t, hd)), rng.standard_normal((2, 3, t, hd))
    angles = rng.uniform(0, 10, (2, t, hd // 2))
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def loss():
        return float((apply_rope(x, cos, sin) * r).sum())

    assert relative_error(numeric(loss, x), rope_backward(r, cos, sin)) <= TOL


def test_embedding_adds_the_rows_of_a_repeated_token():
    d_x = np.arange(12, dtype=np.float64).reshape(1, 4, 3)
    d_e = embedding_backward(d_x, np.array([[2, 0, 2, 2]]), 5)
    assert d_e.tolist() == [[3, 4, 5], [0, 0, 0], [0 + 6 + 9, 1 + 7 + 10, 2 + 8 + 11], [0, 0, 0], [0, 0, 0]]


@settings(max_examples=20)
@given(kv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 3]), t=st.integers(1, 4), window=st.sampled_from([None, 2]),
       seed=st.integers(0, 2**16))
def test_grouped_query_attention(kv, g, t, window, seed):
    """softmax(q kᵀ · scaling + mask) v, backwards: the gradient of a KV head sums over its G query heads,
    and the masked keys get none."""
    from qwen2np.model.masks import attention_bias, visibility

    rng = np.random.default_rng(seed)
    B, H, HD = 2, kv * g, 4
    q, k, v = rng.standard_normal((B, H, t, HD)), rng.standard_normal((B, kv, t, HD)), rng.standard_normal((B, kv, t, HD))
    bias = np.broadcast_to(attention_bias(visibility(0, t, 0, t, window)[None, None], np.dtype(np.float64)), (B, 1, t, t))
    r = rng.standard_normal((B, H, t, HD))
    scaling = HD ** -0.5

    def loss():
        return float((grouped_query_attention(q, k, v, bias.copy(), scaling)[0] * r).sum())

    _, probs = grouped_query_attention(q, k, v, bias.copy(), scaling)
    saved = AttentionSaved(None, q, k, v, probs, None)
    d_q, d_k, d_v = attention_core_backward(r, saved, scaling, None)
    for got, array in ((d_q, q), (d_k, k), (d_v, v)):
        assert got.shape == array.shape and relative_error(numeric(loss, array), got) <= TOL


@settings(max_examples=20)
@given(n=st.integers(1, 5), c=st.integers(2, 6), items=st.sampled_from([None, 7]), seed=st.integers(0, 2**16))
def test_cross_entropy(n, c, items, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c)) * 3
    labels = rng.integers(0, c, n)
    labels[rng.random(n) < 0.3] = IGNORE_INDEX
    loss, d = cross_entropy_and_grad(logits, labels, items)
    if (labels == IGNORE_INDEX).all():
        assert (d == 0).all()
        return
    expected = cross_entropy(logits, labels) if items is None else \
        cross_entropy(logits, labels) * (labels != IGNORE_INDEX).sum() / items
    assert np.isclose(loss, expected, rtol=1e-14)
    assert relative_error(numeric(lambda: float(cross_entropy_and_grad(logits, labels, items)[0]), logits), d) <= TOL
    assert (d[labels == IGNORE_INDEX] == 0).all()


def test_the_causal_loss_value_is_the_models_bit_for_bit():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 2] = IGNORE_INDEX
    loss, d = causal_lm_loss_and_grad(logits, labels)
    assert loss == causal_lm_loss(logits, labels) and loss.dtype == d.dtype == np.float32
    assert (d[:, -1] == 0).all() and (d[0, 1] == 0).all()        # the last position, and the one before a -100


@pytest.mark.parametrize("problem_type, labels", [
    ("regression", np.array([0.5, -1.0, 2.0])),
    ("regression", np.array([[0.5, 1.0], [-1.0, 0.0], [2.0, 3.0]])),
    ("single_label_classification", np.array([0, 1, IGNORE_INDEX])),
    ("multi_label_classification", np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])),
])
def test_sequence_classification_losses(problem_type, labels):
    rng = np.random.default_rng(1)
    C = 1 if labels.ndim == 1 and problem_type == "regression" else 2
    pooled = rng.standard_normal((3, C))
    loss, d = sequence_classification_loss_and_grad(pooled, labels, problem_type)
    assert d.shape == pooled.shape
    f = lambda: float(sequence_classification_loss_and_grad(pooled, labels, problem_type)[0])
    assert relative_error(numeric(f, pooled), d) <= TOL


def test_unbroadcast_sums_what_broadcast():
    assert unbroadcast(np.ones((2, 3, 4)), (3, 1)).tolist() == [[8.0]] * 3


def test_directional_fd_is_exact_on_a_quartic():
    """The finite-difference helper itself: fourth-order differences are exact on polynomials of degree 4."""
    p = np.array([1.5, -0.5])
    value = directional_fd(lambda: float((p ** 4).sum()), p, np.array([1.0, 0.0]), h=0.1)
    assert abs(value - 4 * 1.5 ** 3) < 1e-12 and p.tolist() == [1.5, -0.5]
