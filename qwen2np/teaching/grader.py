"""The machinery of the notebooks' exercise grader: run the reader's function, compare each step it
returns with the model's own intermediate of that name, and name the first operation that is wrong.

A reader's function may return only its final result, or a dict of its steps in order, named as the
model names its intermediates (`{"scores": …, "probs": …, "context": …}`); with the steps, the verdict can
say *which* operation went wrong, not only that the end result is off. The result the exercise asks for
(the last step, unless an exercise says otherwise) must always be there: steps alone prove nothing.

Two promises, held by tests/teaching/test_grader.py: a wrong answer is never called right (NaN, ±inf,
complex numbers, strings of the right digits, a missing result: all wrong), and grading never raises on an
answer (a function that raises, returns None, a ragged list or an int gets a verdict that says so). A stub
that returns None is "not attempted yet".

The exercises themselves are in `qwen2np.teaching.exercises`, one module per notebook.

>>> import numpy as np
>>> expected = [("scores", np.eye(2)), ("probs", np.full((2, 2), 0.5))]
>>> print(compare_steps("demo", expected, {"scores": np.eye(2), "probs": np.eye(2)}))
demo: wrong. The first wrong operation is `probs`.
  scores  ok    (max |yours - model| = 0, shape (2, 2))
  probs   WRONG max |yours - model| = 0.5 at (0, 0) (relative 1), shape (2, 2)
>>> print(compare_steps("demo", expected, {"scores": np.eye(2)}))
demo: wrong. The first wrong operation is `probs`.
  scores  ok    (max |yours - model| = 0, shape (2, 2))
  probs   WRONG missing: your function did not return `probs`, the result this exercise asks for
"""

import functools
from dataclasses import dataclass, field

import numpy as np

# A step is right when max |yours - model| <= RTOL * max |model|: float32 rounding of a reordered
# computation stays below 1e-5 of the scale on the 0.5B model (docs/tolerances.md); a real mistake is
# off by far more (the gallery of notebook 5 shows how much).
RTOL = 2e-4
EXACT = 0.0


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
        lines = [head] + [f"  {n:<{width}}  {'ok   ' if ok else 'WRONG'} {d}".rstrip() for n, ok, d in self.steps]
        if self.note and (self.passed or self.first_wrong is not None):
            lines.append(f"  {self.note}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle):   # IPython
        printer.text(str(self))


def not_attempted(exercise, fn_name="your function", value=None):
    return Verdict(exercise, False, note=f"not attempted yet: {fn_name} returned {value}. Write it above and run "
                                         f"this cell again.")


def fail(exercise, steps, name, detail, note=""):
    """A verdict that `name` is wrong, after the steps already checked."""
    return Verdict(exercise, False, list(steps) + [(name, False, detail)], name, note)


def graded(exercise):
    """Decorator of a grade_* function: whatever the reader's answer makes the grading raise (an odd type
    the checks did not foresee) becomes a wrong verdict that says what could not be read, never an
    exception in the reader's notebook."""
    def wrap(grade):
        @functools.wraps(grade)
        def run(*args, **kwargs):
            try:
                return grade(*args, **kwargs)
            except Exception as e:   # the answer's fault: the solutions are tested to grade without error
                return Verdict(exercise, False, note=f"wrong: your answer could not be read "
                                                     f"({type(e).__name__}: {e})")
        return run
    return wrap


def _fmt(x):
    return f"{x:.2g}" if x else "0"


def as_numbers(mine):
    """(array, None) for an answer made of numbers, else (None, why not): a ragged list, strings of digits,
    complex numbers, objects. A bool answer is numbers (0 and 1)."""
    if mine is None:
        return None, "missing"
    try:
        array = np.asarray(mine)
    except Exception as e:   # a ragged list and the like
        return None, f"not an array ({type(e).__name__}: {e})"
    if array.dtype.kind == "c":
        return None, (f"complex numbers (dtype {array.dtype}); the model's are real: "
                      f"{'the imaginary parts are 0, take .real' if np.all(array.imag == 0) else 'the imaginary parts are not 0'}")
    if array.dtype.kind not in "biuf":
        return None, f"not numbers: dtype {array.dtype} (e.g. {array.ravel()[:1].tolist()}); return a NumPy array of numbers"
    return array, None


def _diagnose(mine, ref):
    """A hint for a step whose values are wrong but whose shape is right."""
    m, r = mine.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if not np.isfinite(m).all():
        return f"{int((~np.isfinite(m)).sum())} values are NaN or infinite"
    finite = np.isfinite(r)
    m, r = m[finite], r[finite]
    denom = float(r @ r)
    if denom > 0:
        c = float(m @ r) / denom
        if abs(c - 1) > 1e-3 and np.abs(m - c * r).max() <= 1e-3 * max(np.abs(m).max(), 1e-30):
            return f"yours = {c:.4g} x the model's: a missing or extra scale factor?"
    if mine.ndim >= 2 and mine.shape[1] > 1 and np.isfinite(ref).all():   # a head axis in another order?
        n = mine.shape[1]
        order = []
        for i in range(n):
            errs = [np.abs(mine[:, i] - ref[:, j]).max() for j in range(n)]
            order.append(int(np.argmin(errs)) if min(errs) <= RTOL * max(np.abs(ref).max(), 1e-30) else None)
        if None not in order and order != list(range(n)):
            return f"the slices along axis 1 are the model's in another order: yours[:, i] = model[:, {order}[i]]"
    if mine.ndim >= 2 and mine.shape[-1] == mine.shape[-2] and mine.shape[-1] > 1:
        if np.allclose(np.swapaxes(mine, -1, -2), ref, rtol=1e-4, atol=RTOL * max(np.abs(ref[np.isfinite(ref)]).max(initial=0), 1e-30)):
            return "yours is the model's transposed (the last two axes swapped)"
    return ""


def compare_array(mine, ref, rtol=RTOL, diagnose=True):
    """(ok, detail) for one step: `mine` against the model's `ref`, within rtol of its largest value (0:
    exactly; integer and bool steps are always compared exactly). ±inf must be where the model has it.
    With `diagnose`, the detail of a wrong step adds what a generic look at the numbers suggests (a scale
    factor, an axis in another order, a transpose)."""
    ref = np.asarray(ref)
    if mine is None:
        return False, "missing (your function did not return this step)"
    mine, problem = as_numbers(mine)
    if problem:
        return False, problem
    if mine.shape != ref.shape:
        if mine.size == ref.size:
            return False, f"shape {mine.shape}, the model's is {ref.shape} (the same numbers laid out another way?)"
        return False, f"shape {mine.shape}, the model's is {ref.shape}"
    if ref.dtype.kind in "biu":
        bad = np.argwhere(mine != ref)
        if len(bad):
            at = tuple(int(i) for i in bad[0])
            return False, (f"{len(bad)} of {ref.size} entries differ, the first at {at}: yours {mine[at].item()!r}, "
                           f"the model's {ref[at].item()!r}")
        return True, f"(equal, shape {ref.shape})"
    mine64, ref64 = mine.astype(np.float64), ref.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        both_inf = np.isinf(ref64) & (mine64 == ref64)
        diff = np.where(both_inf, 0.0, np.abs(mine64 - ref64))     # NaN wherever one side is NaN or inf
    scale = float(np.abs(ref64[np.isfinite(ref64)]).max()) if np.isfinite(ref64).any() else 1.0
    if np.isnan(diff).any():
        where = tuple(int(i) for i in np.argwhere(np.isnan(diff))[0])
        return False, (f"yours is {mine64[where]:.4g} at {where} where the model's is {ref64[where]:.4g}, shape {ref.shape}. "
                       f"{_diagnose(mine, ref) if diagnose else ''}").rstrip(". ")
    worst = float(diff.max()) if diff.size else 0.0
    if worst <= rtol * scale:
        return True, f"(max |yours - model| = {_fmt(worst)}, shape {ref.shape})"
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    hint = _diagnose(mine, ref) if diagnose and ref.size > 1 else ""   # any scalar is a multiple of another
    relative = _fmt(worst / scale) if scale else "inf: the model's values are all 0"
    return False, (f"max |yours - model| = {_fmt(worst)} at {where} (relative {relative}), "
                   f"shape {ref.shape}" + (f". {hint}" if hint else ""))


def compare_steps(exercise, expected, given, rtol=RTOL, note="", required=None, hints=None):
    """The verdict on `given` (a dict of steps, or the final result alone) against `expected`, a list of
    (name, model's array) or (name, model's array, rtol) in forward order. Stops at the first wrong step:
    what follows it is wrong too.

    `required`: the steps that must be returned (default: the last, the result the exercise asks for);
    the others are checked when given. `hints` {name: f(yours, model's) -> str}: an exercise's own
    diagnosis of a wrong step (a known mistake it recognises), added to the detail.
    """
    if given is None:
        return not_attempted(exercise)
    names = [e[0] for e in expected]
    required = [names[-1]] if required is None else list(required)
    if not isinstance(given, dict):                      # the final result only
        given = {required[-1]: given}
        if len(expected) > 1:
            note = note or ("(you returned the final result only; return a dict of the steps "
                            f"{names} to find which operation is wrong)")
    steps = []
    for entry in expected:
        name, ref = entry[0], entry[1]
        tolerance = entry[2] if len(entry) > 2 else rtol
        if name not in given or given[name] is None:
            if name in required:
                return fail(exercise, steps, name, f"missing: your function did not return `{name}`, the "
                                                   f"result this exercise asks for", note)
            continue
        ok, detail = compare_array(given[name], ref, tolerance)
        if not ok and hints and name in hints:
            extra = _safe_hint(hints[name], given[name], ref)
            if extra:   # the exercise recognises the mistake: its words replace the generic guess
                detail = compare_array(given[name], ref, tolerance, diagnose=False)[1] + f". {extra}"
        steps.append((name, ok, detail))
        if not ok:
            return Verdict(exercise, False, steps, name, note)
    if not steps:
        return Verdict(exercise, False, [], None, f"none of the steps {names} was returned (got {list(given)})")
    return Verdict(exercise, True, steps, None, note)


def _safe_hint(hint, mine, ref):
    try:
        mine, problem = as_numbers(mine)
        return "" if problem or mine.shape != np.shape(ref) else hint(mine, np.asarray(ref))
    except Exception:   # a hint is a nicety: never a reason to raise
        return ""


def same(mine, other, rtol=RTOL):
    """Whether array `mine` equals `other` within rtol of other's scale (for recognising known mistakes)."""
    mine, other = np.asarray(mine, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if mine.shape != other.shape:
        return False
    finite = np.isfinite(other)
    if not np.array_equal(np.isfinite(mine), finite) or not np.array_equal(mine[~finite], other[~finite]):
        return False
    scale = float(np.abs(other[finite]).max()) if finite.any() else 0.0
    return bool(np.abs(mine[finite] - other[finite]).max(initial=0.0) <= rtol * max(scale, 1e-30))


def _copy(x):
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def call(exercise, fn, *args, copy=True):
    """(result, None), or (None, Verdict) when the reader's function raised, was not callable or was a
    stub. Arrays are handed over as copies (unless not `copy`), so that a function that writes into its
    inputs cannot change what it is compared with."""
    if not callable(fn):
        return None, Verdict(exercise, False, note=f"expected a function, found {type(fn).__name__}")
    try:
        out = fn(*(_copy(a) for a in args)) if copy else fn(*args)
    except Exception as e:   # the reader's code: report, do not raise
        return None, Verdict(exercise, False, note=f"your function raised {type(e).__name__}: {e}")
    if out is None or out is NotImplemented:   # NotImplemented: a stub where None is a valid answer
        return None, not_attempted(exercise, getattr(fn, "__name__", "your function"), out)
    return out, None


_call = call   # the name grader users had before



def recognise(mine, candidates, rtol=RTOL):
    """The message of the first known mistake `candidates` ({message: what that mistake computes, or a
    function computing it}) that `mine` reproduces, else "". Used as a step's hint."""
    for message, candidate in candidates.items():
        try:
            value = candidate() if callable(candidate) else candidate
            if value is not None and same(mine, value, rtol):
                return message
        except Exception:   # a candidate that cannot be computed for these inputs is simply not it
            continue
    return ""


def squeeze_to(mine, shape):
    """`mine` reshaped to `shape` when it only differs by axes of length 1 ([1, T, HD] for [T, HD]), else
    as it is (the comparison then names the shape)."""
    array, problem = as_numbers(mine)
    if problem is None and array.shape != tuple(shape) and array.size == int(np.prod(shape)) and \
            [n for n in array.shape if n != 1] == [n for n in shape if n != 1]:
        return array.reshape(shape)
    return mine
