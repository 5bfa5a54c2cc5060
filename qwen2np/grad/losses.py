"""The heads' losses with their gradients, as transformers 5.24 computes the losses (qwen2np/model/losses.py)
and torch's autograd differentiates them.

Each function returns (loss, d_logits): the loss value, and its gradient with respect to the logits it
was given, of their shape and dtype.

Cross-entropy of one row, L = −log softmax(z)[y], has the gradient softmax(z) − onehot(y): the
probability the model gave each class, less 1 at the right one. Averaged over N rows, each row's
gradient is divided by N; rows whose label is -100 get none.

>>> import numpy as np
>>> loss, d = cross_entropy_and_grad(np.log(np.array([[0.5, 0.25, 0.25]])), np.array([0]))
>>> round(float(loss), 6), d.tolist()                # −log 0.5; p − onehot
(0.693147, [[-0.5, 0.25, 0.25]])
"""

import numpy as np

from ..errors import ModelInputError
from ..model.losses import IGNORE_INDEX, log_softmax


def cross_entropy_and_grad(logits, labels, num_items_in_batch=None, ignore_index=IGNORE_INDEX):
    """Cross-entropy of `labels` [N] under `logits` [N, C], skipping ignore_index, and its gradient [N, C].

    Reduced as transformers' `fixed_cross_entropy`: the mean over the rows kept, or, with
    `num_items_in_batch`, their sum divided by it (the count of labels over a whole accumulated batch).

    subtle: the mean is that of *this* call's rows. Accumulating micro-batches whose means are averaged
    weighs a token of a short micro-batch more than one of a long micro-batch; passing the batch's token
    count as num_items_in_batch to every micro-batch makes their sum the batch's loss (docs/gradients.md).
    """
    labels = np.asarray(labels).reshape(-1)
    rows = np.nonzero(labels != ignore_index)[0]
    dtype = logits.dtype
    log_p = log_softmax(logits[rows])                                   # [N_kept, C]
    picked = log_p[np.arange(rows.shape[0]), labels[rows]]              # [N_kept]
    count = dtype.type(rows.shape[0]) if num_items_in_batch is None else dtype.type(num_items_in_batch)
    with np.errstate(invalid="ignore", divide="ignore"):               # no label at all: NaN, as torch
        loss = -picked.sum() / count                                    # as model/losses.py's cross_entropy
        d_kept = np.exp(log_p) / count                                  # softmax(z) / count ...
        d_kept[np.arange(rows.shape[0]), labels[rows]] -= dtype.type(1) / count   # ... − onehot(y) / count
    d_logits = np.zeros_like(logits)                                    # ignored rows: no gradient
    d_logits[rows] = d_kept
    return loss, d_logits


def causal_lm_loss_and_grad(logits, labels, num_items_in_batch=None):
    """Next-token loss and its gradient: position t predicts labels[t + 1].  logits [B, T, V],
    labels [B, T] -> loss, d_logits [B, T, V] (zero at the last position, which predicts nothing)."""
    B, T = labels.shape
    shifted = np.concatenate([labels[:, 1:], np.full((B, 1), IGNORE_INDEX, dtype=labels.dtype)], axis=1)
    loss, d = cross_entropy_and_grad(logits.reshape(B * T, -1), shifted.reshape(-1), num_items_in_batch)
    return loss, d.reshape(logits.shape)


def token_classification_loss_and_grad(logits, labels):
    """Per-token cross-entropy and its gradient.  logits [B, T, C], labels [B, T] -> loss, d_logits"""
    C = logits.shape[-1]
    loss, d = cross_entropy_and_grad(logits.reshape(-1, C), labels)
    return loss, d.reshape(logits.shape)


def sequence_classification_loss_and_grad(pooled, labels, problem_type):
    """The loss of a sequence classifier and its gradient: pooled logits [B, C] -> loss, d_pooled [B, C].

    `problem_type` is model/losses.py's `check_sequence_labels` answer: "regression" (mean squared error;
    with one label, of the squeezed logits, as torch's MSELoss sees them), "single_label_classification"
    (cross-entropy) or "multi_label_classification" (binary cross-entropy with logits, mean over every
    (row, label)).
    """
    dtype = pooled.dtype
    labels = np.asarray(labels)
    if problem_type == "single_label_classification":
        return cross_entropy_and_grad(pooled.reshape(-1, pooled.shape[-1]), labels.reshape(-1))
    if problem_type == "regression":
        x, y = (pooled.squeeze(), labels.astype(dtype).squeeze()) if pooled.shape[-1] == 1 else \
            (pooled, labels.astype(dtype))
        diff = x - y                                                    # broadcast as the forward does
        loss = (diff ** 2).mean()
        d = (dtype.type(2) / dtype.type(diff.size)) * diff              # d mean(diff²) / d diff
        return loss, unbroadcast(d, x.shape).reshape(pooled.shape)
    if problem_type == "multi_label_classification":
        x, y = pooled, labels.astype(dtype)
        loss = (np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))).mean()
        with np.errstate(over="ignore"):
            d = (1 / (1 + np.exp(-x)) - y) / dtype.type(x.size)         # (σ(x) − y) / (B · C)
        return loss, unbroadcast(d, x.shape)
    raise ModelInputError(f"problem_type: expected regression, single_label_classification or "
                          f"multi_label_classification, found {problem_type!r}")


def unbroadcast(d, shape):
    """`d` summed over the axes along which a tensor of `shape` was broadcast to d's shape (what autograd
    does for an operand that broadcast)."""
    while d.ndim > len(shape):
        d = d.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and d.shape[axis] != 1:
            d = d.sum(axis=axis, keepdims=True)
    return d
