#!/usr/bin/env python
"""Measure correct reduced-precision implementations against qwen2np float64: the numbers behind the
bfloat16, float16, q8_0 and q4_k_m policies (and the float32 isolation limits) of docs/tolerances.md.

    python scripts/measure_policies.py --work DIR [--phases reference ports llama analyse] [--length 64]

The ports, each on a set of prompts (cut at --length tokens, the last 2 fed as decode steps):

    transformers bfloat16, float16, float32   scripts/dump_transformers.py, eager attention, from the
                                              float32 folder transformers converts from the test GGUF
    qwen2np float32                           qwen2np's own float32 mode
    llama.cpp F32, Q8_0, Q4_K_M               scripts/dump_llama_cpp.py: the test GGUF converted by
                                              llama.cpp to F32 and Q8_0, and the test GGUF itself

The references: qwen2np float64 on the dequantized test GGUF (whose weights the F32 file and
transformers' folder hold exactly), and qwen2np float64 on the Q8_0 file for the Q8_0 port.

`analyse` compares every port with its reference (per tensor kind and layer: the worst NMSE in dB and
cosine similarity; for the logits the mean KL divergence, top-1 and top-p agreement per prompt) and
isolates every port's dump (qwen2np/golden/isolate.py: per kind, the worst local error), then prints
Markdown tables and one JSON line. Dumps are kept in DIR between phases; each phase holds one model at a
time (the float64 reference model takes 5 GB; the run peaks near 6 GB), and llama.cpp runs in its own
process. About an hour on 2 shared cores (the analysis, 35 isolations of 1305-1383 tensors, is most of it).
"""

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from qwen2np import Qwen2ForCausalLM, Qwen2Tokenizer
from qwen2np.io.fetch import test_checkpoint_path
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump, write_dump
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.record import record_dump
from qwen2np.golden.tolerances import kind_of
from qwen2np.inspection.names import LAYER_NAMES

ROOT = Path(__file__).resolve().parents[1]
DECODE_STEPS = 2
PROMPTS = [
    'def quicksort(items):\n    """Sort a list with the quicksort algorithm."""\n    if len(items) <= 1:\n        return '
    "items\n    pivot = items[len(items) // 2]\n    left = [x for x in items if x < pivot]\n    middle = [x for x in "
    "items if x == pivot]\n    right = [x for x in items if x > pivot]\n    return quicksort(left) + middle + quicksort(right)\n",
    "The quicksort algorithm picks a pivot, splits the list around it and sorts both halves recursively. Its average "
    "running time is O(n log n); a bad pivot makes it quadratic. In practice it is fast because its inner loop is "
    "simple and it works in place, which is kind to caches. Merge sort, by contrast, needs extra memory but is stable.",
    "Quicksort est un algorithme de tri rapide, inventé par Tony Hoare en 1959. 快速排序是一种分而治之的排序算法，"
    "它选择一个基准元素，把数组分成两部分。Быстрая сортировка — один из самых известных алгоритмов сортировки. "
    "クイックソートは平均的に非常に高速なソートアルゴリズムです。",
    '{"name": "qwen2np", "layers": 24, "hidden_size": 896, "heads": {"query": 14, "key_value": 2}, "rope_theta": '
    '1000000.0, "vocab": 151936, "dtype": ["float32", "float64"], "tests": [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]}\n'
    "import numpy as np\nx = np.linspace(0, 1, 101)\ny = np.sin(2 * np.pi * x) ** 2 + np.cos(3 * x)\nprint(y.mean())\n",
]
# --prompt-set lengths: prose, code, Chinese, and one long text (~512 tokens), each cut at its own length
LONG = (PROMPTS[0] + PROMPTS[1] + "\n\n" + PROMPTS[3]) * 3
LENGTHS_SET = [
    ("prose", PROMPTS[1], 96),
    ("code", PROMPTS[0], 128),
    ("chinese", "快速排序是一种分而治之的排序算法，由托尼·霍尔在1959年发明。它选择一个基准元素，把数组分成两部分：小于基准的元素和大于基准"
                "的元素，然后递归地对两部分排序。平均时间复杂度为O(n log n)，最坏情况下为O(n²)。在实践中，快速排序通常比其他排序算法更快，"
                "因为它的内部循环可以在大多数架构上高效地实现。归并排序则需要额外的内存，但它是稳定的。", 160),
    ("long", LONG, 512),
]
CHAT = "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."
PORTS = {   # name -> (kind, argument)
    "transformers bfloat16": ("transformers", "bfloat16"),
    "transformers float16": ("transformers", "float16"),
    "transformers float32": ("transformers", "float32"),
    "qwen2np float32": ("qwen2np", "float32"),
    "llama.cpp F32": ("llama", "F32"),
    "llama.cpp Q8_0": ("llama", "Q8_0"),
    "llama.cpp Q4_K_M": ("llama", None),
    # other implementations of bfloat16 (--ports): each computes with its own rounding orders
    "mlx-lm bfloat16": ("mlx", "bfloat16"),
    "keras-hub bfloat16": ("keras", "bfloat16"),
}
# the names dumped: "*" but head_out for the lengths set (H times o_proj's memory at 512 tokens)
INCLUDE = ["*"]
KERAS_PYTHON = "/work/venvs/keras-hub/bin/python"   # keras-hub 0.32.0 + JAX CPU in a venv of its own


def slug(name):
    return name.replace(" ", "-").replace(".", "")


def prompt_ids(tokenizer, length, prompt_set="default"):
    """One [1, T] id array per prompt, T <= length (the chat prompt through the chat template); with
    prompt_set "lengths", the texts of LENGTHS_SET each cut at its own length."""
    if prompt_set == "lengths":
        return [np.array([tokenizer(text)["input_ids"][:n]]) for _, text, n in LENGTHS_SET]
    texts = PROMPTS + [tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                                     tokenize=False)]
    return [np.array([tokenizer(t)["input_ids"][:length]]) for t in texts]


def phase_reference(work, gguf, prompts, dtype="float64", quantized=True):
    """qwen2np float64 on the test GGUF and on its Q8_0 conversion: the references (float32 and the GGUF
    alone with --reference-dtype float32: for half-precision ports a float32 reference is as good, 80 dB
    below their error, and 5 GB smaller)."""
    files = [("reference", gguf)] + ([("reference-Q8_0", llama_file(gguf, "Q8_0"))] if quantized else [])
    for label, path in files:
        model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype)
        for i, ids in enumerate(prompts):
            out = work / label / str(i)
            if not (out / "manifest.json").is_file():
                write_dump(record_dump(model, ids, include=INCLUDE, decode_steps=DECODE_STEPS, model_path=path), out)
        del model
        gc.collect()


def load_dump_transformers():
    spec = importlib.util.spec_from_file_location("dump_transformers", ROOT / "scripts" / "dump_transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transformers_folder(gguf):
    """The float32 folder tests/conftest.py makes beside the GGUF (transformers' own conversion)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import transformers
    from conftest import transformers_checkpoint_folder

    return transformers_checkpoint_folder(transformers, gguf)


def phase_transformers(work, gguf, prompts, ports=None):
    import torch

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    dt = load_dump_transformers()
    folder = transformers_folder(gguf)
    for name, (kind, dtype) in PORTS.items():
        if kind != "transformers" or (ports is not None and name not in ports):
            continue
        model = dt.load_model(folder, dtype)
        for i, ids in enumerate(prompts):
            out = work / slug(name) / str(i)
            if not (out / "manifest.json").is_file():
                write_dump(dt.record_dump(model, ids, include=INCLUDE, decode_steps=DECODE_STEPS, model_path=folder), out)
        del model
        gc.collect()
    if ports is not None and "qwen2np float32" not in ports:
        return
    model = Qwen2ForCausalLM.from_pretrained(folder)
    for i, ids in enumerate(prompts):
        out = work / slug("qwen2np float32") / str(i)
        if not (out / "manifest.json").is_file():
            write_dump(record_dump(model, ids, decode_steps=DECODE_STEPS, model_path=folder), out)


def llama_file(gguf, kind):
    if kind is None:
        return gguf
    spec = importlib.util.spec_from_file_location("dump_llama_cpp", ROOT / "scripts" / "dump_llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.requantized(gguf, kind)


def phase_mlx(work, gguf, prompts, ports):
    """mlx-lm (scripts/dump_mlx_lm.py), fused attention as mlx-lm runs, in this process."""
    spec = importlib.util.spec_from_file_location("dump_mlx_lm", ROOT / "scripts" / "dump_mlx_lm.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    folder = transformers_folder(gguf)
    for name in ports:
        kind, dtype = PORTS[name]
        if kind != "mlx":
            continue
        model, config = dm.load(folder, dtype)
        fingerprint = dm.weights_fingerprint(dm.port_weights(model))
        for i, ids in enumerate(prompts):
            out = work / slug(name) / str(i)
            if not (out / "manifest.json").is_file():
                dm.record_dump(model, config, ids, out, decode_steps=DECODE_STEPS, fingerprint=fingerprint,
                               model_path=folder)
        del model
        gc.collect()


def phase_keras(work, gguf, prompts, ports):
    """keras-hub (scripts/dump_keras_hub.py) in its own venv, one process per dump."""
    folder = transformers_folder(gguf)
    for name in ports:
        kind, dtype = PORTS[name]
        if kind != "keras":
            continue
        for i, ids in enumerate(prompts):
            out = work / slug(name) / str(i)
            if not (out / "manifest.json").is_file():
                subprocess.run([KERAS_PYTHON, str(ROOT / "scripts" / "dump_keras_hub.py"), "--model", str(folder),
                                "--ids", json.dumps(ids.tolist()), "--decode-steps", str(DECODE_STEPS), "--dtype",
                                dtype, "--out", str(out)], check=True)


def phase_llama(work, gguf, prompts, ports=None):
    for name, (kind, quant) in PORTS.items():
        if kind != "llama" or (ports is not None and name not in ports):
            continue
        for i, ids in enumerate(prompts):
            out = work / slug(name) / str(i)
            if (out / "manifest.json").is_file():
                continue
            command = [sys.executable, str(ROOT / "scripts" / "dump_llama_cpp.py"), "--model", str(gguf),
                       "--ids", json.dumps(ids.tolist()), "--decode-steps", str(DECODE_STEPS), "--out", str(out),
                       "--threads", "2"] + (["--requantize", quant] if quant else [])
            subprocess.run(command, check=True)


# -- analysis -------------------------------------------------------------------------------------------


def layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None


def compare_port(work, name, count):
    """{kind: {layer: (worst NMSE, worst cosine)}}, and the logits' per-prompt (KL, top-1, top-p)."""
    reference = "reference-Q8_0" if name == "llama.cpp Q8_0" else "reference"
    by_kind, logits = {}, []
    for i in range(count):
        c = compare_dumps(read_dump(work / slug(name) / str(i)), read_dump(work / reference / str(i)), policy="float32")
        for t in c.tensors:
            if kind_of(t.name) == "self_attn.mask":
                continue
            nmse = -400.0 if t.nmse_db is None else t.nmse_db
            cos = 1.0 if t.cosine is None else t.cosine
            slot = by_kind.setdefault(kind_of(t.name), {}).setdefault(str(layer_of(t.name)), [-1e9, 1.0])
            slot[0], slot[1] = max(slot[0], nmse), min(slot[1], cos)
            if t.name == "logits" and t.pass_index == 0:
                logits.append({"kl": t.kl, "top1": t.top1, "top_p": t.top_p, "rows": t.compared // t.shape[-1]})
    return by_kind, logits


def isolate_port(work, name, count, model):
    """{kind: worst {rel, nmse, off, beyond}} of the isolation of every dump of the port."""
    worst = {}
    policy = {"transformers bfloat16": "bfloat16", "transformers float16": "float16"}.get(name, "float32")
    for i in range(count):
        iso = isolate_dump(read_dump(work / slug(name) / str(i)), model, policy)
        for c in iso.checks:
            if c.ok is None:
                continue
            w = worst.setdefault(kind_of(c.name), {"rel": 0.0, "nmse": -400.0, "off": 0.0, "beyond": 0.0,
                                                   "max_ulps": 0.0})
            w["rel"] = max(w["rel"], c.rel)
            w["nmse"] = max(w["nmse"], -400.0 if c.nmse_db is None else c.nmse_db)
            for f in ("off", "beyond", "max_ulps"):
                if getattr(c, f) is not None:
                    w[f] = max(w[f], getattr(c, f))
    return worst


def phase_analyse(work, gguf, count, ports=None, isolate=True):
    results = {"compare": {}, "logits": {}, "isolate": {}}
    for name in ports or PORTS:
        results["compare"][name], results["logits"][name] = compare_port(work, name, count)
        print(f"compared {name}", file=sys.stderr, flush=True)
    if not isolate:
        (work / "results.json").write_text(json.dumps(results))
        print_tables(results)
        return
    model = Qwen2ForCausalLM.from_pretrained(gguf)
    for name in ports or PORTS:
        if name != "llama.cpp Q8_0":
            results["isolate"][name] = isolate_port(work, name, count, model)
            print(f"isolated {name}", file=sys.stderr, flush=True)
    del model
    gc.collect()
    if "llama.cpp Q8_0" in (ports or PORTS):    # its reference weights are the Q8_0 file's
        model = Qwen2ForCausalLM.from_pretrained(llama_file(gguf, "Q8_0"))
        results["isolate"]["llama.cpp Q8_0"] = isolate_port(work, "llama.cpp Q8_0", count, model)
    (work / "results.json").write_text(json.dumps(results))
    print_tables(results)


def band(layer, num_layers=24):
    """0: layer 0 (and the embedding, the RoPE tables); 1: the first quarter of the stack; 2: the rest."""
    if layer == "None" or layer is None:
        return None
    depth = int(layer) / (num_layers - 1)
    return 0 if depth == 0 else 1 if depth <= 0.25 else 2


NMSE_HEADROOM_DB = 6.0      # 4x the error energy, 2x its amplitude
COSINE_HEADROOM = 4.0       # 1 - cos scaled as the error energy


def budgets(per_layer):
    """{layer: [NMSE, cosine]} -> the (NMSE limits, cosine limits) per band, headroom included."""
    worst = [[-1e9, 1.0] for _ in range(3)]
    for layer, (nmse, cos) in per_layer.items():
        bands = [band(layer)] if band(layer) is not None else [0, 1, 2]
        for b in bands:
            worst[b][0], worst[b][1] = max(worst[b][0], nmse), min(worst[b][1], cos)
    nmse = tuple(None if w[0] <= -399 else round(w[0] + NMSE_HEADROOM_DB) for w in worst)
    cos = tuple(float(f"{1 - COSINE_HEADROOM * (1 - w[1]):.6f}") for w in worst)
    return nmse, cos


def print_tables(results):
    ports = list(results["compare"])
    kinds = list(results["compare"][ports[0]])
    header = "| kind | " + " | ".join(ports) + " |\n|" + "---|" * (len(ports) + 1)
    print("### Worst NMSE (dB) against the float64 reference: layer 0 / layers 1-5 / layers 6-23 (the bands of the policies)\n")
    print(header)
    for kind in kinds:
        cells = []
        for p in ports:
            layers = results["compare"][p].get(kind)
            if not layers:
                cells.append("—")
                continue
            bands = {}
            for layer, (nmse, _) in layers.items():
                b = band(layer)
                bands[b] = max(bands.get(b, -1e9), nmse)
            cells.append(" / ".join("exact" if bands[b] <= -399 else f"{bands[b]:.1f}" for b in sorted(bands, key=str)))
        print(f"| `{kind}` | " + " | ".join(cells) + " |")
    print("\n### Worst cosine similarity over all layers\n")
    print(header)
    for kind in kinds:
        cells = [f"{min(v[1] for v in results['compare'][p][kind].values()):.6f}" if results["compare"][p].get(kind)
                 else "—" for p in ports]
        print(f"| `{kind}` | " + " | ".join(cells) + " |")
    print("\n### Logits per prompt: mean KL (nats), top-1, top-p (0.9) agreement\n")
    for p in ports:
        figures = results["logits"][p]
        print(f"* {p}: KL max {max(f['kl'] for f in figures):.2e}, top-1 min {min(f['top1'] for f in figures):.3f}, "
              f"top-p min {min(f['top_p'] for f in figures):.3f} ({', '.join(str(f['rows']) for f in figures)} positions)")
    if results["isolate"]:
        print_isolation(results, ports, header)
    print("\n### Budgets derived (NMSE dB per band: layer 0, first quarter, rest; cosine likewise)\n")
    for policy, names in [("bfloat16", [p for p in ports if p.endswith("bfloat16")]),
                          ("float16", ["transformers float16"]), ("q8_0", ["llama.cpp Q8_0"]),
                          ("q4_k_m", ["llama.cpp Q4_K_M"])]:
        names = [n for n in names if n in results["compare"]]
        if not names:
            continue
        print(f"{policy} (the worst of {', '.join(names)}):")
        for kind in results["compare"][names[0]]:
            merged = {}
            for n in names:
                for layer, (nmse, cos) in results["compare"][n].get(kind, {}).items():
                    m = merged.setdefault(layer, [-1e9, 1.0])
                    m[0], m[1] = max(m[0], nmse), min(m[1], cos)
            print(f"    {kind!r}: {budgets(merged)},")
    print()
    print(json.dumps(results))


def print_isolation(results, ports, header):
    print("\n### Isolation: worst local error per kind (rel; half precision: share ≠ / share > 1 ulp)\n")
    print(header)
    for kind in results["isolate"][ports[0]]:
        cells = []
        for p in ports:
            w = results["isolate"][p].get(kind)
            if w is None:
                cells.append("—")
            elif "float16" in p or "bfloat16" in p:
                cells.append(f"{100 * w['off']:.2f}% / {100 * w['beyond']:.3f}%")
            else:
                cells.append(f"{w['rel']:.1e} ({w['nmse']:.0f} dB)")
        print(f"| `{kind}` | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="the folder for the dumps and results.json")
    parser.add_argument("--phases", nargs="+", default=["reference", "transformers", "llama", "analyse"],
                        choices=["reference", "transformers", "mlx", "keras", "llama", "analyse", "tables"])
    parser.add_argument("--length", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--prompt-set", choices=["default", "lengths"], default="default",
                        help="lengths: prose 96, code 128, Chinese 160 and a long text of 512 tokens")
    parser.add_argument("--ports", nargs="+", choices=list(PORTS), default=None,
                        help="the ports to dump and analyse (default: the seven of docs/tolerances.md's first table)")
    parser.add_argument("--reference-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--no-isolate", action="store_true", help="analyse: comparisons only")
    args = parser.parse_args(argv)
    gguf = test_checkpoint_path()
    prompts = prompt_ids(Qwen2Tokenizer.from_pretrained(gguf), args.length, args.prompt_set)
    if args.prompt_set == "lengths":
        INCLUDE[:] = [f"model.layers.*.{n}" for n in LAYER_NAMES if n != "self_attn.head_out"] + \
            ["model.embed_tokens", "model.rotary_emb.*", "model.layers.[0-9]", "model.layers.[0-9][0-9]",
             "model.norm", "logits"]
    ports = args.ports or [p for p in PORTS if PORTS[p][0] not in ("mlx", "keras")]
    for phase in args.phases:
        print(f"phase {phase}", file=sys.stderr, flush=True)
        if phase == "reference":
            phase_reference(args.work, gguf, prompts, args.reference_dtype,
                            quantized=any(PORTS[p] == ("llama", "Q8_0") for p in ports))
        elif phase == "transformers":
            phase_transformers(args.work, gguf, prompts, ports)
        elif phase == "mlx":
            phase_mlx(args.work, gguf, prompts, ports)
        elif phase == "keras":
            phase_keras(args.work, gguf, prompts, ports)
        elif phase == "llama":
            phase_llama(args.work, gguf, prompts, ports)
        elif phase == "analyse":
            phase_analyse(args.work, gguf, len(prompts), ports, isolate=not args.no_isolate)
        else:
            print_tables(json.loads((args.work / "results.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
