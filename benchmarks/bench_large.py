"""qwen2np at the sizes people use: a 7B-shaped bf16 checkpoint, against transformers in bf16.

    python scripts/make_synthetic_checkpoint.py /tmp/qwen2-7b-synthetic       # once: 15.2 GB, ~4 min
    python benchmarks/bench_large.py --model /tmp/qwen2-7b-synthetic [--rounds 1] [--json out.json]

Each side runs in its own fresh subprocess, one after the other (alternating in the order of --sides,
round after round), and measures: the load time, the peak RSS of the process (VmHWM: the weights
mapped in, conversions, activations; it includes the interpreter), a 64-token prefill (all logits, as a
forward call gives them) and one decode step through the KV cache after it (the median of --steps). Before
timing, one forward pass touches every weight, so that pages the system dropped from its cache are read
back first. Sides: `transformers-bf16` (5.24, default sdpa attention), `qwen2np-float32`,
`qwen2np-bfloat16`, `qwen2np-float64`; `--max-memory` passes a budget to the qwen2np sides (default:
what the machine has available). Prints one JSON object per run and a summary with the ratios; in a
memory cgroup, each run also reports the cgroup's usage and file cache before and after it, and the
default budget it found (docs/weights.md, "In a container, run after run").

The machine is shared and its timings move by ±10 %: quote every run, not the best one.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))   # this checkout's qwen2np

SIDES = ("transformers-bf16", "qwen2np-float32", "qwen2np-bfloat16", "qwen2np-float64")
PREFILL = 64


def worker(side, model_path, steps, max_memory):
    """Run one side in this process and print its figures as JSON."""
    ids = np.random.default_rng(0).integers(0, 150_000, (1, PREFILL + steps + 1))
    cgroup_before = cgroup_state()         # in a container: what earlier runs left charged to it
    t0 = time.perf_counter()
    if side.startswith("transformers"):
        import torch
        import transformers

        torch.set_num_threads(2)
        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
        torch.set_grad_enabled(False)
        load = time.perf_counter() - t0
        plan, budget = "bf16 as stored", None

        def forward(x, cache=None):
            out = model(torch.from_numpy(x), past_key_values=cache, use_cache=True)
            return out.past_key_values
    else:
        import qwen2np
        from qwen2np.weights.system import apply_environment, default_budget

        apply_environment(default=True)   # as the command line does: keep freed memory (qwen2np/weights/system.py)
        dtype = side.split("-", 1)[1]
        budget = default_budget() if max_memory is None else max_memory   # before loading: what the run found
        model = qwen2np.Qwen2ForCausalLM.from_pretrained(model_path, dtype=dtype, max_memory=max_memory)
        load = time.perf_counter() - t0
        plan = model.weight_plan.description

        def forward(x, cache=None):
            return model(x, past_key_values=cache, use_cache=True).past_key_values

    forward(ids[:, :8])                                       # warm-up: every weight read once
    t0 = time.perf_counter()
    cache = forward(ids[:, :PREFILL])
    prefill = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        cache = forward(ids[:, PREFILL + i:PREFILL + i + 1], cache)
        times.append(time.perf_counter() - t0)
    peak = peak_rss()
    print(json.dumps({"side": side, "load_s": load, "prefill_s": prefill, "decode_s": statistics.median(times),
                      "decode_all_s": times, "peak_rss_bytes": peak, "weights": plan, "budget": budget,
                      "cgroup_before": cgroup_before, "cgroup_after": cgroup_state()}))


def cgroup_state():
    """The memory cgroup this process runs in, when it has a limit (v1 or v2): its limit, its usage and the
    file cache charged to it (active and inactive), in bytes; None outside one."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, files, prefix = f"/sys/fs/cgroup/memory{path}", ("memory.limit_in_bytes",
                                                                      "memory.usage_in_bytes"), "total_"
        elif controllers == "":
            folder, files, prefix = f"/sys/fs/cgroup{path}", ("memory.max", "memory.current"), ""
        else:
            continue
        try:
            limit, usage = (open(f"{folder}/{name}").read().strip() for name in files)
            stat = dict(line.split() for line in open(f"{folder}/memory.stat"))
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:
            continue
        return {"limit": int(limit), "usage": int(usage), "active_file": int(stat.get(prefix + "active_file", 0)),
                "inactive_file": int(stat.get(prefix + "inactive_file", 0))}
    return None


def peak_rss():
    """This process's peak resident set, in bytes: VmHWM (ru_maxrss would carry over the peak of a big
    parent across exec); ru_maxrss where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_side(side, args):
    command = [sys.executable, __file__, "--worker", side, "--model", args.model, "--steps", str(args.steps)]
    if args.max_memory:
        command += ["--max-memory", args.max_memory]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        return {"side": side, "error": (done.stderr.strip().splitlines() or ["?"])[-1],
                "returncode": done.returncode, "wall_s": time.perf_counter() - started}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a bf16 checkpoint folder (make_synthetic_checkpoint.py)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="decode steps timed (the median is reported)")
    parser.add_argument("--max-memory", help="budget for the qwen2np sides, e.g. 15GB")
    parser.add_argument("--json", help="also write every run to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.steps, args.max_memory)
    runs = []
    for r in range(args.rounds):
        for side in args.sides:
            result = run_side(side, args)
            result["round"] = r
            runs.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    reference = {r["round"]: r for r in runs if r["side"] == "transformers-bf16" and "error" not in r}
    print("\nside                 load s  prefill s  decode s  peak RSS GB   vs transformers: RSS  decode")
    for r in runs:
        if "error" in r:
            print(f"{r['side']:<20} failed: {r['error']}")
            continue
        ref = reference.get(r["round"])
        ratios = "" if ref is None else (f"   {r['peak_rss_bytes'] / ref['peak_rss_bytes']:5.2f}  "
                                         f"{r['decode_s'] / ref['decode_s']:5.2f}")
        print(f"{r['side']:<20} {r['load_s']:6.1f}  {r['prefill_s']:9.2f}  {r['decode_s']:8.2f}  "
              f"{r['peak_rss_bytes'] / 1e9:11.1f}{ratios}")


if __name__ == "__main__":
    main()
