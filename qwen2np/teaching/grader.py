"""The exercise grader of the notebooks: runs the reader's function, compares each step it returns with
the model's own intermediate of that name, and names the first operation that is wrong.

A reader's function may return only its final result, or a dict of its steps in order, named as the
model names its intermediates (`{"scores": …, "probs": …, "context": …}`); with the steps, the verdict can
say *which* operation went wrong, not only that the end result is off. Every verdict is a `Verdict`,
which prints as a short report; nothing raises on a wrong answer (a stub that returns None is "not
attempted yet").

>>> import numpy as np
>>> expected = [("scores", np.eye(2)), ("probs", np.full((2, 2), 0.5))]
>>> print(compare_steps("demo", expected, {"scores": np.eye(2), "probs": np.eye(2)}))
demo: wrong. The first wrong operation is `probs`.
  scores  ok    (max |yours - model| = 0, shape (2, 2))
  probs   WRONG max |yours - model| = 0.5 at (0, 0) (relative 1), shape (2, 2)
"""

import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from ..generation.logits_process import top_p_filter
from ..inspection.interp import attribution_names, direct_logit_attribution
from ..inspection.tracing import trace
from ..model.attention import grouped_query_attention
from ..weights.backend import to_numpy
from ..weights.store import as_array
from .bpe_train import merge_everywhere, pair_counts

# A step is right when max |yours - model| <= RTOL * max |model|: float32 rounding of a reordered
# computation stays below 1e-5 of the scale on the 0.5B model (docs/tolerances.md); a real mistake is
# off by far more (the gallery of notebook 5 shows how much).
RTOL = 2e-4


@dataclass
class Verdict:
    exercise: str
    passed: bool
    steps: list = field(default_factory=list)      # [(name, ok, detail)] in order
    first_wrong: str | None = None
    note: str = ""

    def __str__(self):
        if self.passed:
            head = f"{self.exercise}: passed."
        elif self.first_wrong is None:
            head = f"{self.exercise}: {self.note}"
        else:
            head = f"{self.exercise}: wrong. The first wrong operation is `{self.first_wrong}`."
        width = max([len(n) for n, _, _ in self.steps] + [0])
        lines = [head] + [f"  {n:<{width}}  {'ok   ' if ok else 'WRONG'} {d}" for n, ok, d in self.steps]
        if self.note and (self.passed or self.first_wrong is not None):
            lines.append(f"  {self.note}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle):   # IPython
        printer.text(str(self))


def not_attempted(exercise, fn_name="your function"):
    return Verdict(exercise, False, note=f"not attempted yet: {fn_name} returned None. Write it above and run "
                                         f"this cell again.")


def _fmt(x):
    return f"{x:.2g}" if x else "0"


def _diagnose(mine, ref):
    """A hint for a step whose values are wrong but whose shape is right."""
    m, r = mine.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if not np.isfinite(m).all():
        return f"{int((~np.isfinite(m)).sum())} values are NaN or infinite"
    denom = float(r @ r)
    if denom > 0:
        c = float(m @ r) / denom
        if abs(c - 1) > 1e-3 and np.abs(m - c * r).max() <= 1e-3 * np.abs(m).max():
            return f"yours = {c:.4g} x the model's: a missing or extra scale factor?"
    if mine.ndim >= 2 and mine.shape[1] > 1:      # a head axis (or batch rows) in another order?
        n = mine.shape[1]
        order = []
        for i in range(n):
            errs = [np.abs(mine[:, i] - ref[:, j]).max() for j in range(n)]
            order.append(int(np.argmin(errs)) if min(errs) <= RTOL * max(np.abs(ref).max(), 1e-30) else None)
        if None not in order and order != list(range(n)):
            return f"the slices along axis 1 are the model's in another order: yours[:, i] = model[:, {order}[i]]"
    return ""


def compare_array(mine, ref, rtol=RTOL):
    """(ok, detail) for one step."""
    ref = np.asarray(ref)
    if mine is None:
        return False, "missing (your function did not return this step)"
    try:
        mine = np.asarray(mine)
    except Exception as e:   # a ragged list and the like
        return False, f"not an array ({type(e).__name__}: {e})"
    if mine.shape != ref.shape:
        if mine.size == ref.size:
            return False, f"shape {mine.shape}, the model's is {ref.shape} (the same numbers laid out another way?)"
        return False, f"shape {mine.shape}, the model's is {ref.shape}"
    if ref.dtype == bool or mine.dtype == bool or not np.issubdtype(ref.dtype, np.number):
        bad = np.argwhere(mine != ref)
        if len(bad):
            return False, f"{len(bad)} entries differ, the first at {tuple(int(i) for i in bad[0])}"
        return True, f"(equal, shape {ref.shape})"
    with np.errstate(invalid="ignore", over="ignore"):
        both_inf = np.isinf(ref) & (mine == ref)
        diff = np.where(both_inf, 0.0, np.abs(mine.astype(np.float64) - ref.astype(np.float64)))
    scale = float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 1.0
    worst = float(np.nanmax(diff)) if diff.size and not np.isnan(diff).all() else float("nan")
    if np.isnan(diff).any():
        where = tuple(int(i) for i in np.argwhere(np.isnan(diff))[0])
        return False, f"NaN at {where}, shape {ref.shape}. {_diagnose(mine, ref)}".rstrip(". ")
    if worst <= rtol * scale:
        return True, f"(max |yours - model| = {_fmt(worst)}, shape {ref.shape})"
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    hint = _diagnose(mine, ref)
    relative = _fmt(worst / scale) if scale else "inf: the model's values are all 0"
    return False, (f"max |yours - model| = {_fmt(worst)} at {where} (relative {relative}), "
                   f"shape {ref.shape}" + (f". {hint}" if hint else ""))


def compare_steps(exercise, expected, given, rtol=RTOL, note=""):
    """The verdict on `given` (a dict of steps, or the final result alone) against `expected`, a list of
    (name, model's array) in forward order. Stops at the first wrong step: what follows it is wrong too."""
    if given is None:
        return not_attempted(exercise)
    if not isinstance(given, dict):                      # the final result only
        given = {expected[-1][0]: given}
        if len(expected) > 1:
            note = note or ("(you returned the final result only; return a dict of the steps "
                            f"{[n for n, _ in expected]} to find which operation is wrong)")
    steps = []
    for name, ref in expected:
        if name not in given:
            continue
        ok, detail = compare_array(given[name], ref, rtol)
        steps.append((name, ok, detail))
        if not ok:
            return Verdict(exercise, False, steps, name, note)
    if not steps:
        return Verdict(exercise, False, [], None, f"none of the steps {[n for n, _ in expected]} was returned "
                                                  f"(got {list(given)})")
    return Verdict(exercise, True, steps, None, note)


def _call(exercise, fn, *args):
    """(result, None) or (None, Verdict) when the reader's function raised or was a stub."""
    try:
        out = fn(*args)
    except Exception as e:   # the reader's code: report, do not raise
        return None, Verdict(exercise, False, note=f"your function raised {type(e).__name__}: {e}")
    if out is None:
        return None, not_attempted(exercise, getattr(fn, "__name__", "your function"))
    return out, None


# -- notebook 1: the BPE training merge loop --------------------------------------------------------


def grade_bpe_training(fn, words, num_merges):
    """`fn(words, num_merges)` -> the list of merges learned, each a pair (a, b) (or (pair, count)), from
    `words` ({tuple of byte-level symbols: count}).

    The grader replays your merges one by one: each must be a most frequent pair of the pieces as your
    earlier merges left them (any of several equally frequent pairs is right), and there must be
    `num_merges` of them (fewer only when no pair is left)."""
    exercise = "the BPE merge loop"
    out, failed = _call(exercise, fn, dict(words), num_merges)
    if failed:
        return failed
    merges = [m[0] if len(m) == 2 and isinstance(m[0], tuple) else tuple(m) for m in out]
    steps, state = [], dict(words)
    for i, pair in enumerate(merges):
        counts = pair_counts(state)
        if not counts:
            steps.append((f"merge {i + 1}", False, f"{pair}, but no pair is left to merge"))
            return Verdict(exercise, False, steps, f"merge {i + 1}")
        best = max(counts, key=counts.get)
        if counts.get(pair, 0) != counts[best]:
            steps.append((f"merge {i + 1}", False,
                          f"you merged {pair}, which occurs {counts.get(pair, 0)} times; the most frequent pair "
                          f"occurs {counts[best]} times: {best}"))
            return Verdict(exercise, False, steps, f"merge {i + 1}")
        if i < 3 or i == len(merges) - 1:
            steps.append((f"merge {i + 1}", True, f"{pair}, {counts[pair]} times"))
        elif i == 3:
            steps.append(("…", True, ""))
        state = merge_everywhere(state, pair)
    if len(merges) != num_merges and (len(merges) > num_merges or pair_counts(state)):
        steps.append(("count", False, f"{len(merges)} merges, {num_merges} asked for"))
        return Verdict(exercise, False, steps, "count")
    return Verdict(exercise, True, steps)


# -- notebook 2: grouped-query attention without copying K and V ----------------------------------------


def attention_inputs(model, input_ids, layer):
    """q [B, H, T, HD], k and v [B, KV, S, HD], mask [B, 1, T, S] of one layer, and the model's scores,
    probs and context [B, H, T, HD], from a trace."""
    c = model.config
    s = f"model.layers.{layer}.self_attn"
    with trace(model, f"{s}.q_rope", f"{s}.k_rope", f"{s}.v_proj", f"{s}.mask", f"{s}.scores", f"{s}.probs",
               f"{s}.context") as t:
        model(input_ids)
    B, T = np.asarray(input_ids).shape
    v = t[f"{s}.v_proj"].reshape(B, T, c.num_key_value_heads, c.head_dim).transpose(0, 2, 1, 3)
    context = t[f"{s}.context"].reshape(B, T, c.num_attention_heads, c.head_dim).transpose(0, 2, 1, 3)
    return (t[f"{s}.q_rope"], t[f"{s}.k_rope"], v, t[f"{s}.mask"]), \
        [("scores", t[f"{s}.scores"]), ("probs", t[f"{s}.probs"]), ("context", context)]


def grade_gqa(fn, model, input_ids, layer=0, long_keys=4096):
    """`fn(q, k, v, mask)` -> context [B, H, T, HD] (or a dict with "scores" (before the mask), "probs",
    "context"), without copying K and V.

    Graded in two parts: the values, against the model's intermediates of `layer` on `input_ids`; then
    the memory: one query (T = 1) against `long_keys` keys of 128 features, traced with tracemalloc,
    must allocate less than half of one copy of K repeated G times (B·H·S·HD numbers), which `np.repeat`
    or `np.tile` of K and V would make twice over. (Scores and probabilities of one query need H·S
    numbers each, 1/128 of that.)"""
    exercise = "GQA without copying K and V"
    inputs, expected = attention_inputs(model, input_ids, layer)
    out, failed = _call(exercise, fn, *inputs)
    if failed:
        return failed
    verdict = compare_steps(exercise, expected, out)
    if not verdict.passed:
        q, k = inputs[0], inputs[1]
        mine = out.get("scores") if isinstance(out, dict) else None
        if verdict.first_wrong == "scores" and mine is not None and np.shape(mine) == expected[0][1].shape:
            G = q.shape[1] // k.shape[1]
            tiled = (q @ np.tile(k, (1, G, 1, 1)).swapaxes(-1, -2)) * q.dtype.type(q.shape[-1] ** -0.5)
            if np.abs(np.asarray(mine) - tiled).max() <= RTOL * np.abs(tiled).max():
                verdict.note = ("query head h read KV head h % KV (np.tile); it must read KV head h // G "
                                "(np.repeat, or G consecutive query heads per KV head)")
        return verdict

    q, k = inputs[0], inputs[1]
    B, H, KV, HD = q.shape[0], q.shape[1], k.shape[1], 128
    rng = np.random.default_rng(0)
    q1 = rng.standard_normal((B, H, 1, HD)).astype(q.dtype)
    k1, v1 = (rng.standard_normal((B, KV, long_keys, HD)).astype(q.dtype) for _ in range(2))
    mask1 = np.zeros((B, 1, 1, long_keys), dtype=q.dtype)
    repeated = B * H * long_keys * HD * q.dtype.itemsize
    tracemalloc.start()
    try:
        out1, failed = _call(exercise, fn, q1, k1, v1, mask1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if failed:
        return failed
    context1 = out1["context"] if isinstance(out1, dict) else out1
    ok, detail = compare_array(context1, grouped_query_attention(q1, k1, v1, mask1, HD ** -0.5)[0])
    verdict.steps.append((f"context, T=1 S={long_keys}", ok, detail))
    if not ok:
        return Verdict(exercise, False, verdict.steps, f"context, T=1 S={long_keys}")
    ok = peak < repeated / 2
    verdict.steps.append(("memory", ok, f"peak {peak / 2**20:.1f} MiB allocated; K repeated G times is "
                                        f"{repeated / 2**20:.1f} MiB"))
    if not ok:
        return Verdict(exercise, False, verdict.steps, "memory",
                       "right values, but K and V were copied: reshape q instead (G query heads as rows)")
    return Verdict(exercise, True, verdict.steps)


# -- notebook 3: the most important head of every layer ---------------------------------------------------


def grade_head_attribution(fn, model, input_ids, answer, other):
    """`fn(t, model, answer, other)` -> the [L, H] direct logit attribution of every head to
    logit(answer) - logit(other) at the last position (or a dict with "head_terms" [L, H] and
    "best_heads" [L]), from `t`, a trace of `head_out` (and everything else it needs). Graded against
    qwen2np.inspection.interp.direct_logit_attribution."""
    exercise = "the most important head in every layer"
    with trace(model, *attribution_names(model), "model.norm") as t:
        model(input_ids)
    dla = direct_logit_attribution(model, t, tokens=[answer, other])
    grid = dla.layer_head_map(model)                                   # [L, H, 2]
    terms = grid[..., 0] - grid[..., 1]                                # [L, H]
    expected = [("head_terms", terms), ("best_heads", terms.argmax(axis=1))]
    out, failed = _call(exercise, fn, t, model, answer, other)
    if failed:
        return failed
    if not isinstance(out, dict):
        out = {"head_terms": out, "best_heads": np.asarray(out).argmax(axis=1) if np.ndim(out) == 2 else None}
    return compare_steps(exercise, expected, out)


# -- notebook 4: top-p by hand --------------------------------------------------------------------------


def grade_top_p(fn, scores, ps=(0.5, 0.8, 0.9, 0.95)):
    """`fn(scores [V], p)` -> the scores with the tokens outside the nucleus set to -inf (or a dict with
    "kept" [V] bool and "scores"), for each p, against transformers' rule (qwen2np's top_p_filter)."""
    exercise = "top-p by hand"
    scores = np.asarray(scores, dtype=np.float32)
    steps = []
    for p in ps:
        ref = top_p_filter(scores[None], p)[0]
        out, failed = _call(exercise, fn, scores.copy(), p)
        if failed:
            return failed
        mine = out["scores"] if isinstance(out, dict) else out
        mine = np.asarray(mine)
        if mine.shape != ref.shape:
            steps.append((f"p={p}", False, f"shape {mine.shape}, expected {ref.shape}"))
            return Verdict(exercise, False, steps, f"p={p}")
        kept, should = np.isfinite(mine), np.isfinite(ref)
        if (kept != should).any():
            extra, missing = np.flatnonzero(kept & ~should), np.flatnonzero(should & ~kept)
            detail = f"you keep {int(kept.sum())} tokens, transformers keeps {int(should.sum())}"
            if len(missing):
                detail += f"; you drop token {int(missing[0])} (p={_prob(scores, missing[0]):.3f})"
                if len(missing) == 1 and missing[0] == _crossing(scores, p):
                    detail += ", the one whose probability crosses p: transformers keeps it"
            if len(extra):
                detail += f"; you keep token {int(extra[0])} (p={_prob(scores, extra[0]):.3f})"
            steps.append((f"p={p}", False, detail))
            return Verdict(exercise, False, steps, f"p={p}")
        ok, detail = compare_array(np.where(kept, mine, 0), np.where(should, ref, 0))
        steps.append((f"p={p}", ok, f"{int(kept.sum())} tokens kept " + detail if ok else detail))
        if not ok:
            return Verdict(exercise, False, steps, f"p={p}", "the kept scores must be left as they were")
    return Verdict(exercise, True, steps)


def _prob(scores, i):
    e = np.exp(scores.astype(np.float64) - scores.max())
    return float(e[i] / e.sum())


def _crossing(scores, p):
    e = np.exp(scores.astype(np.float64) - scores.max())
    order = np.argsort(-e, kind="stable")
    cum = np.cumsum(e[order] / e.sum())
    return int(order[min(int(np.searchsorted(cum, p)), len(order) - 1)])


# -- notebook 5: the start of a port, step by step ---------------------------------------------------------


def grade_port_start(fns, model, input_ids):
    """`fns` = {"rms_norm": f(x, w, eps), "apply_rope": f(x, cos, sin)}: run as the start of layer 0
    (the input norm, then RoPE on the queries) and compared with `input_layernorm` and `q_rope`."""
    exercise = "the start of a port"
    c = model.config
    with trace(model, "model.embed_tokens", "model.rotary_emb.*", "model.layers.0.input_layernorm",
               "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_rope") as t:
        model(input_ids)
    w = to_numpy(as_array(model.state_dict()["model.layers.0.input_layernorm.weight"]))
    B, T = np.asarray(input_ids).shape
    given = {}
    for name, fn, args in [
        ("input_layernorm", fns.get("rms_norm"), (t["model.embed_tokens"], w, c.rms_norm_eps)),
        ("q_rope", fns.get("apply_rope"),
         (t["model.layers.0.self_attn.q_proj"].reshape(B, T, c.num_attention_heads, c.head_dim).transpose(0, 2, 1, 3),
          t["model.rotary_emb.cos"], t["model.rotary_emb.sin"])),
    ]:
        if fn is None:
            continue
        out, failed = _call(exercise, fn, *args)
        if failed:
            return failed
        given[name] = out
    expected = [("input_layernorm", t["model.layers.0.input_layernorm"]), ("q_rope", t["model.layers.0.self_attn.q_rope"])]
    return compare_steps(exercise, expected, given or None)
