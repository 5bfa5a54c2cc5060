"""Benchmark the backward pass on the real checkpoint: qwen2np's value_and_grad against torch autograd.

    python benchmarks/bench_backward.py [--gguf PATH] [--tokens 128] [--rounds 2] [--repeats 3]

Both sides load the same float32 safetensors folder (transformers' own conversion of the test GGUF, made
once and cached beside it, as bench_model.py does) and run in separate subprocesses, alternating, so that
each one's peak RSS is its own and machine noise hits both. Each computes the causal-LM loss of a
`--tokens`-token batch of one (labels = the ids) and the gradient of every parameter:

* qwen2np: `forward_s` is `model(ids, labels=ids, use_cache=False)`, `value_and_grad_s` the whole
  value_and_grad (its forward keeps what the backward needs), and `backward_s` their difference;
* transformers: `forward_s` is the forward with autograd recording (the graph is its saved activations),
  `backward_s` is `loss.backward()`, and `no_grad_forward_s` the forward without recording.

Each figure is the median over `--repeats` calls after a warm-up call, and the best over the rounds. The
gradients are new arrays at every call on both sides (torch: `zero_grad(set_to_none=True)`, its default).
Prints one JSON object: per side the figures and `backward_over_forward`, and the ratios qwen2np /
transformers. Target (issue 19): qwen2np's backward at most 3x its forward's time, at 128 tokens, float32.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from workers import run_worker, transformers_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's qwen2np, whatever is installed


def worker(side, folder, tokens, repeats):
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 150000, (1, tokens))
    if side == "transformers":
        import torch
        import transformers

        torch.set_num_threads(2)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        t_ids = torch.from_numpy(ids)

        def step():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(t_ids, labels=t_ids, use_cache=False)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        def no_grad():
            with torch.no_grad():
                t0 = time.perf_counter()
                model(t_ids, labels=t_ids, use_cache=False)
                return time.perf_counter() - t0

        step()
        times = [step() for _ in range(repeats)]
        forward, backward = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        extra = {"no_grad_forward_s": statistics.median(no_grad() for _ in range(repeats))}
    else:
        import qwen2np
        from qwen2np.weights.system import apply_environment

        apply_environment(default=True)   # as the command line and bench_model.py do (qwen2np/weights/system.py)
        model = qwen2np.Qwen2ForCausalLM.from_pretrained(folder)

        def forward_only():
            t0 = time.perf_counter()
            model(ids, labels=ids, use_cache=False)
            return time.perf_counter() - t0

        def both():
            t0 = time.perf_counter()
            # a budget of its own: the default (what is available) varies with the other jobs on the machine
            _, grads = qwen2np.value_and_grad(model, ids, labels=ids, max_memory="8GB")
            elapsed = time.perf_counter() - t0
            return elapsed, grads.plan.description

        both()
        forward = statistics.median(forward_only() for _ in range(repeats))
        runs = [both() for _ in range(repeats)]
        total = statistics.median(r[0] for r in runs)
        backward = total - forward
        extra = {"value_and_grad_s": total, "plan": runs[0][1]}
    return {"forward_s": forward, "backward_s": backward, "backward_over_forward": backward / forward, **extra,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        side, folder, tokens, repeats = args.worker
        print(json.dumps(worker(side, folder, int(tokens), int(repeats))))
        return
    from qwen2np.io.fetch import test_checkpoint_path

    folder = transformers_folder(Path(args.gguf) if args.gguf else test_checkpoint_path())
    runs = {"qwen2np": [], "transformers": []}
    for _ in range(args.rounds):   # alternate, so that drifting machine load hits both sides
        for side in runs:
            runs[side].append(run_worker(__file__, side, str(folder), str(args.tokens), str(args.repeats)))
    result = {"tokens": args.tokens, "dtype": "float32"}
    for side, rs in runs.items():
        best = min(rs, key=lambda r: r["forward_s"] + r["backward_s"])
        result[side] = {**best, "peak_rss_gb": max(r["peak_rss_gb"] for r in rs)}
    q, t = result["qwen2np"], result["transformers"]
    result["ratios_qwen2np_over_transformers"] = {k: q[k] / t[k] for k in ("forward_s", "backward_s")}
    result["target"] = {"qwen2np backward <= 3x its forward": q["backward_over_forward"] <= 3.0}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
