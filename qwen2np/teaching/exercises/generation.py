"""Exercises of notebook 4 (generation): top-k, top-p, the repetition penalty, the seeded draw, greedy
decoding with the KV cache, the language-modelling loss, and the sequence classifier's pooling.
"""

import numpy as np

from ...generation.logits_process import repetition_penalty, top_k_filter, top_p_filter
from ...generation.sampling import draw_token
from ...model.losses import IGNORE_INDEX, causal_lm_loss
from ..grader import Verdict, as_numbers, call, compare_array, compare_steps, fail, graded, recognise


def _prob(scores, i):
    e = np.exp(scores.astype(np.float64) - scores.max())
    return float(e[i] / e.sum())


def _crossing(scores, p):
    e = np.exp(scores.astype(np.float64) - scores.max())
    order = np.argsort(-e, kind="stable")
    cum = np.cumsum(e[order] / e.sum())
    return int(order[min(int(np.searchsorted(cum, p)), len(order) - 1)])


def _filtered(mine, ref, scores):
    """(ok, detail) for a filter's output: removed tokens exactly -inf, kept ones unchanged."""
    mine, problem = as_numbers(mine)
    if problem:
        return False, problem
    if mine.shape != ref.shape:
        return False, f"shape {mine.shape}, expected {ref.shape}"
    odd = np.flatnonzero(np.isnan(mine) | (mine == np.inf))
    if len(odd):
        return False, (f"token {int(odd[0])} is {mine[odd[0]]}: a removed token must be -inf (probability 0), "
                       f"and NaN or +inf is not a score")
    kept, should = mine > -np.inf, ref > -np.inf
    if (kept != should).any():
        extra, missing = np.flatnonzero(kept & ~should), np.flatnonzero(should & ~kept)
        detail = f"you keep {int(kept.sum())} token(s), transformers keeps {int(should.sum())}"
        if len(missing):
            detail += f"; you drop token {int(missing[0])} (p={_prob(scores, missing[0]):.3f})"
        if len(extra):
            detail += f"; you keep token {int(extra[0])} (p={_prob(scores, extra[0]):.3f})"
        return False, detail
    ok, detail = compare_array(np.where(kept, mine, 0), np.where(should, ref, 0), rtol=0)
    if not ok:
        return False, "the kept scores must be left as they were: " + detail
    return True, f"{int(kept.sum())} tokens kept, their scores unchanged"


def _grade_filter(exercise, fn, cases, reference, hint):
    steps = []
    for name, scores, param in cases:
        scores = np.asarray(scores, dtype=np.float32)
        out, failed = call(exercise, fn, scores, param)
        if failed:
            return failed
        mine = out.get("scores") if isinstance(out, dict) else out
        ref = reference(scores, param)
        ok, detail = _filtered(mine, ref, scores)
        if not ok:
            extra = hint(mine, ref, scores, param)
            return fail(exercise, steps, name, detail + (f"; {extra}" if extra else ""))
        steps.append((name, True, detail))
    return Verdict(exercise, True, steps)


# -- top-k, top-p -------------------------------------------------------------------------------------------


@graded("top-k by hand")
def grade_top_k(fn, scores, ks=(1, 5, 40)):
    """`fn(scores [V], k)` -> the scores with every token outside the k best set to -inf (the kept ones
    unchanged; every token tied with the k-th best is kept, as transformers does), for each k."""
    ties = np.array([2.0, 1.0, 0.5, 1.0, -1.0, 1.0], dtype=np.float32)
    cases = [(f"k={k}", scores, k) for k in ks] + [("k=2, three tokens tied for 2nd", ties, 2)]

    def hint(mine, ref, scores, k):
        kept = np.asarray(mine) > -np.inf
        if kept.sum() == k + 1:
            return "one token too many: keep k"
        if (ref > -np.inf).sum() > k and kept.sum() == k:
            return "tokens tied with the k-th best score are all kept (scores >= the k-th largest)"
        return ""

    return _grade_filter("top-k by hand", fn, cases, lambda s, k: top_k_filter(s[None], k)[0], hint)


@graded("top-p by hand")
def grade_top_p(fn, scores, ps=(0.5, 0.8, 0.9, 0.95)):
    """`fn(scores [V], p)` -> the scores with the tokens outside the nucleus set to -inf (or a dict with
    "scores"), for each p, against transformers' rule (qwen2np's top_p_filter)."""

    def hint(mine, ref, scores, p):
        missing = np.flatnonzero((ref > -np.inf) & ~(np.asarray(mine) > -np.inf))
        if len(missing) == 1 and missing[0] == _crossing(scores, p):
            return "the one you drop is the token whose probability crosses p: transformers keeps it"
        return ""

    return _grade_filter("top-p by hand", fn, [(f"p={p}", scores, p) for p in ps],
                         lambda s, p: top_p_filter(s[None], p)[0], hint)


# -- the repetition penalty ------------------------------------------------------------------------------------


@graded("the repetition penalty")
def grade_repetition_penalty(fn, scores, input_ids, penalty=1.3):
    """`fn(scores [V], ids [T], penalty)` -> the scores with every token id present in `ids` (counted once)
    penalised: divided by the penalty if positive, multiplied if negative."""
    exercise = "the repetition penalty"
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(input_ids).reshape(-1)
    out, failed = call(exercise, fn, scores, ids, penalty)
    if failed:
        return failed
    ref = repetition_penalty(scores[None], ids[None], penalty)[0]
    seen = np.unique(ids)
    counts = np.bincount(ids, minlength=scores.size)[:scores.size].astype(np.float64)
    s64, p = scores.astype(np.float64), float(penalty)

    def only_seen(values):
        out = s64.copy()
        out[seen] = values[seen]
        return out

    hints = {"penalised_scores": lambda mine, r: recognise(mine, {
        "negative scores were divided too, which moves them *up*: a negative score is multiplied by the "
        "penalty so that it goes down": only_seen(s64 / p),
        "a token seen n times was penalised n times: each seen token is penalised once":
            np.where(counts > 0, np.where(s64 < 0, s64 * p ** counts, s64 / p ** counts), s64),
        "every token was penalised: only the ids already in the text are": np.where(s64 < 0, s64 * p, s64 / p),
        "positive scores were multiplied and negative ones divided: the other way round":
            only_seen(np.where(s64 < 0, s64 / p, s64 * p))}, rtol=1e-6)}
    return compare_steps(exercise, [("penalised_scores", ref, 1e-6)], out, hints=hints)


# -- the seeded draw ---------------------------------------------------------------------------------------------


@graded("the draw")
def grade_draw(fn, cases=None):
    """`fn(scores [V], u)` -> the token drawn by inverse CDF in token-id order: the first token whose
    cumulative weight exp(s - max) exceeds u times the total (-inf scores weigh 0)."""
    exercise = "the draw"
    if cases is None:
        rng = np.random.default_rng(3)
        s = rng.standard_normal(12).astype(np.float32) * 2
        s[[2, 7]] = -np.inf
        cases = [(s, u) for u in (0.0, 0.05, 0.31, 0.5, 0.77, 0.999)]
    steps = []
    for scores, u in cases:
        out, failed = call(exercise, fn, scores, u)
        if failed:
            return failed
        ref = draw_token(scores, u)
        name = f"u={u}"
        if not isinstance(out, (int, np.integer)) or isinstance(out, bool):
            return fail(exercise, steps, name, f"expected a token id (an int), found {type(out).__name__}")
        if int(out) != ref:
            w = np.exp(scores.astype(np.float64) - scores[np.isfinite(scores)].max())
            order = np.argsort(-w, kind="stable")
            by_prob = int(order[np.searchsorted(np.cumsum(w[order]), u * w.sum(), side="right")])
            hint = ("; yours is the draw over the tokens sorted by probability: qwen2np (and this exercise) "
                    "walk the tokens in id order" if int(out) == by_prob else "")
            if not hint and int(out) == int(np.searchsorted(np.cumsum(w), u, side="right")):
                hint = "; compare the cumulative weights with u times the *total* weight (or normalise them first)"
            return fail(exercise, steps, name, f"yours {int(out)}, expected {ref}{hint}")
        steps.append((name, True, f"token {ref}"))
    return Verdict(exercise, True, steps)


# -- greedy decoding with the KV cache --------------------------------------------------------------------------


class CountingModel:
    """A model that counts the positions it is asked to compute (the work of a decoding loop)."""

    def __init__(self, model):
        self.model, self.positions, self.config = model, 0, model.config

    def __call__(self, input_ids=None, *args, **kwargs):
        self.positions += int(np.shape(input_ids)[-1])
        return self.model(input_ids, *args, **kwargs)


@graded("greedy decoding")
def grade_greedy(fn, model, input_ids, max_new_tokens=6):
    """`fn(model, input_ids, n)` -> [B, T + n]: the prompt and n tokens, each the argmax of the last
    position's logits, using the KV cache (`past_key_values`): graded on the tokens, step by step, then on
    the work done (how many positions the model computed)."""
    exercise = "greedy decoding"
    ids = np.asarray(input_ids)
    counting = CountingModel(model)
    out, failed = call(exercise, fn, counting, ids, max_new_tokens)
    if failed:
        return failed
    ref = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    T = ids.shape[1]
    mine, problem = as_numbers(out)
    if problem:
        return fail(exercise, [], "tokens", problem)
    if mine.shape != ref.shape:
        return fail(exercise, [], "tokens", f"shape {mine.shape}, expected {ref.shape} (the prompt and the "
                                            f"{max_new_tokens} new tokens)")
    steps = []
    for step in range(-1, ref.shape[1] - T):
        cols = slice(0, T) if step < 0 else slice(T + step, T + step + 1)
        name = "prompt" if step < 0 else f"step {step + 1}"
        if not np.array_equal(mine[:, cols], ref[:, cols]):
            hint = "" if step < 1 else ("; the first step is right and a later one is not: after the prefill, "
                                        "pass only the newest token with the cache (it holds the others)")
            return fail(exercise, steps, name, f"yours {mine[:, cols].tolist()}, expected {ref[:, cols].tolist()}{hint}")
        if step < 2 or step == ref.shape[1] - T - 1:
            steps.append((name, True, f"{ref[:, cols].tolist()}"))
    needed = T + max_new_tokens - 1
    if counting.positions > needed + 1:
        return fail(exercise, steps, "work", f"the model computed {counting.positions} positions; with the cache it "
                    f"needs {needed} (the prompt once, then one new token per step)",
                    "right tokens, but each step recomputed the whole sequence: keep past_key_values and pass only "
                    "the new token")
    steps.append(("work", True, f"{counting.positions} positions computed"))
    return Verdict(exercise, True, steps)


# -- the language-modelling loss ---------------------------------------------------------------------------------


def lm_loss_steps(logits, labels):
    """The reference steps: shifted labels [B, T], the NLL at every position [B, T] (0 where ignored),
    the loss and the perplexity."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    B, T = labels.shape
    shifted = np.concatenate([labels[:, 1:], np.full((B, 1), IGNORE_INDEX, dtype=labels.dtype)], axis=1)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))                           # [B, T, V]
    keep = shifted != IGNORE_INDEX
    nll = np.where(keep, -np.take_along_axis(logp, np.where(keep, shifted, 0)[..., None], -1)[..., 0], 0.0)
    loss = nll.sum() / keep.sum()
    return [("shifted_labels", shifted), ("nll", nll), ("loss", np.float64(loss)), ("perplexity", np.exp(loss))]


@graded("the language-modelling loss")
def grade_lm_loss(fn, logits, labels):
    """`fn(logits [B, T, V], labels [B, T])` -> {"loss": mean cross-entropy of the next token, "perplexity":
    exp(loss)} (or with the steps "shifted_labels" [B, T] and "nll" [B, T], 0 where ignored), as
    transformers: position t predicts labels[t + 1]; labels of -100 are ignored."""
    exercise = "the language-modelling loss"
    out, failed = call(exercise, fn, logits, labels)
    if failed:
        return failed
    expected = lm_loss_steps(logits, labels)
    ref = dict(expected)
    lg = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    z = lg - lg.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep0 = labels != IGNORE_INDEX
    same_pos = np.where(keep0, -np.take_along_axis(logp, np.where(keep0, labels, 0)[..., None], -1)[..., 0], 0.0)
    keep = ref["shifted_labels"] != IGNORE_INDEX
    hints = {"loss": lambda mine, r: recognise(mine, {
        "not shifted: logits[t] scored labels[t], the token it reads. Position t predicts the *next* token, "
        "labels[t + 1]": same_pos.sum() / keep0.sum(),
        "the ignored positions (-100, and the last one) were counted in the mean: divide by the number of "
        "labels kept": ref["nll"].sum() / ref["nll"].size,
        "the sum, not the mean, of the per-position losses": ref["nll"].sum(),
        "the loss is the *negative* log-likelihood": -ref["nll"].sum() / keep.sum()}, rtol=1e-5),
        "shifted_labels": lambda mine, r: recognise(mine, {
            "shifted the wrong way: position t predicts labels[t + 1], so the labels move one step *left*, "
            "with -100 appended at the end": np.concatenate([np.full((labels.shape[0], 1), IGNORE_INDEX), labels[:, :-1]], 1)}, rtol=0)}
    result = compare_steps(exercise, expected, out, required=["loss", "perplexity"], hints=hints)
    return result


def loss_matches_model(logits, labels):
    """The reference loss is transformers' (qwen2np's causal_lm_loss): a check used by the tests."""
    return float(causal_lm_loss(np.asarray(logits, dtype=np.float32), np.asarray(labels)))


# -- the sequence classifier's pooling ---------------------------------------------------------------------------


@graded("pooling the last token")
def grade_last_token(fn, pad_token_id):
    """`fn(input_ids [B, T], pad_token_id)` -> [B]: the index of each row's last token that is not padding
    (transformers' sequence classifier reads its logits there), for right- and left-padded batches."""
    exercise = "pooling the last token"
    P = pad_token_id
    steps = []
    for name, ids in [("no padding", np.array([[5, 6, 7, 8]])),
                      ("right padding", np.array([[5, 6, P, P], [5, 6, 7, P], [5, 6, 7, 8]])),
                      ("left padding", np.array([[P, P, 5, 6], [P, 5, 6, 7], [5, 6, 7, 8]]))]:
        out, failed = call(exercise, fn, ids, P)
        if failed:
            return failed
        T = ids.shape[1]
        ref = np.argmax(np.arange(T) * (ids != P), axis=-1)
        ok, detail = compare_array(out, ref)
        if not ok:
            hint = recognise(out, {
                "always the last position: in a right-padded row that is a pad token": np.full(len(ids), T - 1),
                "the number of real tokens minus one: right for right padding only; with left padding the real "
                "tokens end at T - 1": (ids != P).sum(-1) - 1,
                "the position before the first pad: right for right padding only (a left-padded row starts "
                "with pads)": np.where((ids == P).any(-1), np.argmax(ids == P, -1) - 1, T - 1)}, rtol=0)
            return fail(exercise, steps, name, detail + (f". {hint}" if hint else ""))
        steps.append((name, True, f"{ref.tolist()}"))
    return Verdict(exercise, True, steps)
