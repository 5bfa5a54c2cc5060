"""Gradient accumulation: the gradient of one batch equals the sum over its micro-batches when each divides
its summed loss by the batch's label count (`num_items_in_batch`, as transformers' Trainer passes it), and
differs when each micro-batch takes its own mean (the trap of trainers until late 2024, docs/gradients.md)."""

import numpy as np
import pytest

from grad_support import CONFIGS, config_of
from qwen2np import Qwen2ForCausalLM, value_and_grad

# four sequences; the first two (one micro-batch) have many labels, the last two few: -100 where ignored
IDS = np.array([[3, 5, 7, 9, 11, 13, 2, 4],
                [6, 8, 10, 12, 14, 16, 18, 1],
                [0, 0, 0, 0, 0, 7, 8, 9],
                [0, 0, 0, 0, 0, 0, 11, 12]])
MASK = (IDS != 0).astype(np.int64)
LABELS = np.where(MASK == 1, IDS, -100)
MICRO = [slice(0, 2), slice(2, 4)]


def label_count(labels):
    """The labels a causal LM predicts: every one but the first of each row (shifted), -100 left out."""
    return int((labels[:, 1:] != -100).sum())


def model64():
    return Qwen2ForCausalLM(config_of(CONFIGS["gqa-sliding"]), dtype="float64", seed=9)


def test_the_sum_over_micro_batches_with_num_items_in_batch_is_the_batch_gradient():
    model = model64()
    n = label_count(LABELS)
    assert [label_count(LABELS[m]) for m in MICRO] == [14, 5] and n == 19
    loss, grads = value_and_grad(model, IDS, labels=LABELS, attention_mask=MASK)
    total_loss, total = 0.0, {k: np.zeros_like(g) for k, g in grads.items()}
    for m in MICRO:
        part_loss, part = value_and_grad(model, IDS[m], labels=LABELS[m], attention_mask=MASK[m], num_items_in_batch=n)
        total_loss += part_loss
        for k in total:
            total[k] += part[k]
    assert abs(total_loss - loss) <= 1e-14 * loss
    for k, g in grads.items():
        assert np.abs(total[k] - g).max() <= 1e-12 * np.abs(g).max(), k


def test_the_mean_of_per_micro_batch_means_is_another_gradient():
    """Averaging each micro-batch's mean loss weighs each of the 5 labels of the second micro-batch 14/5
    times as much as each of the first's 14: a different loss and a different gradient."""
    model = model64()
    loss, grads = value_and_grad(model, IDS, labels=LABELS, attention_mask=MASK)
    parts = [value_and_grad(model, IDS[m], labels=LABELS[m], attention_mask=MASK[m]) for m in MICRO]
    naive_loss = sum(p[0] for p in parts) / len(parts)
    naive = {k: sum(p[1][k] for p in parts) / len(parts) for k in grads}
    assert abs(naive_loss - loss) > 1e-2 * loss
    worst = max(np.abs(naive[k] - g).max() / np.abs(g).max() for k, g in grads.items())
    assert worst > 0.1
    # and the per-token weighting, made explicit: mean_i · N_i / N summed is the batch's loss
    counts = [label_count(LABELS[m]) for m in MICRO]
    assert np.isclose(sum(p[0] * c for p, c in zip(parts, counts)) / sum(counts), loss, rtol=1e-14)


@pytest.mark.oracle
def test_accumulation_matches_transformers_with_num_items_in_batch(oracle, dt):
    """transformers float64 (islands lifted), loss.backward() per micro-batch with num_items_in_batch, the
    gradients accumulating in .grad as a Trainer's do: qwen2np's sum within 1e-10."""
    import torch

    from test_grad_oracle import rel, twin

    config = {**CONFIGS["gqa-sliding"], "vocab_size": 20}
    hf, ours = twin(oracle, "Qwen2ForCausalLM", config, 7, "float64")
    n = label_count(LABELS)
    hf.zero_grad(set_to_none=True)
    with torch.enable_grad(), dt.float64_everywhere():
        for m in MICRO:
            out = hf(torch.from_numpy(IDS[m]), attention_mask=torch.from_numpy(MASK[m]),
                     labels=torch.from_numpy(LABELS[m]), num_items_in_batch=torch.tensor(n))
            out.loss.backward()
    total = {}
    for m in MICRO:
        _, part = value_and_grad(ours, IDS[m], labels=LABELS[m], attention_mask=MASK[m], num_items_in_batch=n)
        for k, g in part.items():
            total[k] = total.get(k, 0) + g
    for k, p in hf.named_parameters():
        assert rel(total[k], p.grad.numpy()) <= 1e-10, k
