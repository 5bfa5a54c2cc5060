"""The reports of a comparison and of an isolation: text for a person, JSON-ready values for a program.

`format_report` prints a Comparison (compare.py) a tensor a line, then the verdict: the first tensor out
of tolerance, or every one beyond a reduced-precision policy. `format_isolation` prints an Isolation
(isolate.py) an operation a line, then every root cause, and, given the comparison of the same dump,
which of its failures are root causes and which inherit an error. `json_safe` makes either's `to_json()`
strict JSON (an infinite error is the string "inf"). docs/porting.md shows both reports.
"""

import math

from .metrics import TOP_K


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
    then the verdict naming every root cause; with `comparison` (of the same dump against a reference),
    which of its failures are root causes and which inherit an error."""
    lines = [f"isolation of {isolation.dump.describe()}, policy {isolation.policy.name}"]
    lines += [f"note: {n}" for n in isolation.notes]
    half = any(c.off is not None for c in isolation.checks)
    width = max(len(c.key) for c in isolation.checks)
    header = f"{'tensor':<{width}}  {'max abs':>9}  {'rel':>9}  {'NMSE dB':>8}"
    header += f"  {'≠ 1 ulp':>8}  {'> 1 ulp':>8}" if half else ""
    lines.append(header + "  limit")
    for c in isolation.checks:
        if brief and c.ok is not False:
            continue
        if c.ok is None:
            lines.append(f"{c.key:<{width}}  not isolated: {c.missing}")
            continue
        nmse = "exact" if c.nmse_db is None else f"{c.nmse_db:8.1f}"
        line = f"{c.key:<{width}}  {c.max_abs:9.2e}  {c.rel:9.2e}  {nmse:>8}"
        if half:
            line += "          " * 2 if c.off is None else f"  {100 * c.off:7.2f}%  {100 * c.beyond:7.3f}%"
        lines.append(f"{line}  {c.limit}  {'ok' if c.ok else 'ROOT CAUSE'}")
    missing = isolation.not_isolated
    if missing and brief:
        lines.append(f"not isolated: {_count(missing, 'tensor')} whose inputs A does not record (e.g. {missing[0].key}: "
                     f"{missing[0].missing})")
    roots = isolation.root_causes
    isolated = len(isolation.checks) - len(missing)
    if roots:
        lines.append(f"ROOT CAUSES: {len(roots)} of {_count(isolated, 'operation')} {_are(roots)} "
                     f"wrong on {'its' if len(roots) == 1 else 'their'} own inputs: "
                     + ", ".join(f"{c.key} ({_figure(c)})" for c in roots))
    else:
        lines.append(f"ok: {_all(isolated, 'operation')} isolated "
                     f"{'agrees with its' if isolated == 1 else 'agree with their'} recomputation "
                     f"({isolation.policy.name} policy)")
    if comparison is not None and not comparison.ok:
        failed = [t.key for t in comparison.tensors if not t.ok]
        own = {c.key for c in roots}
        inherited = [k for k in failed if k not in own]
        unexplained = [k for k in failed if k not in own and k in {c.key for c in missing}]
        lines.append(f"of the {_count(failed, 'tensor')} out of tolerance against B, {len(failed) - len(inherited)} "
                     f"{'is a root cause' if len(failed) - len(inherited) == 1 else 'are root causes'}; {len(inherited)} "
                     f"{'inherits' if len(inherited) == 1 else 'inherit'} an error from upstream"
                     + (f" ({len(unexplained)} of them could not be isolated)" if unexplained else ""))
    return "\n".join(lines)


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
