"""The reports of a comparison and of an isolation: text for a person, JSON-ready values for a program.

`format_report` prints a Comparison (compare.py) a tensor a line, then the verdict: the first tensor out
of tolerance, or every one beyond a reduced-precision policy. `format_isolation` prints an Isolation
(isolate.py) an operation a line, then every root cause, and, given the comparison of the same dump,
which of its failures are root causes and which inherit an error. `json_safe` makes either's `to_json()`
strict JSON (an infinite error is the string "inf"). docs/porting.md shows both reports.
"""

import math

from .diagnosis import explain
from .metrics import TOP_K
from .orders import describe


def json_safe(value):
    """`value` with every infinite or NaN float written as a string ("inf", "nan"), so that strict JSON takes it.

    >>> json_safe({"rel": float("inf"), "checks": [1.0, (2, float("nan"))]})
    {'rel': 'inf', 'checks': [1.0, [2, 'nan']]}
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_report(comparison, brief=False):
    """The text report: a header, one line per tensor (only the failures when `brief`), and a verdict."""
    lines = [f"A: {comparison.a.describe()}", f"B: {comparison.b.describe()}  (reference)"]
    lines += [f"note: {n}" for n in comparison.notes]
    reduced = comparison.policy is not None and comparison.policy.rel_tolerances() is None
    width = max(len(t.key) for t in comparison.tensors)
    if reduced:
        lines.append(f"policy {comparison.policy.name}: {comparison.policy.about}")
        lines.append(f"{'tensor':<{width}}  {'max abs':>9}  {'rel':>9}  {'NMSE dB':>8}  {'cosine':>9}  limit")
    else:
        lines.append(f"{'tensor':<{width}}  {'max abs':>9}  {'mean abs':>9}  {'rel':>9}  {'NMSE dB':>8}  {'tolerance':>9}")
    for t in comparison.tensors:
        if brief and t.ok:
            continue
        nmse = "exact" if t.nmse_db is None else f"{t.nmse_db:8.1f}"
        verdict = "ok" if t.ok else "OUT OF TOLERANCE"
        if reduced:
            cos = "—" if t.cosine is None else f"{t.cosine:9.6f}"
            line = f"{t.key:<{width}}  {t.max_abs:9.2e}  {t.rel:9.2e}  {nmse:>8}  {cos:>9}  {t.limit}  {verdict}"
        else:
            line = (f"{t.key:<{width}}  {t.max_abs:9.2e}  {t.mean_abs:9.2e}  {t.rel:9.2e}  {nmse:>8}  "
                    f"{t.tolerance:9.1e}  {verdict}")
        if t.top1 is not None:
            line += f"  top-1 {100 * t.top1:.1f}%  top-{TOP_K} {100 * t.top5:.1f}%"
        if t.kl is not None:
            line += f"  KL {t.kl:.2e}  top-p {100 * t.top_p:.1f}%"
        lines.append(line)
    if comparison.only_in_a or comparison.only_in_b:
        lines.append(f"not compared: {_count(comparison.only_in_a, 'tensor')} only in A, {len(comparison.only_in_b)} "
                     f"only in B (e.g. {', '.join((comparison.only_in_a + comparison.only_in_b)[:3])})")
    failures = [t for t in comparison.tensors if not t.ok]
    if failures and reduced:
        names = ", ".join(t.key for t in failures[:8]) + (", …" if len(failures) > 8 else "")
        lines.append(f"FAIL: {len(failures)} of {_count(comparison.tensors, 'tensor')} {_are(failures)} beyond what a "
                     f"correct {comparison.policy.name} implementation reaches: {names}")
    elif failures:
        first = failures[0]
        lines.append(f"FAIL: {len(failures)} of {_count(comparison.tensors, 'tensor')} out of tolerance; the first, in "
                     f"forward order, is {first.key} (rel {first.rel:.2e} > {first.tolerance:.1e})")
    elif reduced:
        lines.append(f"ok: consistent with a correct {comparison.policy.name} implementation ("
                     f"{_all(comparison.tensors, 'tensor')} within the {comparison.policy.name} policy)")
    else:
        lines.append(f"ok: {_all(comparison.tensors, 'tensor')} within tolerance")
    return "\n".join(lines)


def format_isolation(isolation, brief=False, comparison=None):
    """The text report: one line per tensor (only root causes and the tensors not isolated when `brief`),
    then the verdict: every root cause with the porting mistake that reproduces it, the layouts found in
    the dump, the port's rounding orders; with `comparison` (of the same dump against a reference), what
    each of its failures is (diagnosis.explain)."""
    lines = [f"isolation of {isolation.dump.describe()}, policy {isolation.policy.name}"]
    lines += [f"note: {n}" for n in isolation.notes]
    half = any(c.off is not None for c in isolation.checks)
    width = max(len(c.key) for c in isolation.checks)
    header = f"{'tensor':<{width}}  {'max abs':>9}  {'rel':>9}  {'NMSE dB':>8}"
    header += f"  {'≠ 1 ulp':>8}  {'> 1 ulp':>8}" if half else ""
    lines.append(header + "  limit")
    for c in isolation.checks:
        if brief and c.ok is not False and not c.layout:
            continue
        if c.ok is None:
            lines.append(f"{c.key:<{width}}  not isolated: {c.missing}")
            continue
        nmse = "exact" if c.nmse_db is None else f"{c.nmse_db:8.1f}"
        line = f"{c.key:<{width}}  {c.max_abs:9.2e}  {c.rel:9.2e}  {nmse:>8}"
        if half:
            line += "          " * 2 if c.off is None else f"  {100 * c.off:7.2f}%  {100 * c.beyond:7.3f}%"
        verdict = "DUMP LAYOUT" if c.layout else "ok" if c.ok else "ROOT CAUSE"
        lines.append(f"{line}  {c.limit}  {verdict}" + "".join(f"  ({n})" for n in c.notes[:1]))
    missing = isolation.not_isolated
    if missing and brief:
        lines.append(f"not isolated: {_count(missing, 'tensor')} whose inputs A does not record (e.g. {missing[0].key}: "
                     f"{missing[0].missing})")
    lines += _orders(isolation)
    lines += [f"DUMP LAYOUT: {c.key}: {c.layout}" for c in isolation.dump_layouts]
    explanation = None if comparison is None or comparison.ok else explain(isolation, comparison)
    roots = isolation.root_causes
    isolated = len(isolation.checks) - len(missing)
    if roots:
        lines.append(f"ROOT CAUSES: {len(roots)} of {_count(isolated, 'operation')} {_are(roots)} "
                     f"wrong on {'its' if len(roots) == 1 else 'their'} own inputs: "
                     + ", ".join(f"{c.key} ({_figure(c)})" for c in roots[:12]) + (", …" if len(roots) > 12 else ""))
        lines += [f"  {line}" for line in _mistakes(roots)]
    if explanation is not None and explanation.probable:
        key, why = explanation.probable[0]
        lines.append(f"PROBABLE ROOT CAUSE: {key}: the first tensor out of tolerance against B, and not isolated "
                     f"({why}): isolation could not check it; record its inputs to tell")
    if not roots and (explanation is None or not explanation.probable):
        unchecked = f"; {len(missing)} could not be isolated (not checked)" if missing and not brief else ""
        lines.append(f"ok: {_all(isolated, 'operation')} isolated "
                     f"{'agrees with its' if isolated == 1 else 'agree with their'} recomputation "
                     f"({isolation.policy.name} policy){unchecked}")
    if explanation is not None:
        lines.append(_against_b(explanation, comparison))
    return "\n".join(lines)


def _orders(isolation):
    """The port's rounding orders where they are not transformers' (half precision)."""
    lines = []
    for family, found in isolation.orders().items():
        kinds = sorted({c.name.rsplit(".", 1)[-1] if "layers." in c.name else c.name for c in isolation.checks
                        if family in c.orders})
        for order, count in found.items():
            lines.append(f"rounding order: {describe({family: order})}: {_count(count, 'tensor')} "
                         f"({', '.join(kinds[:4])})")
    return lines


def _mistakes(roots):
    """One line per root-cause name: the passes, and the mistake that reproduces it."""
    by_name = {}
    for c in roots:
        by_name.setdefault(c.name, []).append(c)
    lines = []
    for name, checks in by_name.items():
        passes = f" (passes {', '.join(str(c.pass_index) for c in checks)})" if len(checks) > 1 else ""
        mistakes = {c.mistake for c in checks}
        if mistakes == {""}:
            said = "no known porting mistake reproduces it"
        elif len(mistakes) == 1:
            said = f"reproduced exactly by {checks[0].mistake}"
        else:
            said = "; ".join(f"pass {c.pass_index}: {c.mistake or 'no known mistake reproduces it'}" for c in checks)
        notes = sorted({n for c in checks for n in c.notes})
        lines.append(f"{name}{passes}: {said}" + "".join(f" ({n})" for n in notes))
    return lines


def _against_b(e, comparison):
    failed = [t for t in comparison.tensors if not t.ok]
    n = len(e.root_causes)
    parts = [f"{n} {'is a root cause' if n == 1 else 'are root causes'}"]
    if e.probable:
        parts.append(f"{len(e.probable)} a probable root cause (not isolated)")
    if e.dump_layouts:
        parts.append(f"{len(e.dump_layouts)} right but stored in another layout in the dump")
    if e.inherited or e.root_causes:
        inherit = "inherits" if len(e.inherited) == 1 else "inherit"
        parts.append(f"{len(e.inherited)} {inherit} an error from upstream")
    if e.downstream:
        parts.append(f"{len(e.downstream)} {_are(e.downstream)} right on {_their(e.downstream)} own inputs, "
                     f"downstream of the probable root cause")
    if e.unknown:
        parts.append(f"{len(e.unknown)} could not be isolated ({'it' if len(e.unknown) == 1 else 'they'} may "
                     f"inherit, or be wrong {'itself' if len(e.unknown) == 1 else 'themselves'})")
    if e.no_upstream:
        one = len(e.no_upstream) == 1
        parts.append(f"{len(e.no_upstream)} {'has' if one else 'have'} no upstream and {'agrees' if one else 'agree'} "
                     f"with {_their(e.no_upstream)} recomputation from the model ({', '.join(e.no_upstream[:3])}): "
                     f"B differs from the model there")
    if e.accumulated:
        parts.append(f"{len(e.accumulated)} {_are(e.accumulated)} right on {_their(e.accumulated)} own inputs with "
                     f"nothing wrong upstream (e.g. {e.accumulated[0]}): an error accumulating within the limits, or "
                     f"B is not a reference for A")
    return f"of the {_count(failed, 'tensor')} out of tolerance against B, " + "; ".join(parts)


def _figure(check):
    if check.off is not None and check.rel < 1e-2:
        return f"{100 * check.off:.1f}% of elements off by ≥ 1 ulp"
    return f"rel {check.rel:.2e}"


def _count(things, noun):
    """"1 tensor", "3 tensors": `things` a number or a list.

    >>> _count([1], "tensor"), _count(3, "operation"), _all([1], "tensor"), _all(2, "tensor"), _are([1, 2])
    ('1 tensor', '3 operations', '1 tensor', 'all 2 tensors', 'are')
    """
    n = things if isinstance(things, int) else len(things)
    return f"{n} {noun}{'s' * (n != 1)}"


def _all(things, noun):
    n = things if isinstance(things, int) else len(things)
    return ("all " if n != 1 else "") + _count(n, noun)


def _are(things):
    return "is" if len(things) == 1 else "are"


def _their(things):
    return "its" if len(things) == 1 else "their"


# -- the JSON report ----------------------------------------------------------------------------------

REPORT_FORMAT, REPORT_VERSION = "qwen2np-compare", 2


def report_json(comparison=None, isolation=None, swapped=False, notes=()):
    """`qwen2np compare --json`: one object of the same shape whether or not isolation ran
    (docs/porting.md, "The JSON report"). `ok` is the verdict the exit status gives (0 when true)."""
    ok = (comparison is None or comparison.ok) and (isolation is None or isolation.ok)
    a = comparison.a if comparison is not None else isolation.dump
    explanation = None if comparison is None or isolation is None or comparison.ok else explain(isolation, comparison)
    return json_safe({
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "ok": ok, "exit_status": 0 if ok else 1,
        "a": a.describe(), "b": None if comparison is None else comparison.b.describe(), "swapped": swapped,
        "notes": list(notes),
        "comparison": None if comparison is None else comparison.to_json(),
        "isolation": None if isolation is None else isolation.to_json(),
        "explanation": None if explanation is None else explanation.to_json(),
    })
