"""How closely qwen2np's bfloat16 (or float16) mode reproduces transformers 5.24 computing in that precision,
measured on the real test checkpoint (the figures of docs/numerics.md, "Half precision").

    python scripts/measure_half_precision.py [--dtype bfloat16] [--new-tokens 32] [--json out.json]

For each prompt, three dumps of every intermediate: qwen2np in the half precision (q), transformers in the
same precision with eager attention (t), and qwen2np float64 (the reference, r). Per layer, the NMSE of q
against t and of t against r, in dB: q reproduces transformers' rounding when d(q, t) is far below d(t, r).
Then greedy generation from each prompt (through the chat template) by both, token for token.

For scale, a fourth dump: transformers itself with its other CPU kernel for half-precision products
(oneDNN turned off, `torch.backends.mkldnn.flags(enabled=False)`: ATen's own gemm, which sums in another
order), t'. d(t', t) is how far two correct half-precision runs of transformers are from each other.

Both sides load the same float32 folder (the test GGUF converted by `qwen2np convert`, whose weights are
bitwise transformers' own GGUF dequantization) and round it to the half precision as they load it.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2np import Qwen2ForCausalLM, Qwen2Tokenizer  # noqa: E402
from qwen2np.io.fetch import test_checkpoint_path  # noqa: E402
from qwen2np.golden.metrics import distance_db  # noqa: E402
from qwen2np.golden.record import record_dump  # noqa: E402

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a Python function that reverses a string.",
    "Explain the difference between a process and a thread in two sentences.",
    "用一句话解释什么是快速排序。",
    "The derivative of x^3 + 2x is",
]


def agreement(tokens, theirs):
    """Whether two greedy generations are identical, and where they first differ."""
    n = min(len(tokens), len(theirs))
    same = np.asarray(tokens[:n]) == np.asarray(theirs[:n])
    return {"identical": bool(same.all() and len(tokens) == len(theirs)),
            "first_difference": None if same.all() else int(np.argmin(same)), "tokens": int(n)}


def float32_folder():
    """The test GGUF as a float32 safetensors folder (made once, by qwen2np convert)."""
    gguf = test_checkpoint_path()
    folder = gguf.parent / "derived" / "float32-folder"
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(gguf), str(folder), "--overwrite"], check=True)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("dump_transformers", ROOT / "scripts" / "dump_transformers.py")
    dt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dt)
    import torch

    folder = float32_folder()
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    ours = Qwen2ForCausalLM.from_pretrained(folder, dtype=args.dtype)
    reference = Qwen2ForCausalLM.from_pretrained(folder, dtype="float64")
    theirs = dt.load_model(folder, args.dtype)
    L = ours.config.num_hidden_layers
    rows, generations = [], []
    for prompt in PROMPTS:
        ids = tokenizer([prompt], return_tensors="np")["input_ids"]
        q = record_dump(ours, ids, fingerprint=None)
        t = dt.record_dump(theirs, ids, fingerprint=None)
        r = record_dump(reference, ids, fingerprint=None)
        with torch.backends.mkldnn.flags(enabled=False):
            t2 = dt.record_dump(theirs, ids, fingerprint=None)
        names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(L)] + ["model.norm", "logits"]
        per = {n: (distance_db(q[n], t[n]), distance_db(t[n], r[n]), distance_db(q[n], r[n]),
                   distance_db(t2[n], t[n]))
               for n in names}
        every = [distance_db(q[k], t[k]) - distance_db(t[k], r[k]) for k in t.tensors
                 if not k.endswith(".mask") and np.isfinite(distance_db(t[k], r[k]))]
        top1_other_kernel = float((np.asarray(t2["logits"], np.float32).argmax(-1) ==
                                   np.asarray(t["logits"], np.float32).argmax(-1)).mean())
        top1 = float((np.asarray(q["logits"], np.float32).argmax(-1) ==
                      np.asarray(t["logits"], np.float32).argmax(-1)).mean())
        rows.append({"prompt": prompt, "tokens": int(ids.shape[1]), "per_layer": per, "top1": top1, "top1_transformers_other_kernel": top1_other_kernel,
                     "smallest_margin_db": float(-max(every))})
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="np")["input_ids"]
        mine = ours.generate(chat, max_new_tokens=args.new_tokens, do_sample=False)[0, chat.shape[1]:]
        with torch.no_grad():
            them = theirs.generate(torch.from_numpy(chat), max_new_tokens=args.new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, chat.shape[1]:].numpy()
            with torch.backends.mkldnn.flags(enabled=False):
                other = theirs.generate(torch.from_numpy(chat), max_new_tokens=args.new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)[0, chat.shape[1]:].numpy()
        generations.append({"prompt": prompt, **agreement(mine, them),
                            "transformers_other_kernel": agreement(other, them)})
        print(f"{prompt[:40]!r:44} logits d(q,t) {per['logits'][0]:7.1f} dB  d(t,ref) {per['logits'][1]:7.1f} dB  "
              f"top-1 {100 * top1:5.1f}%  greedy {'identical' if generations[-1]['identical'] else 'differs at ' + str(generations[-1]['first_difference'])}",
              flush=True)
    print(f"\n{'tensor':22} {'d(q, t) dB':>12} {'d(t, ref) dB':>13} {'margin dB':>10} {'d(t_, t) dB':>12} "
          f"{'its margin':>11}   (mean over {len(PROMPTS)} prompts; t_: transformers, other kernel)")
    for name in rows[0]["per_layer"]:
        qt, tr, _, t2t = (np.mean([row["per_layer"][name][i] for row in rows]) for i in range(4))
        print(f"{name:22} {qt:12.1f} {tr:13.1f} {tr - qt:10.1f} {t2t:12.1f} {tr - t2t:11.1f}")
    print(f"top-1 agreement with transformers: qwen2np {100 * np.mean([r['top1'] for r in rows]):.1f}%, "
          f"transformers' other kernel {100 * np.mean([r['top1_transformers_other_kernel'] for r in rows]):.1f}%")
    print(f"greedy ({args.new_tokens} tokens, chat template): {sum(g['identical'] for g in generations)} of "
          f"{len(generations)} prompts identical; first differences at {[g['first_difference'] for g in generations]}")
    other = [g["transformers_other_kernel"] for g in generations]
    print(f"transformers' other kernel against transformers: {sum(g['identical'] for g in other)} of {len(other)} "
          f"identical; first differences at {[g['first_difference'] for g in other]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dtype": args.dtype, "prompts": rows, "generations": generations},
                                              indent=1, default=float))


if __name__ == "__main__":
    main()
