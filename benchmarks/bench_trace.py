"""What the trace hooks cost an untraced forward pass, on the real checkpoint.

    python benchmarks/bench_trace.py [--model PATH] [--reps 30]

Every intermediate passes through `tap(scope, name, x)`, which returns at once when no trace is active.
This times the model's forward pass with `tap` as it is against `tap` replaced, in the modules that call
it, by a bare identity `lambda scope, name, x: x`: a decode step (one token after a 64-token prefill,
with a fresh copy of that cache each time) and a 64-token prefill. Repetitions interleave the two
variants (alternating which goes first) and the medians are compared. It also times `tap` itself when
untraced, to bound the whole mechanism (its calls included) against a forward pass without any call.
Prints one JSON line. Target: under 2%.
"""

import argparse
import copy
import json
import statistics
import sys
import time
import timeit

import numpy as np

import qwen2np
from qwen2np.inspection import tracing
from qwen2np.model import attention, layers, modeling
from qwen2np.weights.system import apply_environment

apply_environment(default=True)   # as the command line does: keep freed memory (qwen2np/weights/system.py)


def identity(scope, name, x):
    return x


MODULES = (modeling, attention, layers)


def with_tap(fn):
    for m in MODULES:
        m.tap = tracing.tap
    return fn()


def with_identity(fn):
    for m in MODULES:
        m.tap = identity
    try:
        return fn()
    finally:
        for m in MODULES:
            m.tap = tracing.tap


def interleaved(fn, reps):
    """Seconds of fn() per repetition with tap as is and with the identity, alternating which runs first."""
    times = {"tap": [], "identity": []}
    for rep in range(reps):
        order = [("tap", with_tap), ("identity", with_identity)]
        for label, run in order if rep % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run(fn)
            times[label].append(time.perf_counter() - started)
    return times


def spread(times):
    """The interquartile range of each variant, in % of its median: how noisy the machine was."""
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        out[k] = round(100 * (q[2] - q[0]) / statistics.median(v), 1)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test", help="a checkpoint (default: the test checkpoint)")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)

    from qwen2np.io.hub import resolve_model_path

    model = qwen2np.Qwen2ForCausalLM.from_pretrained(resolve_model_path(args.model))
    ids = np.random.default_rng(0).integers(0, 150000, (1, 65))
    prefix = model(ids[:, :64]).past_key_values
    taps = sum(1 for _ in model.intermediate_names())

    decode_times = interleaved(lambda: model(ids[:, 64:], past_key_values=copy.deepcopy(prefix)), args.reps)
    cache_copy = statistics.median(timeit.repeat(lambda: copy.deepcopy(prefix), number=1, repeat=args.reps))
    prefill_times = interleaved(lambda: model(ids[:, :64], use_cache=False), max(args.reps // 3, 5))
    decode = {k: statistics.median(v) for k, v in decode_times.items()}
    prefill = {k: statistics.median(v) for k, v in prefill_times.items()}
    x = np.zeros(1, np.float32)
    tap_call = min(timeit.repeat(lambda: tracing.tap("model.layers.3.self_attn", "probs", x), number=100_000,
                                 repeat=5)) / 100_000
    empty_call = min(timeit.repeat(lambda: None, number=100_000, repeat=5)) / 100_000

    def overhead(t):
        return round(100 * (t["tap"] - t["identity"]) / t["identity"], 3)

    decode_step = decode["identity"] - cache_copy
    print(json.dumps({
        "model": str(resolve_model_path(args.model)), "reps": args.reps, "taps_per_forward": taps,
        "decode_step_ms": {k: round(1e3 * (v - cache_copy), 2) for k, v in decode.items()},
        "decode_overhead_pct": overhead({k: v - cache_copy for k, v in decode.items()}),
        "decode_iqr_pct": spread(decode_times),
        "prefill64_ms": {k: round(1e3 * v, 1) for k, v in prefill.items()},
        "prefill64_overhead_pct": overhead(prefill),
        "prefill64_iqr_pct": spread(prefill_times),
        "untraced_tap_call_ns": round(1e9 * tap_call, 1),
        # the whole mechanism, calls included, as a share of a decode step (minus the cost of an empty call)
        "tap_calls_share_of_decode_step_pct": round(100 * taps * (tap_call - empty_call) / decode_step, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
