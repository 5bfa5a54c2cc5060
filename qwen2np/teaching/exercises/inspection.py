"""Exercises of notebook 3 (inspection): the logit lens, the most important head of every layer (direct
logit attribution), and an induction-head detector on repeated random tokens.
"""

import numpy as np

from ...inspection.interp import attribution_names, direct_logit_attribution, stream_names
from ...inspection.tracing import trace
from ...weights.backend import to_numpy
from ...weights.store import as_array
from ..grader import Verdict, call, compare_steps, graded, recognise
from .attention import softmax64


def _head_weights(model):
    w = model.state_dict()
    return to_numpy(as_array(w["model.norm.weight"])), to_numpy(as_array(w.get("lm_head.weight", w["model.embed_tokens.weight"])))


# -- the logit lens ------------------------------------------------------------------------------------------


@graded("the logit lens")
def grade_logit_lens(fn, model, input_ids, token):
    """`fn(streams, model, token)` -> the probability of `token` read from each residual stream at the last
    position [L + 1] (or a dict with "normed" [L + 1, D], the final norm of each stream, "logits"
    [L + 1, V], and "p_token" [L + 1]); `streams` is [L + 1, D]: the embeddings and the output of each
    layer at the last position."""
    exercise = "the logit lens"
    names = stream_names(model)
    with trace(model, *names) as t:
        model(input_ids)
    streams = np.stack([t[n][0, -1] for n in names])                           # [L + 1, D]
    out, failed = call(exercise, fn, streams, model, token)
    if failed:
        return failed
    norm_w, lm_head = _head_weights(model)
    eps = model.config.rms_norm_eps
    x = streams.astype(np.float64)
    normed = norm_w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)       # [L + 1, D]
    logits = normed @ lm_head.T.astype(np.float64)                             # [L + 1, V]
    p = softmax64(logits)[:, token]
    raw = softmax64(x @ lm_head.T.astype(np.float64))[:, token]
    hints = {
        "p_token": lambda mine, r: recognise(mine, {
            "lm_head was applied to the raw stream: apply the final norm (model.norm) first, as the model "
            "does after its last layer": raw,
            "the norm's weight is missing: model.norm multiplies by its learned scale":
                softmax64((x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) @ lm_head.T.astype(np.float64))[:, token],
            "softmax over the layers (axis 0): each stream's logits are one distribution over the vocabulary":
                softmax64(logits, axis=0)[:, token],
            "the logit of the token, not its probability: softmax over the vocabulary first": logits[:, token],
        }, rtol=1e-3)}
    expected = [("normed", normed), ("logits", logits, 1e-3), ("p_token", p, 1e-3)]
    return compare_steps(exercise, expected, out, hints=hints)


# -- the most important head in every layer ---------------------------------------------------------------------


@graded("the most important head in every layer")
def grade_head_attribution(fn, model, input_ids, answer, other):
    """`fn(t, model, answer, other)` -> the [L, H] direct logit attribution of every head to
    logit(answer) - logit(other) at the last position (or a dict with "head_terms" [L, H] and, if you
    like, "best_heads" [L]), from `t`, a trace of `head_out` (and everything else it needs). Graded against
    qwen2np.inspection.interp.direct_logit_attribution; the [L, H] terms are what is asked for."""
    exercise = "the most important head in every layer"
    with trace(model, *attribution_names(model), "model.norm") as t:
        model(input_ids)
    dla = direct_logit_attribution(model, t, tokens=[answer, other])
    grid = dla.layer_head_map(model)                                   # [L, H, 2]
    terms = grid[..., 0] - grid[..., 1]                                # [L, H]
    expected = [("head_terms", terms), ("best_heads", terms.argmax(axis=1))]
    out, failed = call(exercise, fn, t, model, answer, other)
    if failed:
        return failed
    if not isinstance(out, dict):
        out = {"head_terms": out}
    norm_w, lm_head = _head_weights(model)
    L = model.config.num_hidden_layers
    shares = np.stack([t[f"model.layers.{l}.self_attn.head_out"][0, :, -1] for l in range(L)]).astype(np.float64)
    direction = (lm_head[answer].astype(np.float64) - lm_head[other]) * norm_w
    hints = {"head_terms": lambda mine, r: recognise(mine, {
        "the final norm's 1 / rms is missing: the norm divides the whole stream by its rms before lm_head reads "
        "it, so every term is divided by the same number": shares @ direction,
        "the norm's weight is missing: lm_head reads w ⊙ x / rms": shares @ (direction / norm_w) * dla.scale,
        "answer and other are swapped: the sign of every term is flipped": -terms}, rtol=1e-3)}
    return compare_steps(exercise, expected, out, required=["head_terms"], hints=hints)


# -- induction heads --------------------------------------------------------------------------------------------


def repeated_random_tokens(n, vocab, seed=0, low=1000):
    """[1, 2n] ids: n random tokens (ids in [low, vocab)), then the same n again."""
    rng = np.random.default_rng(seed)
    half = rng.integers(low, vocab, size=n)
    return np.concatenate([half, half])[None]


def induction_reference(probs, n):
    """[L, H]: the mean attention of each query in the second half (positions n … 2n-1) to the token just
    after the previous occurrence of its own token (position i - n + 1). probs [L, H, 2n, 2n]."""
    rows = np.arange(n, 2 * n)
    return probs[:, :, rows, rows - n + 1].mean(-1)


@graded("an induction-head detector")
def grade_induction_scores(fn, probs, n):
    """`fn(probs, n)` -> the induction score [L, H] of every head, from probs [L, H, 2n, 2n], the attention
    of every layer on a sequence of n random tokens repeated twice: the mean, over the queries of the second
    half, of the attention to the token after the previous occurrence of the query's token."""
    exercise = "an induction-head detector"
    probs = np.asarray(probs, dtype=np.float64)
    out, failed = call(exercise, fn, probs, n)
    if failed:
        return failed
    ref = induction_reference(probs, n)
    rows = np.arange(n, 2 * n)
    every = np.arange(n - 1, 2 * n)
    hints = {"induction_scores": lambda mine, r: recognise(mine, {
        "this reads key i - n, the previous occurrence of the same token: that is a duplicate-token head. "
        "An induction head looks one further, at i - n + 1, the token that came next last time":
            probs[:, :, rows, rows - n].mean(-1),
        "this reads key i - 1, the previous token: a previous-token head. Induction reads i - n + 1":
            probs[:, :, rows, rows - 1].mean(-1),
        "the first half (positions < n) has no earlier occurrence to look back at: average over the second "
        "half only, positions n … 2n-1": lambda: np.stack([probs[:, :, i, max(i - n + 1, 0)] for i in range(1, 2 * n)], -1).mean(-1),
        "the mean starts one position early: the queries are n … 2n-1": lambda: np.stack(
            [probs[:, :, i, i - n + 1] for i in every], -1).mean(-1),
        "summed, not averaged, over the n queries": ref * n,
    })}
    return compare_steps(exercise, [("induction_scores", ref)], out, hints=hints)
