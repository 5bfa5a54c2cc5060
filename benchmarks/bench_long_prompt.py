"""Long prompts: time and peak memory of a prefill, and of a dump of its last positions, against the
memory estimate the forward pass is checked with (qwen2np/weights/plan.py `activation_bytes`).

    python benchmarks/bench_long_prompt.py --model test --lengths 8192 16384 32768 --modes last dump
    python benchmarks/bench_long_prompt.py --random '{"hidden_size": 256, ...}' --lengths 512 2048 --modes last all

Each run is a fresh process (the kernel's VmHWM is then its own). It loads the model (the default budget
unless --max-memory), runs a 16-token pass to warm up, resets VmHWM (`/proc/self/clear_refs`), and
times one of:

* `last`: a prefill keeping the last position's logits, with a KV cache (what `generate` does);
* `all`:  the same with every position's logits;
* `dump`: `qwen2np dump --positions -16: --fingerprint none` of the prompt, in the same process
  (golden.record.record_dump, every intermediate of the last 16 positions, written to a folder).

Prints one JSON line per run: seconds, the process's peak resident memory (`peak_gb`, loading included)
and the pass's own (`pass_gb`: VmHWM after the reset less VmRSS before the pass), the estimate
(`estimate_gb`) and their ratio, and the weight plan. Prompts are random token ids (the memory and the
time do not depend on which). `--malloc keep` keeps freed memory as the command line does
(qwen2np/weights/system.py); `default` leaves glibc's malloc as a library call does.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DUMP_POSITIONS = "-16:"


def status(key):
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(args):
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from qwen2np import Qwen2Config, Qwen2ForCausalLM
    from qwen2np.golden.record import record_dump, select_positions
    from qwen2np.weights.plan import activation_bytes
    from qwen2np.weights.system import apply_environment

    if args.malloc == "keep":
        apply_environment(default=True)
    started = time.perf_counter()
    if args.random:
        model = Qwen2ForCausalLM(Qwen2Config(**json.loads(args.random)), seed=0, dtype=args.dtype)
    else:
        model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=args.dtype, max_memory=args.max_memory)
    load = time.perf_counter() - started
    config = model.config
    ids = np.random.default_rng(0).integers(0, min(config.vocab_size, 150000), (args.batch, args.length))
    model(ids[:, :16], logits_to_keep=1)                 # warm up: BLAS buffers, first-use costs
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:       # VmHWM := VmRSS
        f.write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    if args.mode == "dump":
        with tempfile.TemporaryDirectory() as folder:
            dump = record_dump(model, ids, positions=DUMP_POSITIONS, fingerprint=None, out=Path(folder) / "d")
            tensors = len(dump.tensors)
            del dump
        kept = len(select_positions(DUMP_POSITIONS, args.length, args.length))
        logits = args.batch * kept
    else:
        out = model(ids, logits_to_keep=1 if args.mode == "last" else 0)
        tensors = None
        logits = out.logits.shape[0] * out.logits.shape[1]
        del out
    seconds = time.perf_counter() - started
    peak = status("VmHWM")
    estimate = activation_bytes(config, model.dtype, args.length, args.batch, logits=logits)
    plan = model.weight_plan
    print(json.dumps({
        "model": "random" if args.random else str(args.model), "dtype": args.dtype, "mode": args.mode,
        "length": args.length, "batch": args.batch, "malloc": args.malloc, "seconds": round(seconds, 2),
        "load_s": round(load, 2), "peak_gb": round(peak / 1e9, 3), "pass_gb": round((peak - before) / 1e9, 3),
        "estimate_gb": round(estimate / 1e9, 3), "estimate/pass": round(estimate / max(1, peak - before), 3),
        "tensors": tensors, "plan": None if plan is None else plan.description}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test", help="a checkpoint (default: the test checkpoint)")
    parser.add_argument("--random", metavar="JSON", help="a random model of this config instead of --model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", default=["last", "dump"], choices=["last", "all", "dump"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--malloc", default="keep", choices=["keep", "default"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.model == "test" and not args.random:
        sys.path.insert(0, str(ROOT))
        from qwen2np.io.fetch import test_checkpoint_path

        args.model = str(test_checkpoint_path())
    for length in args.lengths:
        for mode in args.modes:
            command = [sys.executable, __file__, "--child", "--length", str(length), "--mode", mode,
                       "--batch", str(args.batch), "--dtype", args.dtype, "--malloc", args.malloc,
                       "--model", args.model]
            command += ["--random", args.random] if args.random else []
            command += ["--max-memory", args.max_memory] if args.max_memory else []
            env = {**os.environ, "QWEN2NP_KEEP_FREED_MEMORY": "1" if args.malloc == "keep" else "0"}
            run = subprocess.run(command, capture_output=True, text=True, env=env)
            if run.returncode:
                print(json.dumps({"length": length, "mode": mode, "error": run.stderr.strip().splitlines()[-1:]}),
                      flush=True)
            else:
                print(run.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
