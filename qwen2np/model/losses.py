"""The training losses of the Qwen2 heads, as transformers 5.24 computes them (forward values only).

>>> import numpy as np
>>> logits = np.log(np.array([[0.5, 0.25, 0.25]], dtype=np.float32))
>>> float(cross_entropy(logits, np.array([0])))          # -log 0.5
0.6931471824645996
"""

import numpy as np

from ..errors import ModelInputError
from ..weights.backend import array_module, to_numpy

IGNORE_INDEX = -100


def log_softmax(x, axis=-1):
    xp = array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def cross_entropy(logits, labels, ignore_index=IGNORE_INDEX):
    """Mean negative log-likelihood of `labels` [N] under `logits` [N, C], skipping ignore_index.

    As torch, the mean over no labels at all is NaN.
    """
    xp = array_module(logits)
    labels = xp.asarray(labels).reshape(-1)
    keep = labels != ignore_index
    rows = xp.nonzero(keep)[0]
    picked = log_softmax(logits[rows])[xp.arange(rows.shape[0]), labels[rows]]   # [N_kept]
    with np.errstate(invalid="ignore", divide="ignore"):
        return -picked.sum() / logits.dtype.type(rows.shape[0])


def check_labels(labels, num_classes, what):
    """Class labels must be integers in [0, num_classes) or the ignore index -100 (checked on the host)."""
    labels = to_numpy(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ModelInputError(f"{what}: expected integer class ids, found dtype {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ModelInputError(
            f"{what}: label {int(labels[where])} at index {where} is outside [0, {num_classes}) "
            f"and is not the ignore index {IGNORE_INDEX}"
        )
    return labels


def _upcast(logits):
    """Half-precision logits as float32 (the dtype transformers computes these losses in)."""
    return logits.astype(np.float32) if logits.dtype.itemsize < 4 else logits


def causal_lm_loss(logits, labels):
    """Next-token loss: position t predicts labels[t + 1].  logits [B, T, V], labels [B, T] -> scalar

    transformers pads labels with -100 on the right and shifts them left, which pairs logits[:, t] with
    labels[:, t + 1] and ignores the last position.
    """
    xp = array_module(logits)
    labels = xp.asarray(labels)
    logits = _upcast(logits)   # transformers' ForCausalLMLoss: logits.float()
    B, T = labels.shape
    shifted = xp.concatenate([labels[:, 1:], xp.full((B, 1), IGNORE_INDEX, dtype=labels.dtype)], axis=1)
    return cross_entropy(logits.reshape(B * T, -1), shifted.reshape(-1))


def check_sequence_labels(labels, batch, config):
    """The problem type the labels [B] or [B, num_labels] of a sequence classifier pose, after checking them.

    subtle: like transformers, the problem type is inferred from num_labels and the labels' dtype when the
    config does not state it (sequence_classification_loss then stores it on the config).
    """
    host = to_numpy(labels)
    num_labels = config.num_labels
    problem_type = config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif host.dtype in (np.int64, np.int32):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if host.dtype.kind not in "iufb":
        raise ModelInputError(f"labels: expected numbers, found dtype {host.dtype}")
    if problem_type == "single_label_classification":
        check_labels(host, num_labels, "labels")
        if host.size != batch:
            raise ModelInputError(f"labels: expected one class id per row ({batch}), found shape {host.shape}")
    elif problem_type == "multi_label_classification" and host.shape != (batch, num_labels):
        raise ModelInputError(f"labels: expected shape (B, num_labels) = {(batch, num_labels)} for multi-label "
                         f"classification, found {host.shape}")
    elif problem_type == "regression" and host.size != batch * num_labels:
        raise ModelInputError(f"labels: expected {batch * num_labels} regression targets (B x num_labels), found shape "
                         f"{host.shape}")
    return problem_type


def sequence_classification_loss(pooled_logits, labels, config, problem_type=None):
    """Regression, single- or multi-label loss on pooled logits [B, num_labels].

    subtle: like transformers, the problem type is inferred once from num_labels and the labels' dtype,
    and stored on the config, so later calls keep it.
    """
    if pooled_logits.dtype.itemsize < 4:
        # subtle: transformers computes this loss in the logits' own half precision; here it is computed
        # in float32 and rounded once, which agrees within that precision's rounding (docs/numerics.md)
        loss = sequence_classification_loss(_upcast(pooled_logits), labels, config, problem_type)
        return loss.astype(pooled_logits.dtype)
    xp = array_module(pooled_logits)
    given, labels = labels, xp.asarray(labels)
    num_labels = config.num_labels
    if problem_type is None:
        problem_type = check_sequence_labels(given, pooled_logits.shape[0], config)
    config.problem_type = problem_type
    dtype = pooled_logits.dtype
    if config.problem_type == "regression":
        target = labels.astype(dtype)
        if num_labels == 1:
            return ((pooled_logits.squeeze() - target.squeeze()) ** 2).mean()
        return ((pooled_logits - target) ** 2).mean()
    if config.problem_type == "single_label_classification":
        return cross_entropy(pooled_logits.reshape(-1, num_labels), labels.reshape(-1))
    # multi-label: binary cross-entropy with logits, averaged over every (row, label)
    x, y = pooled_logits, labels.astype(dtype)
    return (xp.maximum(x, 0) - x * y + xp.log1p(xp.exp(-xp.abs(x)))).mean()


def token_classification_loss(logits, labels, num_labels):
    """Per-token cross-entropy, ignoring -100.  logits [B, T, C], labels [B, T] -> scalar"""
    check_labels(labels, num_labels, "labels")
    return cross_entropy(_upcast(logits).reshape(-1, num_labels), labels)   # transformers: logits.float()
