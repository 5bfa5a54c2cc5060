"""qwen2np against golden outputs of transformers 5.24.0, with no torch needed.

The fixtures in tests/fixtures/golden/ were made by scripts/make_goldens.py: tiny random checkpoints
saved by transformers, and what transformers computed on them (eager attention, float32, CPU).
Positions whose attention_mask is 0 are not compared: transformers' own backends disagree there.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import qwen2np

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.json").is_file())
LOGITS_ATOL = 1e-5   # the tolerance for float32 logits
RTOL = 1e-5          # for other tensors: relative to the tensor's largest magnitude


def load_case(name):
    folder = GOLDEN / name
    meta = json.loads((folder / "case.json").read_text())
    return folder, meta, load_file(str(folder / "outputs.safetensors"))


def assert_close(actual, expected, keep, atol, what):
    """Max abs error over the kept positions (keep broadcasts against the leading axes)."""
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected)
    err = err[np.broadcast_to(keep, err.shape)] if keep is not None else err
    assert err.max() <= atol, f"{what}: max abs error {err.max():.3g} > {atol:.3g}"


def run(name):
    folder, meta, gold = load_case(name)
    model = getattr(qwen2np, meta["head"]).from_pretrained(folder)
    kwargs = {k: gold[k] for k in meta["inputs"] if k != "labels" or meta["head"] != "Qwen2Model"}
    out = model(**kwargs, output_hidden_states=True, output_attentions=True, use_cache=meta["use_cache"])
    return model, meta, gold, out


def token_keep(gold):
    """[B, T] True where the attention mask is 1 (everywhere for packed inputs, which have no mask)."""
    mask = gold.get("attention_mask")
    return np.ones(gold["input_ids"].shape, bool) if mask is None else mask.astype(bool)


def test_cases_exist():
    assert len(CASES) >= 15, CASES


@pytest.mark.parametrize("name", CASES)
def test_logits_and_loss(name):
    model, meta, gold, out = run(name)
    keep = token_keep(gold)
    if meta["head"] == "Qwen2Model":
        ref = gold["last_hidden_state"]
        assert_close(out.last_hidden_state, ref, keep[..., None], RTOL * max(1, np.abs(ref).max()), "last_hidden_state")
        return
    logits_keep = keep[..., None] if gold["logits"].ndim == 3 else None  # pooled logits: one per row
    assert_close(out.logits, gold["logits"], logits_keep, LOGITS_ATOL, "logits")
    if "loss" in gold:
        assert abs(float(out.loss) - float(gold["loss"][0])) <= 1e-5 * max(1, abs(float(gold["loss"][0]))), (
            f"loss {float(out.loss)} != {float(gold['loss'][0])}")


@pytest.mark.parametrize("name", CASES)
def test_hidden_states_and_attentions(name):
    model, meta, gold, out = run(name)
    keep = token_keep(gold)
    n_layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == n_layers + 1 and len(out.attentions) == n_layers
    for i, h in enumerate(out.hidden_states):
        ref = gold[f"hidden_states.{i}"]
        assert_close(h, ref, keep[..., None], RTOL * max(1, np.abs(ref).max()), f"hidden_states[{i}]")
    for i, a in enumerate(out.attentions):
        assert_close(a, gold[f"attentions.{i}"], keep[:, None, :, None], 1e-5, f"attentions[{i}]")


@pytest.mark.parametrize("name", [c for c in CASES if load_case(c)[1]["use_cache"]])
def test_cache_contents(name):
    model, meta, gold, out = run(name)
    keep = token_keep(gold)
    cache = out.past_key_values
    for i, layer in enumerate(cache.layers):
        for what in ("keys", "values"):
            ref = gold[f"cache.{i}.{what}"]
            S = ref.shape[2]  # a sliding layer keeps only its last W - 1 positions
            kept = keep[:, None, -S:, None]
            got = getattr(layer, what)
            assert_close(got, ref, kept, RTOL * max(1, np.abs(ref).max()), f"cache.{i}.{what}")


@pytest.mark.parametrize("name", [c for c in CASES if load_case(c)[1]["decode_steps"]])
def test_incremental_decoding(name):
    # subtle: the script ran the full forward first on the same model, and dynamic RoPE keeps state across
    # calls (it grew to the full length and does not shrink back): run() repeats that history
    model, meta, gold, _ = run(name)
    ids, mask = gold["input_ids"], gold["attention_mask"]
    T, steps = ids.shape[1], meta["decode_steps"]
    prefix = T - steps
    out = model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix])
    cache = out.past_key_values
    for s in range(steps):
        t = prefix + s
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
        assert out.past_key_values is cache and cache.get_seq_length() == t + 1
        assert_close(out.logits, gold[f"decode.{s}.logits"], mask[:, t:t + 1, None].astype(bool),
                     LOGITS_ATOL, f"decode step {s}")
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == gold[f"decode.cache.{i}.keys"].shape, f"layer {i} keeps the wrong positions"
