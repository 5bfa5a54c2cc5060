"""`qwen2np compare A B`: compare two dumps tensor by tensor and name the first divergence.

    $ qwen2np compare dumps/mine dumps/golden
    A: dumps/mine: myport 0.3, float32, B=1, 12 positions in 1 forward pass
    B: dumps/golden: qwen2np 0.1.0, float32, B=1, 12 positions in 1 forward pass  (reference)
    tensor                          max abs   mean abs        rel   NMSE dB  tolerance
    model.embed_tokens             0.00e+00   0.00e+00   0.00e+00     exact    0.0e+00  ok
    …
    FAIL: 52 of 458 tensors out of tolerance; the first, in forward order, is model.layers.5.mlp.up_proj (…)

Exit status: 0 when every tensor is within tolerance, 1 when one is not, 2 when the dumps cannot be
compared (missing or malformed, different token ids, attention masks, forward passes or shapes) or a flag
is wrong. B is the reference (NMSE is relative to it). The tolerances are the policy of
docs/tolerances.md for the dumps' dtype; `--tolerance` overrides them (`1e-3`, or `GLOB=1e-3` for the
names matching GLOB, repeatable, the last match wins). `--json` prints the whole comparison as JSON.
"""

import argparse
import json
import sys

from ..errors import Qwen2npError

HELP = "compare two dumps tensor by tensor and name the first divergence"


def _tolerance(text):
    from ..golden.tolerances import parse_tolerance

    try:
        return parse_tolerance(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser):
    parser.add_argument("a", metavar="A", help="a dump folder (the one under test)")
    parser.add_argument("b", metavar="B", help="a dump folder (the reference)")
    parser.add_argument("--tolerance", type=_tolerance, action="append", metavar="[GLOB=]NUMBER",
                        help="override the tolerance on rel (for the names matching GLOB)")
    parser.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    parser.add_argument("--brief", action="store_true", help="list only the tensors out of tolerance")


def run(args):
    from ..golden.compare import compare_dumps, format_report
    from ..golden.dump import read_dump

    try:
        comparison = compare_dumps(read_dump(args.a), read_dump(args.b), args.tolerance)
    except Qwen2npError as e:  # cannot compare: exit 2, so that CI tells it from "out of tolerance"
        print(f"qwen2np compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(comparison.to_json(), allow_nan=False))
    else:
        print(format_report(comparison, brief=args.brief))
    return 0 if comparison.ok else 1
