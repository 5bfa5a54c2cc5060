"""Benchmark the forward pass on the real checkpoint: qwen2np against transformers, same run, same threads.

    python benchmarks/bench_model.py [--gguf PATH] [--rounds 2]

Both sides load the same float32 safetensors folder (transformers' own conversion of the test GGUF,
made once and cached beside it) and run in separate subprocesses, alternating, so that each one's peak
RSS is its own and machine noise hits both. Prints one JSON object: per side the load time, a 512-token
prefill (all logits, and last position only), one decode step with the cache (median over steps at a
~100-token context), and peak RSS; then the ratios qwen2np / transformers. Also qwen2np's load time and
peak RSS from the GGUF itself.

Targets (issue 3): prefill no slower than transformers; a decode step at most 0.8x transformers' time;
peak RSS within 1.2x the float32 parameter bytes.
"""

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

from workers import run_worker, transformers_folder

PREFILL = 512
CONTEXT = 100
DECODE_STEPS = 16


def worker(side, folder, repeats):
    import numpy as np

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 150000, (1, PREFILL))
    t0 = time.perf_counter()
    if side == "transformers":
        import torch
        import transformers

        torch.set_num_threads(2)
        torch.set_grad_enabled(False)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        load = time.perf_counter() - t0

        def forward(ids, **kw):
            out = model(torch.from_numpy(ids), **kw)
            return out, out.past_key_values
    else:
        import qwen2np
        from qwen2np.weights.system import apply_environment

        apply_environment(default=True)   # as the command line does: keep freed memory (qwen2np/weights/system.py)

        model = qwen2np.Qwen2ForCausalLM.from_pretrained(folder)
        load = time.perf_counter() - t0

        def forward(ids, **kw):
            if "past_key_values" in kw and kw["past_key_values"] is None:
                kw.pop("past_key_values")
            out = model(ids, **kw)
            return out, out.past_key_values

    n_params = sum(int(np.prod(a.shape)) for a in (
        model.state_dict().values() if side == "qwen2np" else [p for p in model.parameters()]))

    def timed(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    forward(prompt[:, :16], use_cache=False)  # warm up
    prefill_all = timed(lambda: forward(prompt, use_cache=False))
    prefill_last = timed(lambda: forward(prompt, use_cache=False, logits_to_keep=1))
    steps = []
    for _ in range(max(1, repeats // 2)):
        _, cache = forward(prompt[:, :CONTEXT], use_cache=True, logits_to_keep=1)
        for s in range(DECODE_STEPS):
            t = time.perf_counter()
            _, cache = forward(prompt[:, CONTEXT + s:CONTEXT + s + 1], past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
    return {"load_s": load, "prefill_512_all_logits_s": prefill_all, "prefill_512_last_logit_s": prefill_last,
            "decode_step_ms": 1000 * statistics.median(steps), "peak_rss_gb": _peak_rss_gb(),
            "float32_param_gb": n_params * 4 / 1e9}


def gguf_worker(gguf):
    import qwen2np

    t0 = time.perf_counter()
    qwen2np.Qwen2ForCausalLM.from_pretrained(gguf)
    return {"gguf_load_s": time.perf_counter() - t0, "gguf_peak_rss_gb": _peak_rss_gb()}


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        kind, path, *rest = args.worker
        result = gguf_worker(path) if kind == "gguf" else worker(kind, path, int(rest[0]))
        print(json.dumps(result))
        return
    from qwen2np.io.fetch import test_checkpoint_path

    gguf = Path(args.gguf) if args.gguf else test_checkpoint_path()
    folder = transformers_folder(gguf)
    runs = {"qwen2np": [], "transformers": []}
    for _ in range(args.rounds):  # alternate, so drifting machine load hits both sides
        for side in runs:
            runs[side].append(run_worker(__file__, side, str(folder), str(args.repeats)))
    result = {side: {k: min(r[k] for r in rs) if k != "peak_rss_gb" else max(r[k] for r in rs)
                     for k in rs[0]} for side, rs in runs.items()}
    result["qwen2np"].update(run_worker(__file__, "gguf", str(gguf)))
    q, t = result["qwen2np"], result["transformers"]
    result["ratios_qwen2np_over_transformers"] = {
        k: q[k] / t[k] for k in ("load_s", "prefill_512_all_logits_s", "prefill_512_last_logit_s", "decode_step_ms")}
    result["peak_rss_over_float32_params"] = {
        "safetensors": q["peak_rss_gb"] / q["float32_param_gb"], "gguf": q["gguf_peak_rss_gb"] / q["float32_param_gb"]}
    result["targets"] = {"prefill <= 1.0x": result["ratios_qwen2np_over_transformers"]["prefill_512_all_logits_s"] <= 1.0,
                         "decode <= 0.8x": result["ratios_qwen2np_over_transformers"]["decode_step_ms"] <= 0.8,
                         "peak RSS <= 1.2x": max(result["peak_rss_over_float32_params"].values()) <= 1.2}
    result["machine"] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
