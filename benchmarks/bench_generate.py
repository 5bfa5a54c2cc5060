"""Benchmark `generate`: 64 new tokens, greedy, qwen2np against transformers 5.24, same prompt, 2 threads.

    python benchmarks/bench_generate.py [--gguf PATH] [--rounds 2] [--new-tokens 64]

Each side runs in its own subprocess (alternating over rounds, so drifting machine load hits both), loads
the same GGUF (transformers dequantizes it to float32 with the same `gguf` functions), warms up with a
4-token generate, then times `generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)`:
the prompt's prefill plus 64 decoding steps, as a user sees it. Prints one JSON object with tok/s of
both sides (new tokens / wall time of the call; best round), the ratio qwen2np / transformers, and
whether the two produced the same tokens. Target (issue 4): ratio >= 1.5.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that reverses a string, with a docstring and two examples."


def prompt_ids(gguf):
    from qwen2np import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(gguf)
    return tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                   return_dict=False)


def worker(side, gguf, ids, new_tokens):
    import numpy as np

    ids = np.array([ids], dtype=np.int64)
    t0 = time.perf_counter()
    if side == "transformers":
        import torch
        import transformers

        torch.set_num_threads(2)
        torch.set_grad_enabled(False)
        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(Path(gguf).parent), gguf_file=Path(gguf).name, dtype=torch.float32,
            attn_implementation="eager").eval()

        def generate(n):
            return model.generate(torch.from_numpy(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False).numpy()
    else:
        import qwen2np
        from qwen2np.weights.system import apply_environment

        apply_environment(default=True)   # as the command line does: keep freed memory (qwen2np/weights/system.py)

        model = qwen2np.Qwen2ForCausalLM.from_pretrained(gguf)

        def generate(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    load = time.perf_counter() - t0
    generate(4)  # warm up
    t = time.perf_counter()
    out = generate(new_tokens)
    seconds = time.perf_counter() - t
    new = out.shape[1] - ids.shape[1]
    return {"load_s": load, "seconds": seconds, "new_tokens": new, "tok_per_s": new / seconds,
            "tokens": out[0, ids.shape[1]:].tolist()}


def run_worker(side, gguf, ids, new_tokens):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", side, str(gguf), json.dumps(ids), str(new_tokens)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"worker {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="the test checkpoint (default: qwen2np's fetched one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, gguf, ids, n = args.worker
        print(json.dumps(worker(side, gguf, json.loads(ids), int(n))))
        return
    from qwen2np.io.fetch import test_checkpoint_path

    gguf = Path(args.gguf) if args.gguf else test_checkpoint_path()
    ids = prompt_ids(gguf)
    runs = {"qwen2np": [], "transformers": []}
    for _ in range(args.rounds):
        for side in runs:
            runs[side].append(run_worker(side, gguf, ids, args.new_tokens))
    best = {side: max(rs, key=lambda r: r["tok_per_s"]) for side, rs in runs.items()}
    result = {
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "threads": 2,
        **{side: {"tok_per_s": round(r["tok_per_s"], 2), "seconds": round(r["seconds"], 2),
                  "all_rounds_tok_per_s": [round(x["tok_per_s"], 2) for x in runs[side]],
                  "load_s": round(r["load_s"], 1)} for side, r in best.items()},
        "ratio_qwen2np_over_transformers": round(best["qwen2np"]["tok_per_s"] / best["transformers"]["tok_per_s"], 3),
        "identical_tokens": best["qwen2np"]["tokens"] == best["transformers"]["tokens"],
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    result["target_ratio_1.5"] = result["ratio_qwen2np_over_transformers"] >= 1.5
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
