#!/usr/bin/env python
"""Measure qwen2np's gradients against torch autograd through transformers 5.24.0 on the real checkpoint,
per tensor kind: the numbers behind the gradient rows of docs/tolerances.md and docs/gradients.md.

    python scripts/measure_grad_tolerances.py [--dtype float32|float64] [--layers N] [--lengths 8 64 128] [--json]

Both sides hold the same weights (qwen2np's arrays are views of transformers' tensors: one copy in
memory), transformers' own float32 conversion of the test GGUF, made once and cached beside it as the
tests do. For each case (the text of scripts/measure_tolerances.py cut at each length, and a left-padded
batch of two prompts) both sides run the causal-LM loss with labels = the input ids (-100 at the padding)
and its backward pass, as `dump --grad` does; the gradients of every intermediate of every layer, and of
the parameters of the first, middle and last layers, the final norm and lm_head, are compared tensor by
tensor with `qwen2np compare`'s metrics. It prints, per kind, the worst `rel` and where, with the
gradient policy's tolerance and the headroom, as Markdown; with --json, one JSON line instead.

float64 compares with transformers float64 with its four float32 islands lifted (dump_transformers.py
--float64-everywhere: RMSNorm, softmax, RoPE and the loss). The whole model in float64 is 5 GB per side
before any gradient; `--layers N` keeps the real checkpoint's first N layers (with its embedding, final
norm and head), which is what the tests run (tests/grad/test_grad_oracle.py, with --no-head-weight).
Measured peaks on the development machine: float32, 24 layers, lengths 8 64 128: 6.1 GB, 8 minutes on a
busy 2-core machine; float64, 4 layers: 8.6 GB (the float64 lm_head gradient held by both sides), 4 minutes.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer, value_and_grad  # noqa: E402
from qwen2np.cli.dump import gradient_labels  # noqa: E402
from qwen2np.golden.compare import compare_dumps  # noqa: E402
from qwen2np.golden.record import record_gradient_dump  # noqa: E402
from qwen2np.golden.tolerances import TOLERANCES, kind_of, tolerance_for  # noqa: E402
from qwen2np.inspection.names import gradient_names, intermediate_names  # noqa: E402


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def twins(folder, dtype, layers):
    """transformers' Qwen2ForCausalLM from `folder` (eager attention, the first `layers` layers when given)
    in `dtype`, and the qwen2np model holding the very same arrays."""
    import torch
    import transformers

    kw = {}
    if layers is not None:      # the first layers, and their types (the saved config lists all 24)
        types = getattr(transformers.AutoConfig.from_pretrained(folder), "layer_types", None)
        kw = {"num_hidden_layers": layers, **({"layer_types": types[:layers]} if types else {})}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                           **kw).eval()
    if dtype == "float64":
        hf = hf.to(torch.float64)
    config = Qwen2Config.from_dict(hf.config.to_dict())
    params = {n: t.detach().numpy() for n, t in hf.state_dict().items()}    # views: no second copy
    params = Qwen2ForCausalLM._params_from_checkpoint(config, params, {}, str(folder))
    return hf, Qwen2ForCausalLM._from_params(config, params, dtype)


def cases(tokenizer, lengths):
    ids = tokenizer(load_script("measure_tolerances").TEXT * 4)["input_ids"]
    out = [(f"T={n}", np.array([ids[:n]]), None) for n in lengths]
    text = load_script("measure_tolerances").TEXT
    batch = tokenizer([text[:60], text[:150]], padding=True, padding_side="left", return_tensors="np")
    out.append(("left-padded batch of 2", np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])))
    return out


def include(num_layers, parameters, head=True):
    """Exact names: every intermediate's gradient, and the gradients of the parameters of the first, middle
    and last layers, the final norm and (with `head`) lm_head. The embedding's [V, D] gradient is left out
    (0.5 GB a side in float32; its rows are the embedding output's gradient, `model.embed_tokens.grad`,
    summed per token); so is lm_head's without `head` (it is `logits.grad`ᵀ · `model.norm`, both compared)."""
    chosen = {0, num_layers // 2, num_layers - 1}
    params = [n for n in parameters if any(n.startswith(f"model.layers.{i}.") for i in chosen)]
    params += [n for n in ("model.norm.weight", "lm_head.weight") if n in parameters and (head or n != "lm_head.weight")]
    return gradient_names(intermediate_names(num_layers)) + [f"{n}.grad" for n in params]


def measure(hf, model, dt, todo, dtype, head=True):
    """kind -> (worst rel, where), and the losses of each case."""
    patterns = include(model.config.num_hidden_layers, list(model.params), head)

    def backward(m, ids, mask, params):   # a budget of its own: the machine's free memory varies with others' jobs
        return value_and_grad(m, ids, labels=gradient_labels(ids, mask), attention_mask=mask, params=params,
                              max_memory="16GB")

    worst, losses = {}, {}

    def note(name, rel, label):
        kind = kind_of(name)
        if not rel <= worst.get(kind, (-1.0, ""))[0]:
            worst[kind] = (rel, f"{name} ({label})")

    for label, ids, mask in todo:
        ours = record_gradient_dump(model, ids, mask, patterns, backward, fingerprint=None)
        theirs = dt.record_grad_dump(hf, ids, mask, patterns, fingerprint=None, float64_all=dtype == "float64")
        losses[label] = (ours.manifest["options"]["grad"]["loss"], theirs.manifest["options"]["grad"]["loss"])
        for name in [n for n in ours.names() if ours[n].size > BIG]:   # lm_head's [V, D]: in blocks of rows
            note(name, blockwise_rel(ours[name], theirs[name]), label)
            for d in (ours, theirs):
                del d.tensors[name]
                d.passes[0]["tensors"] = [t for t in d.passes[0]["tensors"] if t["name"] != name]
        for t in compare_dumps(ours, theirs).tensors:
            note(t.name, t.rel, label)
        del ours, theirs
    return worst, losses


BIG = 2**24   # elements: compare's float64 copies of a bigger tensor would take gigabytes


def blockwise_rel(a, b, rows=4096):
    """`rel` = max |a − b| / max(max |a|, max |b|) (docs/tolerances.md), a block of rows at a time."""
    err = scale = 0.0
    for r0 in range(0, a.shape[0], rows):
        x, y = a[r0:r0 + rows].astype(np.float64), b[r0:r0 + rows].astype(np.float64)
        err, scale = max(err, float(np.abs(x - y).max())), max(scale, float(np.abs(x).max()), float(np.abs(y).max()))
    return err / scale if err else 0.0


def table(worst, dtype):
    lines = ["| kind | worst rel | where | tolerance | headroom |", "|---|---|---|---|---|"]
    for kind, (rel, where) in worst.items():
        tol = tolerance_for(kind, dtype)
        headroom = "—" if rel == 0 else f"{tol / rel:.0f}×"
        lines.append(f"| `{kind}` | {rel:.2e} | {where} | {tol:.0e} | {headroom} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a transformers float32 folder (default: its conversion of the test GGUF)")
    parser.add_argument("--tokenizer", help="a tokenizer (default: the test GGUF's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--layers", type=int, help="keep the first N layers (with the embedding, norm and head)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--no-head-weight", action="store_true",
                        help="leave lm_head.weight's gradient out (1.1 GB a side in float64)")
    parser.add_argument("--json", action="store_true", help="print one JSON line: {kind: worst rel}, and the losses")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    from qwen2np.io.fetch import test_checkpoint_path

    gguf = test_checkpoint_path()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import transformers_checkpoint_folder

    folder = Path(args.model) if args.model else transformers_checkpoint_folder(transformers, gguf)
    tokenizer = Qwen2Tokenizer.from_pretrained(args.tokenizer or gguf)
    hf, model = twins(folder, args.dtype, args.layers)
    worst, losses = measure(hf, model, load_script("dump_transformers"), cases(tokenizer, args.lengths), args.dtype,
                            head=not args.no_head_weight)
    if args.json:
        print(json.dumps({"dtype": args.dtype, "layers": model.config.num_hidden_layers,
                          "worst": {k: v[0] for k, v in worst.items()}, "losses": losses}))
        return
    title = f"qwen2np {args.dtype} vs torch autograd (transformers 5.24.0" + \
        (", float32 islands lifted)" if args.dtype == "float64" else ")") + \
        f", {model.config.num_hidden_layers} layers, lengths {args.lengths} and a padded batch"
    print(f"### {title}\n\n{table(worst, args.dtype)}\n")
    print("losses (qwen2np, transformers):", {k: (f"{a:.9g}", f"{b:.9g}") for k, (a, b) in losses.items()})


if __name__ == "__main__":
    main()
