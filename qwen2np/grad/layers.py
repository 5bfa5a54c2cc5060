"""The backward pass of the small building blocks of a Qwen2 layer, each beside the forward it undoes
(qwen2np/model/layers.py), as plain functions of arrays.

Each function takes the gradient of the loss with respect to the forward's output (`d_y`, read "dL/dy")
and what the forward saw, and returns the gradients with respect to its inputs and weights. Shapes use
the legend of docs/dimensions.md: N rows (B·T flattened), D hidden size, F MLP width, V vocabulary.
docs/gradients.md derives each one in a few lines.

>>> import numpy as np
>>> x, w = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [5.0, 6.0]])    # y = x Wᵀ = [[11, 17]]
>>> d_x, d_w, _ = linear_backward(np.array([[1.0, 0.0]]), x, w)          # L = y[0, 0]
>>> d_x.tolist(), d_w.tolist()                                           # dL/dx = W[0], dL/dW[0] = x
([[3.0, 4.0]], [[1.0, 2.0], [0.0, 0.0]])
"""

import numpy as np

from ..inspection.tracing import tap
from ..weights.store import StoredWeight, block_rows


def matmul(d_y, weight):
    """d_y · W, the gradient a linear layer sends back to its input.  d_y [N, out], W [out, in] -> [N, in]

    W is an array or a weights.store.StoredWeight (converted a block of rows at a time, as the forward's
    `matmul_t` does). subtle: a kept weight goes in the very same blocks of rows, so that the gradients
    do not depend on how the memory budget holds the weights (bit for bit; tests/grad/test_model.py).
    """
    O, I = weight.shape
    rows = block_rows(max(2, d_y.shape[0]), I, d_y.dtype.itemsize)      # the prefill's blocks, whatever N
    out = None
    for r0 in range(0, O, rows):
        r1 = min(O, r0 + rows)
        block = weight.rows(r0, r1) if isinstance(weight, StoredWeight) else weight[r0:r1]   # [rows, in]
        part = d_y[:, r0:r1] @ block                                     # [N, rows] @ [rows, in] -> [N, in]
        if out is None:
            out = part
        else:
            out += part
    if isinstance(weight, StoredWeight):
        weight.done()
    return out


def linear_backward(d_y, x, weight, bias=False, need_weight=True):
    """Backward of y = x · Wᵀ + b.  d_y [..., out], x [..., in] -> d_x [..., in], d_W [out, in], d_b [out]

    d_x = d_y · W;  d_W = d_yᵀ · x (summed over every row, as W serves every row);  d_b = Σ_rows d_y.
    d_W is None unless `need_weight`, d_b None unless `bias`: a weight left out of the gradients costs
    nothing.
    """
    n_in = x.shape[-1]
    dy2 = d_y.reshape(-1, d_y.shape[-1])                                 # [N, out]
    d_x = matmul(dy2, weight).reshape(*d_y.shape[:-1], n_in)            # [N, out] @ [out, in] -> [..., in]
    d_w = dy2.T @ x.reshape(-1, n_in) if need_weight else None           # [out, N] @ [N, in] -> [out, in]
    d_b = dy2.sum(axis=0) if bias else None                              # [out]
    return d_x, d_w, d_b


def rms_norm_backward(d_y, x, weight, eps):
    """Backward of y = w ⊙ n with n = x · r, r = 1 / sqrt(mean(x²) + eps), over the last axis.

    d_y, x [..., D] -> d_x [..., D], d_w [D].

    With g = d_y ⊙ w (the gradient reaching n):  d_x = r · (g − n · mean(g ⊙ n)),  d_w = Σ_rows d_y ⊙ n.
    The mean term is r's share: every x_j moves r, and r scales every n_i.

    subtle: computed in the dtype rms_norm computes its statistics in (float32 or float64), as the
    forward recomputed here is the model's own, line for line (qwen2np/model/layers.py).
    """
    h = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    r = 1 / np.sqrt((h * h).mean(axis=-1, keepdims=True) + eps)         # [..., 1]
    n = (h * r).astype(x.dtype, copy=False)                              # [..., D], what the weight multiplies
    d_w = (d_y * n).reshape(-1, x.shape[-1]).sum(axis=0)                 # [D]
    g = d_y * weight                                                     # [..., D]
    d_x = r * (g - n * (g * n).mean(axis=-1, keepdims=True))             # [..., D]
    return d_x.astype(x.dtype, copy=False), d_w.astype(x.dtype, copy=False)


def sigmoid(x):
    """1 / (1 + exp(-x)), quiet where exp(-x) overflows (then 0, as it should be)."""
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-x))


def silu_backward(d_y, x):
    """Backward of silu(x) = x · σ(x):  d_x = d_y · σ(x) · (1 + x · (1 − σ(x))), torch's formula."""
    s = sigmoid(x)
    return d_y * (s * (1 + x * (1 - s)))


def relu_backward(d_y, x):
    """Backward of max(x, 0): the gradient passes where x > 0 (torch: not at 0)."""
    return d_y * (x > 0)


def gelu_tanh_backward(d_y, x):
    """Backward of 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x³), c = sqrt(2 / π)."""
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    k = x.dtype.type(0.044715)
    t = np.tanh(c * (x + k * x * x * x))
    return d_y * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x))


# the backward of each hidden_act of model/layers.py's ACT2FN
ACT_BACKWARD = {"silu": silu_backward, "swish": silu_backward, "relu": relu_backward,
                "gelu_pytorch_tanh": gelu_tanh_backward, "gelu_new": gelu_tanh_backward}


def swiglu_mlp_backward(d_out, x, gate, up, act, w, act_backward, scope, need):
    """Backward of Qwen2's MLP, down_proj(act(gate_proj x) ⊙ up_proj x) (model/layers.py's swiglu_mlp).

    d_out [B, T, D], and what the forward kept: its input x [B, T, D], gate, up and act(gate) [B, T, F]
    -> d_x [B, T, D], {name under `…mlp.`: gradient} for the weights `need(name)` asks for.

    Each factor of the product gets d_h times the other factor; the gate's then goes through act; x
    feeds both gate_proj and up_proj, so its gradient is the sum of what both send back.
    """
    grads = {}
    d_out = tap(scope, "down_proj.grad", d_out)                                    # [B, T, D]
    d_h, grads["down_proj.weight"], _ = linear_backward(d_out, act * up, w["down_proj.weight"],
                                                        need_weight=need("down_proj.weight"))   # -> [B, T, F]
    d_act = tap(scope, "act.grad", d_h * up)                                       # [B, T, F]
    d_up = tap(scope, "up_proj.grad", d_h * act)
    d_gate = tap(scope, "gate_proj.grad", act_backward(d_act, gate))
    d_x, grads["gate_proj.weight"], _ = linear_backward(d_gate, x, w["gate_proj.weight"],
                                                        need_weight=need("gate_proj.weight"))   # -> [B, T, D]
    d_x_up, grads["up_proj.weight"], _ = linear_backward(d_up, x, w["up_proj.weight"],
                                                         need_weight=need("up_proj.weight"))
    d_x += d_x_up
    return d_x, {n: g for n, g in grads.items() if g is not None}


def softmax_backward(d_p, p, axis=-1):
    """Backward of p = softmax(s):  d_s = p ⊙ (d_p − Σ_j d_p_j p_j), along `axis`.

    The Jacobian of softmax is diag(p) − p pᵀ; applied to d_p it gives the line above, without ever
    forming the S×S matrix.

    >>> p = np.array([0.25, 0.75]); d_s = softmax_backward(np.array([1.0, 1.0]), p)
    >>> d_s.tolist()      # adding a constant to every score changes nothing: no gradient
    [0.0, 0.0]
    """
    return p * (d_p - (d_p * p).sum(axis=axis, keepdims=True))


def embedding_backward(d_x, ids, num_embeddings, padding_idx=None):
    """Backward of x = E[ids]: each row of d_x is added to the row of E it was read from (a token that
    appears twice gets both).  d_x [B, T, D], ids [B, T] -> d_E [V, D], zero for the tokens not seen.

    subtle: np.add.at, not d_E[ids] += d_x, which would keep only one of a repeated token's rows.
    subtle: transformers' embedding is nn.Embedding(V, D, padding_idx=pad_token_id), whose padding row
    gets no gradient from the lookup, ever (the row stays as initialised): so here.

    >>> embedding_backward(np.ones((1, 3, 2)), np.array([[1, 0, 1]]), 3, padding_idx=0).tolist()
    [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    """
    D = d_x.shape[-1]
    d_e = np.zeros((num_embeddings, D), dtype=d_x.dtype)                  # [V, D] (pages untouched stay free)
    np.add.at(d_e, np.asarray(ids).reshape(-1), d_x.reshape(-1, D))
    if padding_idx is not None and -num_embeddings <= padding_idx < num_embeddings:
        d_e[padding_idx] = 0
    return d_e
