"""Notebook 4's exercises (top-k, top-p, the repetition penalty, the draw, the loss, the pooling, the KV-cache
update, greedy decoding): the folded solutions pass, and the likely wrong answers are caught and named."""

import numpy as np
import pytest

from notebook_solutions import solutions
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.generation.logits_process import top_k_filter, top_p_filter
from qwen2np.model.layers import softmax
from qwen2np.teaching import exercises as ex
from qwen2np.teaching.exercises.generation import loss_matches_model, lm_loss_steps

SOLUTIONS = solutions("04_generation.ipynb")
IDS = np.array([[3, 17, 5, 9, 30, 2, 11]])
SCORES = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15, 0.0001, 0.0003], dtype=np.float32))
WIDE = np.random.default_rng(0).standard_normal(500).astype(np.float32) * 3


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    return Qwen2ForCausalLM(config, seed=7)


def wrong(verdict, message):
    assert not verdict.passed and message in str(verdict), (message, str(verdict))


def test_the_solutions_are_there():
    assert {"top_k", "top_p", "penalise", "draw", "lm_loss", "last_token", "cache_step", "greedy"} <= set(SOLUTIONS)


def test_top_k():
    top_k = SOLUTIONS["top_k"]
    for scores in (SCORES, WIDE):
        assert ex.grade_top_k(top_k, scores, ks=(1, 2, 5)).passed
    strict = lambda s, k: np.where(np.isin(np.arange(s.size), np.argsort(-s, kind="stable")[:k]), s, -np.inf)   # noqa: E731
    wrong(ex.grade_top_k(strict, WIDE), "tokens tied with the k-th best score are all kept")
    wrong(ex.grade_top_k(lambda s, k: top_k_filter(s[None], k + 1)[0], WIDE), "one token too many")
    wrong(ex.grade_top_k(lambda s, k: np.where(top_k(s, k) > -np.inf, s, np.nan), WIDE), "a removed token must be -inf")
    wrong(ex.grade_top_k(lambda s, k: np.where(top_k(s, k) > -np.inf, s * 2, -np.inf), WIDE), "left as they were")


def test_top_p():
    top_p = SOLUTIONS["top_p"]
    assert ex.grade_top_p(top_p, SCORES).passed and ex.grade_top_p(top_p, WIDE).passed

    def short(scores, p):
        order = np.argsort(-scores)
        e = np.exp(scores[order] - scores.max())
        keep = order[np.cumsum(e / e.sum()) < p]
        out = np.full_like(scores, -np.inf)
        out[keep] = scores[keep]
        return out

    verdict = ex.grade_top_p(short, SCORES)
    assert verdict.first_wrong == "p=0.5" and "the token whose probability crosses p: transformers keeps it" in str(verdict)
    wrong(ex.grade_top_p(lambda s, p: np.where(np.isfinite(top_p(s, p)), s * 2, -np.inf), SCORES), "left as they were")
    wrong(ex.grade_top_p(lambda s, p: np.where(np.isfinite(top_p_filter(s[None], p)[0]), s, np.inf), SCORES),
          "a removed token must be -inf")


def test_the_repetition_penalty():
    penalise = SOLUTIONS["penalise"]
    ids = np.array([1, 3, 3, 3, 6, 1])
    assert ex.grade_repetition_penalty(penalise, SCORES, ids, 1.3).passed
    counts = np.bincount(ids, minlength=SCORES.size)

    def divide_all(s, ids, p):
        out = s.copy()
        out[np.unique(ids)] /= np.float32(p)
        return out

    def every_time(s, ids, p):
        return np.where(counts > 0, np.where(s < 0, s * np.float32(p) ** counts, s / np.float32(p) ** counts), s)

    wrong(ex.grade_repetition_penalty(divide_all, SCORES, ids, 1.3), "negative scores were divided too")
    wrong(ex.grade_repetition_penalty(every_time, SCORES, ids, 1.3), "penalised n times")
    wrong(ex.grade_repetition_penalty(lambda s, ids, p: np.where(s < 0, s * np.float32(p), s / np.float32(p)), SCORES, ids, 1.3),
          "every token was penalised")


def test_the_draw():
    draw = SOLUTIONS["draw"]
    assert ex.grade_draw(draw).passed

    def by_probability(scores, u):
        w = np.exp(scores.astype(np.float64) - scores.max())
        order = np.argsort(-w, kind="stable")
        return int(order[np.searchsorted(np.cumsum(w[order]), u * w.sum(), side="right")])

    def unnormalised(scores, u):
        w = np.exp(scores.astype(np.float64) - scores.max())
        return int(np.searchsorted(np.cumsum(w), u, side="right"))

    wrong(ex.grade_draw(by_probability), "sorted by probability")
    wrong(ex.grade_draw(unnormalised), "times the *total* weight")
    wrong(ex.grade_draw(lambda s, u: float(draw(s, u))), "expected a token id (an int)")


def test_the_loss():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32) * 2
    labels = rng.integers(0, 11, size=(2, 6))
    labels[1, 4:] = -100
    labels[0, 0] = -100
    steps = dict(lm_loss_steps(logits, labels))
    assert np.isclose(steps["loss"], loss_matches_model(logits, labels), rtol=1e-5)    # transformers' loss
    lm_loss = SOLUTIONS["lm_loss"]
    assert ex.grade_lm_loss(lm_loss, logits, labels).passed

    def unshifted(logits, labels):
        z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        keep = labels != -100
        picked = np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
        loss = -(picked * keep).sum() / keep.sum()
        return {"loss": loss, "perplexity": np.exp(loss)}

    def mean_over_all(logits, labels):
        s = lm_loss(logits, labels)
        loss = s["nll"].mean()
        return {"loss": loss, "perplexity": np.exp(loss)}

    def summed(logits, labels):
        s = lm_loss(logits, labels)
        return {"loss": s["nll"].sum(), "perplexity": np.exp(s["nll"].sum())}

    def shifted_right(logits, labels):
        s = lm_loss(logits, labels)
        return {**s, "shifted_labels": np.concatenate([np.full((2, 1), -100), labels[:, :-1]], 1)}

    wrong(ex.grade_lm_loss(unshifted, logits, labels), "not shifted")
    wrong(ex.grade_lm_loss(mean_over_all, logits, labels), "were counted in the mean")
    wrong(ex.grade_lm_loss(summed, logits, labels), "the sum, not the mean")
    wrong(ex.grade_lm_loss(shifted_right, logits, labels), "shifted the wrong way")
    wrong(ex.grade_lm_loss(lambda *a: {"loss": lm_loss(*a)["loss"]}, logits, labels), "missing")


def test_pooling_the_last_token():
    last_token = SOLUTIONS["last_token"]
    assert ex.grade_last_token(last_token, 0).passed and ex.grade_last_token(last_token, 151643).passed
    wrong(ex.grade_last_token(lambda ids, pad: np.full(len(ids), ids.shape[1] - 1), 0), "always the last position")
    wrong(ex.grade_last_token(lambda ids, pad: (ids != pad).sum(-1) - 1, 0), "the number of real tokens minus one")
    wrong(ex.grade_last_token(lambda ids, pad: np.where((ids == pad).any(-1), np.argmax(ids == pad, -1) - 1,
                                                        ids.shape[1] - 1), 0), "the position before the first pad")


def test_the_kv_cache_update(model):
    step = SOLUTIONS["cache_step"]
    assert ex.grade_kv_cache_step(step, model, IDS).passed
    wrong(ex.grade_kv_cache_step(lambda ck, cv, q, k, v: {**step(ck, cv, q, k, v), "keys": np.concatenate([k, ck], 2)},
                                 model, IDS), "the new key went in front")

    def only_first_key(ck, cv, q, k, v):
        out = step(ck, cv, q, k, v)
        S = out["keys"].shape[2]
        G = q.shape[1] // k.shape[1]
        bias = np.where(np.arange(S) <= 0, 0, np.finfo(np.float32).min).astype(np.float32)   # tril(ones(1, S)) as a mask
        scores = q @ np.repeat(out["keys"], G, 1).swapaxes(-1, -2) * np.float32(q.shape[-1] ** -0.5)
        return {**out, "context": softmax(scores + bias) @ np.repeat(out["values"], G, 1)}

    wrong(ex.grade_kv_cache_step(only_first_key, model, IDS), "the new query saw key 0 only")


def test_greedy_decoding(model):
    greedy = SOLUTIONS["greedy"]
    verdict = ex.grade_greedy(greedy, model, IDS, 4)
    assert verdict.passed and "work" in str(verdict), verdict

    def no_cache(model, ids, n):
        for _ in range(n):
            ids = np.concatenate([ids, model(ids).logits[:, -1].argmax(-1)[:, None]], 1)
        return ids

    def whole_sequence_with_cache(model, ids, n):
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(n):
            ids = np.concatenate([ids, out.logits[:, -1].argmax(-1)[:, None]], 1)
            out = model(ids, past_key_values=cache)                    # the whole sequence again: wrong positions
        return ids

    wrong(ex.grade_greedy(no_cache, model, IDS, 4), "each step recomputed the whole sequence")
    verdict = ex.grade_greedy(whole_sequence_with_cache, model, IDS, 4)
    assert not verdict.passed and verdict.first_wrong.startswith("step"), str(verdict)
    wrong(ex.grade_greedy(lambda m, ids, n: greedy(m, ids, n)[:, ids.shape[1]:], model, IDS, 4), "the prompt and the")
