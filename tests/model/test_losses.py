"""The heads' losses (qwen2np/model/losses.py), as transformers 5.24 computes them."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen2np import Qwen2Config, Qwen2ForTokenClassification
from qwen2np.errors import ModelInputError
from qwen2np.model.losses import (IGNORE_INDEX, causal_lm_loss, check_labels, check_sequence_labels, cross_entropy,
                                  sequence_classification_loss, token_classification_loss)

TINY = dict(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)


def nll(logits, labels):
    """Mean -log softmax(logits)[label] over the labels that are not ignored, in float64, by the formula."""
    logits = np.asarray(logits, np.float64)
    picked = [np.log(np.exp(row - row.max()).sum()) + row.max() - row[y] for row, y in zip(logits, labels)
              if y != IGNORE_INDEX]
    return np.mean(picked) if picked else np.nan


@given(N=st.integers(1, 6), C=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_cross_entropy_is_the_mean_negative_log_likelihood_of_the_kept_labels(N, C, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, C)) * 5).astype(np.float64)
    labels = rng.integers(0, C, N)
    labels[rng.random(N) < 0.3] = IGNORE_INDEX
    loss = cross_entropy(logits, labels)
    if (labels == IGNORE_INDEX).all():
        assert np.isnan(loss)
    else:
        assert np.isclose(loss, nll(logits, labels), rtol=1e-12, atol=1e-13)   # atol: a loss near 0 cancels


def test_no_label_at_all_gives_nan_as_torch():
    """The mean over no labels is 0 / 0: NaN (torch's cross_entropy with reduction='mean'), not 0."""
    loss = cross_entropy(np.zeros((3, 4), np.float32), np.full(3, IGNORE_INDEX))
    assert np.isnan(loss) and loss.dtype == np.float32


def test_the_causal_loss_pairs_each_position_with_the_next_label():
    """labels are shifted left: logits[:, t] predicts labels[:, t + 1]; the last position predicts nothing,
    and no position predicts the first label."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 5))
    labels = np.array([[1, 2, 3, 4], [0, IGNORE_INDEX, 2, 1]])
    expected = nll(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1))
    assert np.isclose(causal_lm_loss(logits, labels), expected, rtol=1e-12)
    only_first = np.full((2, 4), IGNORE_INDEX)
    only_first[:, 0] = 1                     # the first label is predicted by no position: nothing to learn
    assert np.isnan(causal_lm_loss(logits, only_first))


def test_half_precision_losses_are_computed_in_float32():
    import ml_dtypes

    logits = np.random.default_rng(1).standard_normal((1, 3, 6)).astype(ml_dtypes.bfloat16)
    labels = np.array([[1, 2, 3]])
    loss = causal_lm_loss(logits, labels)
    assert loss.dtype == np.float32 and loss == causal_lm_loss(logits.astype(np.float32), labels)


def test_labels_are_class_ids_or_minus_100():
    assert check_labels(np.array([[0, 3, IGNORE_INDEX]]), 4, "labels").tolist() == [[0, 3, -100]]
    with pytest.raises(ModelInputError, match=r"labels: label 4 at index \(0, 1\) is outside \[0, 4\)"):
        check_labels(np.array([[0, 4]]), 4, "labels")
    with pytest.raises(ModelInputError, match="labels: label -1 at index"):
        check_labels(np.array([-1]), 4, "labels")
    with pytest.raises(ModelInputError, match="expected integer class ids, found dtype float64"):
        check_labels(np.array([1.0]), 4, "labels")


@pytest.mark.parametrize("num_labels, labels, problem_type", [
    (1, np.array([0.5, -1.0]), "regression"),
    (3, np.array([0, 2]), "single_label_classification"),
    (3, np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), "multi_label_classification"),
])
def test_the_problem_type_is_inferred_as_transformers_and_kept_on_the_config(num_labels, labels, problem_type):
    config = Qwen2Config(**TINY, num_labels=num_labels)
    assert check_sequence_labels(labels, 2, config) == problem_type and config.problem_type is None
    logits = np.random.default_rng(2).standard_normal((2, num_labels)).astype(np.float32)
    sequence_classification_loss(logits, labels, config)
    assert config.problem_type == problem_type                   # stored: later calls keep it


def test_sequence_classification_losses_by_their_formulas():
    logits = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    config = lambda problem: Qwen2Config(**TINY, num_labels=3, problem_type=problem)   # noqa: E731
    assert np.isclose(sequence_classification_loss(logits, np.array([2, 0]), config("single_label_classification")),
                      nll(logits, [2, 0]))
    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    bce = -np.mean(y * np.log(1 / (1 + np.exp(-logits))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-logits))))
    assert np.isclose(sequence_classification_loss(logits, y, config("multi_label_classification")), bce)
    assert np.isclose(sequence_classification_loss(logits, y, config("regression")), np.mean((logits - y) ** 2))


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 5]), "label 5 at index (1,) is outside [0, 3)"),
    (np.array([0, 1, 2]), "expected one class id per row (2), found shape (3,)"),
    (np.array([[1.0, 0.0]]), "expected shape (B, num_labels) = (2, 3) for multi-label classification"),
])
def test_bad_sequence_labels_are_refused_with_what_was_expected(labels, message):
    with pytest.raises(ModelInputError) as e:
        check_sequence_labels(labels, 2, Qwen2Config(**TINY, num_labels=3))
    assert message in str(e.value)


def test_token_classification_loss_ignores_minus_100():
    model = Qwen2ForTokenClassification(Qwen2Config(**TINY, num_labels=4), seed=0)
    x = np.random.default_rng(0).integers(1, TINY["vocab_size"], (1, 5))
    labels = np.array([[1, -100, 2, 3, -100]])
    out = model(x, labels=labels)
    logits = out.logits[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([logp[0, 1], logp[2, 2], logp[3, 3]])
    assert abs(float(out.loss) - expected) < 1e-5
    assert np.isclose(token_classification_loss(out.logits, labels, 4), out.loss, rtol=0, atol=0)


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_and_the_causal_loss_are_torch(oracle, dtype):
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, 7, 11)) * 3).astype(dtype)
    labels = rng.integers(0, 11, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    flat_logits, flat_labels = logits.reshape(-1, 11), labels.reshape(-1)
    theirs = torch.nn.functional.cross_entropy(torch.from_numpy(flat_logits), torch.from_numpy(flat_labels),
                                               ignore_index=IGNORE_INDEX)
    np.testing.assert_allclose(cross_entropy(flat_logits, flat_labels), theirs.numpy(), rtol=2e-7 if dtype == np.float32
                               else 1e-15)
    if dtype == np.float32:
        theirs = ForCausalLMLoss(torch.from_numpy(logits), torch.from_numpy(labels), vocab_size=11)
    else:   # subtle: ForCausalLMLoss computes in float32 whatever the logits (logits.float()), one of the islands
        # float64 mode lifts (docs/float64.md): the shifted cross entropy in float64 is the reference
        shifted = np.concatenate([labels[:, 1:], np.full((2, 1), IGNORE_INDEX)], axis=1).reshape(-1)
        theirs = torch.nn.functional.cross_entropy(torch.from_numpy(flat_logits), torch.from_numpy(shifted))
    np.testing.assert_allclose(causal_lm_loss(logits, labels), theirs.numpy(), rtol=2e-7 if dtype == np.float32
                               else 1e-15)
    nothing = torch.nn.functional.cross_entropy(torch.zeros(2, 3, dtype=torch.float64),
                                                torch.full((2,), IGNORE_INDEX), ignore_index=IGNORE_INDEX)
    assert np.isnan(nothing.item()) and np.isnan(cross_entropy(np.zeros((2, 3)), np.full(2, IGNORE_INDEX)))


@pytest.mark.oracle
@pytest.mark.parametrize("num_labels, labels", [
    (1, np.array([0.5, -1.0, 2.0])),                                            # regression, one target
    (2, np.array([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]])),                       # regression, two targets
    (3, np.array([0, 2, 1])),                                                   # single label
    (3, np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),         # multi-label
])
def test_sequence_classification_losses_are_transformers(oracle, num_labels, labels):
    import torch
    from transformers.loss.loss_utils import ForSequenceClassificationLoss, ForTokenClassification

    logits = np.random.default_rng(4).standard_normal((3, num_labels)).astype(np.float32)
    ours_config = Qwen2Config(**TINY, num_labels=num_labels, problem_type="regression" if num_labels == 2 else None)
    their_config = oracle.Qwen2Config(**TINY, num_labels=num_labels, problem_type=ours_config.problem_type)
    ours = sequence_classification_loss(logits, labels, ours_config)
    theirs = ForSequenceClassificationLoss(torch.from_numpy(labels), torch.from_numpy(logits), their_config)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-7)
    assert ours_config.problem_type == their_config.problem_type
    if num_labels == 3 and labels.ndim == 1:                                    # and per token
        token_logits = np.random.default_rng(5).standard_normal((2, 4, 3)).astype(np.float32)
        token_labels = np.array([[0, 2, IGNORE_INDEX, 1], [1, 1, 0, IGNORE_INDEX]])
        theirs = ForTokenClassification(torch.from_numpy(token_logits), torch.from_numpy(token_labels), their_config)
        np.testing.assert_allclose(token_classification_loss(token_logits, token_labels, 3), theirs.numpy(),
                                   rtol=2e-7)
