"""`qwen2np compare A B`: compare two dumps tensor by tensor and name the first divergence; with
`--isolate`, name every root cause.

    $ qwen2np compare dumps/mine dumps/golden
    A: dumps/mine: myport 0.3, float32, B=1, 12 positions in 1 forward pass
    B: dumps/golden: qwen2np 0.1.0, float32, B=1, 12 positions in 1 forward pass  (reference)
    tensor                          max abs   mean abs        rel   NMSE dB  tolerance
    model.embed_tokens             0.00e+00   0.00e+00   0.00e+00     exact    0.0e+00  ok
    …
    FAIL: 52 of 458 tensors out of tolerance; the first, in forward order, is model.layers.5.mlp.up_proj (…)

    $ qwen2np compare dumps/mine dumps/golden --isolate --brief
    …
    ROOT CAUSES: 2 of 1383 operations are wrong on their own inputs: model.layers.3.self_attn.q_rope (…), …

Exit status, read by a port's CI: 0 when every tensor is within the policy (and, with `--isolate`, every
operation agrees with its recomputation), 1 when one is not; nothing else exits 0 or 1. 2 when the dumps
cannot be compared (missing or malformed, different token ids, attention masks, forward passes or shapes,
weights that are not the port's), a flag is wrong, or the report cannot be written (stdout full or
closed); 3 on an internal error (a bug in qwen2np). B is the reference (NMSE is relative to it).

`--policy` says what A is held to (docs/tolerances.md): float32 or float64 (`rel` per tensor kind, the
default by the dumps' dtypes), bfloat16 or float16 ("consistent with a correct implementation in that
precision", the default for a dump in that dtype), q8_0 or q4_k_m (a float32 implementation on those
quantized weights, against a reference on the same dequantized weights). `--tolerance` overrides the
`rel` tolerance (`1e-3`, or `GLOB=1e-3` for the names matching GLOB, repeatable, the last match wins).

`--isolate` recomputes every operation of A from A's own recorded inputs (qwen2np/golden/isolate.py) with
the weights of `--model` (default: the checkpoint A's manifest names, else B's), checked against A's weights
fingerprint, and reports every root cause with the porting mistake that reproduces it (`--no-catalogue`:
without replaying them); B is then optional. Given a qwen2np dump as A and another as B, compare takes B as
the port and says so. `--json` prints one object of the same shape with or without `--isolate` (format
"qwen2np-compare", version 2: docs/porting.md).
"""

import argparse
import json

from .. import Qwen2ForCausalLM
from ..errors import DumpError
from ..golden.compare import compare_dumps
from ..golden.dump import read_dump
from ..golden.isolate import isolate_dump
from ..golden.layouts import swapped
from ..golden.policies import policy_named
from ..golden.report import format_isolation, format_report, report_json
from ..golden.tolerances import parse_tolerance
from ..io.hub import resolve_model_path
from . import OK, OUT_OF_TOLERANCE

HELP = "compare two dumps tensor by tensor; name the first divergence, or with --isolate every root cause"


def _tolerance(text):
    try:
        return parse_tolerance(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser):
    parser.add_argument("a", metavar="A", help="a dump folder (the one under test)")
    parser.add_argument("b", metavar="B", nargs="?", help="a dump folder (the reference; optional with --isolate)")
    parser.add_argument("--policy", metavar="NAME",
                        help="float32, float64, bfloat16, float16, q8_0 or q4_k_m (default: by the dumps' dtypes)")
    parser.add_argument("--tolerance", type=_tolerance, action="append", metavar="[GLOB=]NUMBER",
                        help="override the tolerance on rel (for the names matching GLOB)")
    parser.add_argument("--isolate", action="store_true",
                        help="recompute each operation of A from A's own inputs and name every root cause")
    parser.add_argument("--model", metavar="PATH",
                        help="with --isolate: the port's checkpoint (default: the one A's manifest names)")
    parser.add_argument("--no-catalogue", action="store_true",
                        help="with --isolate: do not replay the catalogue of porting mistakes on the root causes")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object (format qwen2np-compare 2, docs/porting.md)")
    parser.add_argument("--brief", action="store_true", help="list only the tensors out of tolerance")


def run(args):
    # an error (cannot compare) propagates: qwen2np.cli exits 2 for it, so that CI tells it from "out of tolerance"
    if args.b is None and not args.isolate:
        raise DumpError("compare needs a reference dump B (or --isolate, to check A's operations alone)")
    if args.model is not None and not args.isolate:
        raise DumpError("--model goes with --isolate (the weights the operations are recomputed with)")
    policy = None if args.policy is None else policy_named(args.policy)
    a, b = read_dump(args.a), None if args.b is None else read_dump(args.b)
    notes, swap = [], swapped(a, b)
    if swap:   # the reference first: the port is B, and the port is what is compared and isolated
        a, b = b, a
        notes.append(f"the dumps were given in the other order: {b.folder} is a qwen2np dump and {a.folder} is "
                     f"not ({a.manifest.get('producer', '?')}): {a.folder} is taken as the port (A) and "
                     f"{b.folder} as the reference (B); give the port first")
    comparison = None if b is None else compare_dumps(a, b, args.tolerance, policy)
    isolation = _isolate(a, b, args.model, policy, not args.no_catalogue) if args.isolate else None
    if args.json:
        print(json.dumps(report_json(comparison, isolation, swap, notes), allow_nan=False))
    else:
        reports = [] if comparison is None else [format_report(comparison, brief=args.brief)]
        if isolation is not None:
            reports.append(format_isolation(isolation, brief=args.brief, comparison=comparison))
        print("\n".join(f"note: {n}" for n in notes) + "\n" * bool(notes) + "\n\n".join(reports))
    ok = (comparison is None or comparison.ok) and (isolation is None or isolation.ok)
    return OK if ok else OUT_OF_TOLERANCE


def _isolate(dump, reference, model_path, policy, catalogue):
    """Isolate `dump` with a qwen2np model of `model_path`, or of the checkpoint its manifest names, or of the one
    the reference's manifest names (a qwen2np dump says which checkpoint it ran)."""
    path = model_path or (dump.manifest.get("model") or {}).get("path") or \
        (reference is not None and (reference.manifest.get("model") or {}).get("path"))
    if not path:
        raise DumpError(f"{dump.folder}: its manifest names no checkpoint (nor does B's); give --model the port's "
                        f"checkpoint")
    model = Qwen2ForCausalLM.from_pretrained(resolve_model_path(path))
    isolation = isolate_dump(dump, model, policy, catalogue=catalogue)
    if len(isolation.not_isolated) == len(isolation.checks):
        first = isolation.checks[0]
        raise DumpError(f"{dump.folder}: no operation can be isolated: each needs inputs A does not record "
                        f"(e.g. {first.key} {first.missing}); dump the inputs too (docs/porting.md)")
    return isolation
