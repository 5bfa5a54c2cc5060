#!/usr/bin/env python
"""One AdamW step on every parameter of a checkpoint, in a process of its own: the loss before and after.

    $ python scripts/finetune_step.py --model test --text "$(cat fibonacci.py)" --held-out "$(cat factorial.py)"
    {"loss_before": 0.4717..., "loss_after": 0.1523..., "held_out_before": 1.0213..., "held_out_after": 0.7923...,
     "parameters": 630167424, "tensors": 291, "gradient_plan": "gradients 2.52 GB; every layer keeps its
     activations ...", "load_seconds": 10.5, "seconds": 33.8, "peak_rss_bytes": 5468336128}

(one line; the texts are notebook 6's, the figures those of the 2-core development machine under load.)
Notebook 6 adds `--max-memory 6GB`, so that the plan does not depend on what the machine has free.

It loads `--model` as the command line does (a Hugging Face folder, a .gguf file, `test` or a hub id; in
float32 within the default memory budget unless --dtype / --max-memory say otherwise), computes the
causal-LM loss of the text (labels = its ids) and the gradient of every parameter with
`qwen2np.value_and_grad`, takes one step of `qwen2np.AdamW` (torch.optim.AdamW's update) on all of them,
and computes the loss of the same text again. It prints one JSON line: `loss_before`, `loss_after` (and
`held_out_before` / `held_out_after` with --held-out, another text's loss, which the step did not see),
`parameters` and `tensors` updated, `load_seconds` and `seconds` (the step: forward, backward, update,
forward), `peak_rss_bytes` (VmHWM, this process's largest resident set) and `gradient_plan`.

Why a process of its own: a full AdamW step in float32 holds the weights (2.52 GB for the test checkpoint,
630 M parameters: its GGUF file stores lm_head apart from the embedding), their gradients (2.52 GB) and
two moments per weight (5.04 GB). Here each tensor is updated in turn, the largest last, and its moments
are let go once it is updated: one step never reads them again, so the step costs the weights and the
gradients plus one tensor's moments (a peak of 5.1 GiB), and the update is bit for bit the same as
`AdamW.step(grads)` on all of them at once (tests/grad/test_finetune_step.py). That is still more than a
notebook's kernel may hold (4 GB, notebooks/README.md); when the process ends, all of it is returned. A
second step would need the moments kept: 5 GB more.

A script rather than a `qwen2np` subcommand: the subcommands are tools that leave something behind (text,
a dump, a converted folder, a verdict); this is a measurement that throws its step away, the size of a
fine-tuning step on this machine, for notebooks/06_training.ipynb and for anyone sizing one.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2np import AdamW, Qwen2ForCausalLM, Qwen2Tokenizer, value_and_grad  # noqa: E402
from qwen2np.cli.common import memory_size  # noqa: E402
from qwen2np.cli.dump import parse_ids  # noqa: E402
from qwen2np.io.hub import resolve_model_path  # noqa: E402


def finetune_step(model, input_ids, lr=1e-5, weight_decay=0.0, held_out_ids=None):
    """One AdamW step on every parameter of `model` (updated in place), on the causal-LM loss of
    `input_ids` [B, T]; a dict of the losses before and after, what was updated, and the gradient plan."""
    held_out = {}
    if held_out_ids is not None:
        held_out["held_out_before"] = float(model(held_out_ids, labels=held_out_ids).loss)
    opt = AdamW(model, lr=lr, weight_decay=weight_decay)     # weights read from the file: copied, writable
    before, grads = value_and_grad(model, input_ids, labels=input_ids)   # {name: dL/dθ}, every parameter
    updated = {"parameters": int(sum(g.size for g in grads.values())), "tensors": len(grads),
               "gradient_plan": grads.plan.description}
    for name in sorted(grads, key=lambda n: grads[n].size):   # the largest last, when the other gradients are gone
        opt.step({name: grads.pop(name)})   # the same update as opt.step(grads): tensors are independent
        del opt.state[name]                 # its moments: one step never reads them again
    after = float(model(input_ids, labels=input_ids).loss)
    if held_out_ids is not None:
        held_out["held_out_after"] = float(model(held_out_ids, labels=held_out_ids).loss)
    return {"loss_before": float(before), "loss_after": after, **held_out, **updated}


def peak_rss_bytes():
    """VmHWM of /proc/self/status: the largest resident set this process has had (Linux; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024         # kB
    except OSError:
        pass
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test", metavar="PATH",
                        help="a Hugging Face folder, a .gguf file, `test` (the fetched test checkpoint) or a hub id")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to train on (tokenized by the checkpoint's tokenizer)")
    text.add_argument("--ids", help="token ids to train on instead: 1,2,3 or JSON [[1, 2], [3, 4]]")
    parser.add_argument("--held-out", metavar="TEXT", help="another text (or, with --ids, ids): its loss before and after")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW's learning rate (default 1e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's weight decay (default 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                        help="the model's memory budget, e.g. 6GB (default: what the machine has available)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    path = resolve_model_path(args.model)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=args.dtype, max_memory=args.max_memory)
    if args.ids is not None:
        ids = parse_ids(args.ids)
        held_out = None if args.held_out is None else parse_ids(args.held_out, "--held-out")
    else:
        tokenizer = Qwen2Tokenizer.from_pretrained(path)
        ids = tokenizer(args.text, return_tensors="np")["input_ids"]
        held_out = None if args.held_out is None else tokenizer(args.held_out, return_tensors="np")["input_ids"]
    loaded = time.perf_counter()
    result = finetune_step(model, ids, args.lr, args.weight_decay, held_out)
    result["load_seconds"] = round(loaded - started, 2)
    result["seconds"] = round(time.perf_counter() - loaded, 2)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
