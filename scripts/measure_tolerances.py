#!/usr/bin/env python
"""Measure qwen2np against transformers 5.24.0 on a real checkpoint, per tensor kind: the numbers behind
docs/tolerances.md.

    python scripts/measure_tolerances.py --model FOLDER [--dtype float32|float64] [--lengths 1 8 64 256]

For each prompt length (cuts of one code-and-prose text), plus a left-padded batch of two and a prefill
followed by decode steps, it dumps every intermediate from both sides in memory and compares them. It
prints, per kind, the worst `rel` error seen (with where), the policy's tolerance and the headroom, as
Markdown, and one JSON line with the raw figures. float64 runs qwen2np float64 against transformers
float64 with its float32 islands lifted (`--float64-everywhere`) and also against stock float64.
One model is in memory at a time (float64 is 5 GB per model for the 0.5B checkpoint).
"""

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from qwen2np import Qwen2ForCausalLM, Qwen2Tokenizer
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.record import record_dump
from qwen2np.golden.tolerances import TOLERANCES, kind_of

TEXT = (
    'def quicksort(items):\n    """Sort a list with the quicksort algorithm."""\n    if len(items) <= 1:\n'
    "        return items\n    pivot = items[len(items) // 2]\n    left = [x for x in items if x < pivot]\n"
    "    middle = [x for x in items if x == pivot]\n    right = [x for x in items if x > pivot]\n"
    "    return quicksort(left) + middle + quicksort(right)\n\n"
    "The quicksort algorithm picks a pivot, splits the list around it and sorts both halves recursively. "
    "Its average running time is O(n log n); a bad pivot makes it quadratic. Quicksort est un algorithme de "
    "tri rapide; 快速排序是一种分而治之的排序算法。 In practice it is fast because its inner loop is simple and "
    "it works in place, which is kind to caches. Merge sort, by contrast, needs extra memory but is stable. "
)


def load_dump_transformers():
    spec = importlib.util.spec_from_file_location("dump_transformers", Path(__file__).with_name("dump_transformers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(tokenizer, lengths):
    """(label, input_ids, attention_mask, decode_steps)."""
    ids = tokenizer(TEXT * 8)["input_ids"]
    out = [(f"T={n}", np.array([ids[:n]]), None, 0) for n in lengths]
    out.append(("T=24, 4 decode steps", np.array([ids[:24]]), None, 4))
    batch = tokenizer([TEXT[:60], TEXT[:200]], padding=True, padding_side="left", return_tensors="np")
    out.append(("left-padded batch of 2", batch["input_ids"], batch["attention_mask"], 0))
    return out


def record_all(side, model, cases_, float64_all=False, include=("*",)):
    dumps = {}
    for label, ids, mask, steps in cases_:
        if side == "qwen2np":
            dumps[label] = record_dump(model, ids, mask, include, decode_steps=steps, fingerprint=None)
        else:
            dumps[label] = side.record_dump(model, ids, mask, include, decode_steps=steps, fingerprint=None,
                                            float64_all=float64_all)
    return dumps


def worst_by_kind(ours, theirs):
    """kind -> (worst finite rel, where, cases where the error is not finite), over every case, tensor and pass."""
    worst = {}
    for label in ours:
        for t in compare_dumps(ours[label], theirs[label]).tensors:
            rel, where, broken = worst.get(kind_of(t.name), (0.0, "—", []))
            if not np.isfinite(t.rel):
                broken = broken + [label] if label not in broken else broken
            elif t.rel >= rel:
                rel, where = t.rel, f"{t.key} ({label})"
            worst[kind_of(t.name)] = (rel, where, broken)
    return worst


def table(worst, dtype, title):
    lines = [f"### {title}", "", "| kind | worst rel | where | tolerance | headroom |", "|---|---|---|---|---|"]
    broken = sorted({label for _, _, b in worst.values() for label in b})
    for kind, (rel, where, _) in worst.items():
        tol = TOLERANCES[dtype].get(kind, TOLERANCES[dtype]["*"])
        headroom = "—" if rel == 0 else f"{tol / rel:.0f}×" if tol else "exact"
        lines.append(f"| `{kind}` | {rel:.2e} | {where} | {tol:.0e} | {headroom} |")
    if broken:
        lines.append(f"\nNot finite (left out above) in: {', '.join(broken)}")
    return "\n".join(lines)


def logits_only(dumps):
    return {label: d["logits"] for label, d in dumps.items()}


def logits_table(reference, others):
    """Max |logits - reference| per case, for each of `others` {title: {case: logits}}."""
    labels = list(reference)
    lines = ["### max abs logits difference from transformers float64 with its float32 islands lifted", "",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for title, logits in others.items():
        cells = [f"{float(np.abs(logits[k].astype(np.float64) - reference[k]).max()):.2e}" for k in labels]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder (e.g. transformers' conversion of the GGUF)")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer (folder or .gguf)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 8, 64, 256])
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    dt = load_dump_transformers()
    todo = cases(Qwen2Tokenizer.from_pretrained(args.tokenizer), args.lengths)

    model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    ours = record_all("qwen2np", model, todo)
    del model
    gc.collect()
    hf = dt.load_model(args.model, args.dtype)
    results, logits = {}, {}
    if args.dtype == "float64":
        lifted = record_all(dt, hf, todo, True)
        results["transformers float64, float32 islands lifted"] = worst_by_kind(ours, lifted)
        logits["reference"] = logits_only(lifted)
        del lifted
    theirs = record_all(dt, hf, todo)
    results[f"transformers {args.dtype}"] = worst_by_kind(ours, theirs)
    for title, worst in results.items():
        print(table(worst, args.dtype, f"qwen2np {args.dtype} vs {title}"), end="\n\n", flush=True)
    figures = {title: {k: v[0] for k, v in w.items()} for title, w in results.items()}
    if args.dtype == "float64":   # how far each kind of run is from the float64 reference, on the logits
        logits["qwen2np float64"], logits["transformers float64 (stock)"] = logits_only(ours), logits_only(theirs)
        del ours, theirs, hf
        gc.collect()
        hf32 = dt.load_model(args.model, "float32")
        logits["transformers float32"] = logits_only(record_all(dt, hf32, todo, include=["logits"]))
        del hf32
        gc.collect()
        model = Qwen2ForCausalLM.from_pretrained(args.model, dtype="float32")
        logits["qwen2np float32"] = logits_only(record_all("qwen2np", model, todo, include=["logits"]))
        reference = logits.pop("reference")
        print(logits_table(reference, logits), end="\n\n")
        figures["logits max abs vs reference"] = {
            title: {k: float(np.abs(v[k].astype(np.float64) - reference[k]).max()) for k in reference}
            for title, v in logits.items()}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
