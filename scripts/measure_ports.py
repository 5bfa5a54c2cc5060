#!/usr/bin/env python
"""Real ports dumped from their own forward passes, clean and with planted mistakes, and judged: the table of
docs/porting.md ("Measured: three implementations nobody here wrote").

    python scripts/measure_ports.py --work DIR [--only LABEL ...] [--judge-only]

Each port is dumped by its adapter in its own interpreter (mlx-lm in this one; keras-hub and TransformerLens
in their venvs under /work/venvs/, KERAS_PYTHON and TLENS_PYTHON to change them), from transformers'
float32 folder of the test checkpoint (tests/conftest.py makes it), on a 26-token code prompt whose last 2
tokens are decode steps. qwen2np float32 on the test GGUF is the reference. Each dump is then judged as a
porter would: `compare` (its policy from the dump's dtype) and `compare --isolate` with today's engine,
printing the verdict, the first failure, the logits' KL, the root causes and how many operations were not
isolated. Dumps already in DIR are kept (delete one to redo it).

About 40 minutes on 2 shared cores (each keras-hub and TransformerLens dump 2-4 minutes, mostly loading).
"""

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from qwen2np import Qwen2ForCausalLM, Qwen2Tokenizer
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump, write_dump
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.record import record_dump
from qwen2np.golden.tolerances import kind_of
from qwen2np.io.fetch import test_checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
KERAS_PYTHON = os.environ.get("KERAS_PYTHON", "/work/venvs/keras-hub/bin/python")
TLENS_PYTHON = os.environ.get("TLENS_PYTHON", "/work/venvs/tlens/bin/python")
PROMPT = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\nprint(add(2, 3))\n'
DECODE_STEPS = 2
FOUR = ["eps", "rope-theta", "q-bias", "gqa-tile"]   # layers 0, 2, 4, 3 (the adapters' docstrings)

# label -> (framework, arguments of its adapter)
PORTS = {
    "mlx-lm float32 fused": ("mlx", {"dtype": "float32", "attention": "fused"}),
    "mlx-lm float32 eager": ("mlx", {"dtype": "float32", "attention": "eager"}),
    "mlx-lm bfloat16 fused": ("mlx", {"dtype": "bfloat16", "attention": "fused"}),
    "mlx-lm float32 eager, four mistakes": ("mlx", {"dtype": "float32", "attention": "eager", "plants": FOUR}),
    "mlx-lm float32 fused, GQA tiled": ("mlx", {"dtype": "float32", "attention": "fused", "plants": ["gqa-tile"]}),
    "keras-hub float32 fused": ("keras", ["--dtype", "float32"]),
    "keras-hub float32 eager": ("keras", ["--dtype", "float32", "--attention", "eager"]),
    "keras-hub bfloat16 fused": ("keras", ["--dtype", "bfloat16"]),
    "mlx-lm bfloat16 fused, eps outside the root": ("mlx", {"dtype": "bfloat16", "attention": "fused",
                                                            "plants": ["eps"]}),
    "keras-hub bfloat16 fused, eps outside the root": ("keras", ["--dtype", "bfloat16", "--plant", "eps"]),
    "keras-hub float32 fused, four mistakes": ("keras", ["--dtype", "float32", "--plant", *FOUR]),
    "keras-hub float32 eager, four mistakes": ("keras", ["--dtype", "float32", "--attention", "eager", "--plant", *FOUR]),
    "TransformerLens float32": ("tlens", []),
    "TransformerLens float32, theta and q bias": ("tlens", ["--plant", "rope-theta", "q-bias"]),
}


def slug(label):
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def transformers_folder(gguf):
    sys.path.insert(0, str(ROOT / "tests"))
    import transformers
    from conftest import transformers_checkpoint_folder

    return transformers_checkpoint_folder(transformers, gguf)


def dump_mlx(folder, ids, out, dtype, attention, plants=()):
    """In this process: mlx-lm's model with the mistakes of tests/support/mlx_bugs.py."""
    import contextlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("dump_mlx_lm", ROOT / "scripts" / "dump_mlx_lm.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    sys.path.insert(0, str(ROOT / "tests"))
    from support import mlx_bugs

    model, config = dm.load(folder, dtype)
    fingerprint = dm.weights_fingerprint(dm.port_weights(model))
    with contextlib.ExitStack() as stack:
        if "eps" in plants:
            stack.enter_context(mlx_bugs.eps_outside_the_root(model, 0))
        if "rope-theta" in plants:
            stack.enter_context(mlx_bugs.rope_theta(model, 2))
        if "q-bias" in plants:
            stack.enter_context(mlx_bugs.q_bias_forgotten(model, 4))
        if "gqa-tile" in plants:
            attention = (mlx_bugs.gqa_tiled_in(3, dm.eager_attention) if attention == "eager"
                         else mlx_bugs.fused_gqa_tiled(3))
        dm.record_dump(model, config, ids, out, decode_steps=DECODE_STEPS, fingerprint=fingerprint,
                       model_path=folder, attention=attention)
    del model
    gc.collect()


def dump(label, folder, ids, out):
    framework, arguments = PORTS[label]
    if framework == "mlx":
        return dump_mlx(folder, ids, out, **arguments)
    common = ["--model", str(folder), "--ids", json.dumps(ids), "--decode-steps", str(DECODE_STEPS), "--out", str(out)]
    if framework == "keras":
        command = [KERAS_PYTHON, str(ROOT / "scripts" / "dump_keras_hub.py"), *common, *arguments]
        env = {**os.environ, "KERAS_BACKEND": "jax"}
    else:
        command = [TLENS_PYTHON, str(ROOT / "scripts" / "dump_transformer_lens.py"), *common,
                   "--tokenizer", str(ROOT / "qwen2np" / "data" / "tokenizer"), *arguments]
        env = None
    subprocess.run(command, check=True, env=env)


def judge(path, reference, model):
    """compare and compare --isolate of one dump, as one paragraph."""
    port = read_dump(path)
    c = compare_dumps(port, reference)
    out = [f"compare ({c.policy.name}): " + ("ok" if c.ok else
           f"FAIL, first at {c.first_failure.name} ({sum(not t.ok for t in c.tensors)} tensors out)")]
    logits = [t for t in c.tensors if t.name == "logits" and t.kl is not None]
    if logits:
        out[-1] += f", logits KL {max(t.kl for t in logits):.1e}"
    iso = isolate_dump(port, model)
    causes = collections.Counter(kind_of(x.name) for x in iso.root_causes)
    out.append(f"isolate: {'ok' if iso.ok else f'{len(iso.root_causes)} root causes'}, "
               f"{sum(x.ok is not None for x in iso.checks)} operations isolated, {len(iso.not_isolated)} not")
    for name in sorted({x.name for x in iso.root_causes}):
        out.append(f"    {name} ({sum(x.name == name for x in iso.root_causes)} passes)")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--only", nargs="+", choices=list(PORTS), help="these ports only (default: all)")
    parser.add_argument("--judge-only", action="store_true", help="judge the dumps already in --work")
    args = parser.parse_args(argv)
    gguf = test_checkpoint_path()
    folder = transformers_folder(gguf)
    ids = [Qwen2Tokenizer.from_pretrained(gguf)(PROMPT)["input_ids"]]
    labels = args.only or list(PORTS)
    reference_path = args.work / "reference"
    if not (reference_path / "manifest.json").is_file():
        model = Qwen2ForCausalLM.from_pretrained(gguf)
        write_dump(record_dump(model, ids, decode_steps=DECODE_STEPS, model_path=gguf), reference_path)
        del model
    if not args.judge_only:
        for label in labels:
            out = args.work / slug(label)
            if not (out / "manifest.json").is_file():
                print(f"dumping {label}", file=sys.stderr, flush=True)
                dump(label, folder, ids, out)
    reference = read_dump(reference_path)
    model = Qwen2ForCausalLM.from_pretrained(gguf)
    for label in labels:
        if (args.work / slug(label) / "manifest.json").is_file():
            print(f"== {label}\n{judge(args.work / slug(label), reference, model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
