"""Exercises of notebook 5 (porting): find the first divergence between a port's intermediates and the
golden ones, and decode a Q4_K block of the checkpoint by hand.
"""

import functools

import numpy as np

from ..grader import RTOL, Verdict, call, compare_steps, fail, graded, recognise
from ..quant import Q4_K_BYTES, q4k_decode, q4k_fields

# -- the first divergence ---------------------------------------------------------------------------------


def first_divergence_reference(port, golden, rtol=RTOL):
    """The first name, in the golden dict's (forward) order, whose rel = max |port - golden| / max |golden|
    exceeds rtol or is not a number; None when all agree."""
    for name, ref in golden.items():
        a, b = np.asarray(port[name], dtype=np.float64), np.asarray(ref, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        if not rel <= rtol:                        # NaN is not <= anything: a NaN tensor diverges
            return name
    return None


def divergence_cases():
    """Small dumps ({name: array}, forward order) with one known divergence each, made to tell the usual
    mistakes apart: an absolute error that is large only because the tensor is large, a NaN, and names
    that sort in another order than the forward pass ("layers.10" before "layers.2")."""
    rng = np.random.default_rng(5)
    names = ["model.embed_tokens", "model.layers.2", "model.layers.10", "model.norm", "logits"]
    scale = {"model.embed_tokens": 0.002, "model.layers.2": 5.0, "model.layers.10": 400.0, "model.norm": 2.0,
             "logits": 20.0}
    golden = {n: rng.standard_normal((3, 8)) * scale[n] for n in names}

    def port(**errors):
        out = {n: a * (1 + 1e-6) for n, a in golden.items()}             # float rounding: within tolerance
        for n, e in errors.items():
            n = {"layer2": "model.layers.2", "layer10": "model.layers.10", "embed": "model.embed_tokens"}.get(n, n)
            out[n] = e(out[n])
        return out

    bump = lambda x: x + 0.01 * np.abs(x).max() * (np.arange(x.size).reshape(x.shape) == 3)   # noqa: E731
    return [
        ("a small tensor off by 1 %", port(embed=bump, layer10=lambda x: x + 0.05), golden),
        ("layers 2 and 10 both off", port(layer2=bump, layer10=bump), golden),
        ("NaN in layer 2", port(layer2=lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
                                layer10=bump), golden),
        ("all within tolerance", port(), golden),
    ]


_NO_DIVERGENCE = object()


def _none_is_an_answer(fn):
    """`fn`, returning a marker for None (here an answer: no divergence); NotImplemented stays a stub."""
    @functools.wraps(fn)
    def wrapped(*args):
        out = fn(*args)
        return _NO_DIVERGENCE if out is None else out
    return wrapped if callable(fn) else fn


@graded("the first divergence")
def grade_first_divergence(fn, cases=None, rtol=RTOL):
    """`fn(port, golden, rtol)` -> the name of the first tensor, in the forward order of `golden` (a dict
    {name: array}), where rel = max |port - golden| / max |golden| exceeds rtol (a NaN counts), or None when
    every tensor agrees. Graded on small dumps made to catch the usual mistakes."""
    exercise = "the first divergence"
    steps = []
    for name, port, golden in (divergence_cases() if cases is None else cases):
        out, failed = call(exercise, _none_is_an_answer(fn), port, golden, rtol)
        if failed:
            return failed
        out = None if out is _NO_DIVERGENCE else out
        ref = first_divergence_reference(port, golden, rtol)
        if out != ref:
            hint = ""
            nan_blind = next((n for n in golden if np.abs(np.asarray(port[n]) - golden[n]).max()
                              / max(np.abs(golden[n]).max(), 1e-30) > rtol), None)
            alphabetical = first_divergence_reference(port, dict(sorted(golden.items())), rtol)
            absolute = next((n for n in golden if not np.abs(np.asarray(port[n]) - golden[n]).max() <= rtol), None)
            if out == nan_blind and np.isnan(np.asarray(port[ref], dtype=np.float64)).any():
                hint = (f"; {ref} holds a NaN: NaN > rtol is False, so a test `rel > rtol` lets it through; "
                        "write `not rel <= rtol`, or check np.isnan")
            elif out == alphabetical:
                hint = "; that is the first in alphabetical order: walk the tensors in the forward order, as given"
            elif out == absolute:
                hint = ("; that is the first *absolute* error above rtol: divide by the tensor's largest value, "
                        "so that large tensors (logits, massive activations) are not blamed for rounding")
            return fail(exercise, steps, name, f"yours {out!r}, expected {ref!r}{hint}")
        steps.append((name, True, repr(ref)))
    return Verdict(exercise, True, steps)


# -- a Q4_K block by hand ------------------------------------------------------------------------------------


@graded("a Q4_K block by hand")
def grade_q4k_block(fn, blocks):
    """`fn(block)` -> the 256 float32 weights of one Q4_K block (144 uint8), or a dict with the steps "d",
    "dmin", "scales" [8], "mins" [8], "q" [256] (the 4-bit quants in weight order) and "weights" [256].
    Graded on each block of `blocks` [n, 144]."""
    exercise = "a Q4_K block by hand"
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, Q4_K_BYTES)
    verdict = None
    for i, block in enumerate(blocks):
        out, failed = call(exercise, fn, block)
        if failed:
            return failed
        f = q4k_fields(block)
        weights = q4k_decode(block)
        qs = block[16:]
        s = block[4:16]
        interleaved = np.stack([qs & 15, qs >> 4], axis=-1).reshape(256)
        scale = (f["d"] * f["scales"].astype(np.float32)).repeat(32)
        offset = (f["dmin"] * f["mins"].astype(np.float32)).repeat(32)
        hints = {
            "scales": lambda mine, r: recognise(mine, {
                "sub-blocks 4-7 lack their top 2 bits: they come from the top 2 bits of bytes 0-3 of the scales":
                    np.concatenate([s[0:4] & 63, s[8:12] & 15]),
                "the scales of sub-blocks 4-7 were read from the high nibbles of bytes 8-11: those are the mins'":
                    np.concatenate([s[0:4] & 63, (s[8:12] >> 4) | ((s[0:4] >> 6) << 4)])}, rtol=0),
            "mins": lambda mine, r: recognise(mine, {
                "sub-blocks 4-7 lack their top 2 bits: they come from the top 2 bits of bytes 4-7 of the scales":
                    np.concatenate([s[4:8] & 63, s[8:12] >> 4])}, rtol=0),
            "q": lambda mine, r: recognise(mine, {
                "the nibbles are interleaved (byte l = weights 2l and 2l+1): in a Q4_K chunk of 32 bytes, the low "
                "nibbles are the first 32 weights and the high nibbles the next 32": interleaved,
                "high nibble first: the low nibble (byte & 15) comes first": np.stack([qs >> 4, qs & 15], 0).reshape(2, 4, 32).transpose(1, 0, 2).reshape(256)}, rtol=0),
            "weights": lambda mine, r: recognise(mine, {
                "+ dmin · min: the minimum is subtracted, d · scale · q - dmin · min": scale * f["q"] + offset,
                "without the sub-block scales: d · scale[j] · q, with scale[j] from the 6-bit fields":
                    f["d"] * f["q"].astype(np.float32) - offset,
                "the nibbles are interleaved: see q": scale * interleaved - offset}),
        }
        expected = [("d", f["d"], 0), ("dmin", f["dmin"], 0), ("scales", f["scales"]), ("mins", f["mins"]),
                    ("q", f["q"]), ("weights", weights, 1e-6)]
        verdict = compare_steps(exercise, expected, out, hints=hints)
        if not verdict.passed:
            verdict.note = f"(block {i}) " + verdict.note if len(blocks) > 1 else verdict.note
            return verdict
    verdict.steps.append((f"{len(blocks)} blocks", True, "all decoded as the gguf package decodes them"))
    return verdict
