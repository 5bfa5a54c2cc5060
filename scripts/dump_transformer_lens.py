#!/usr/bin/env python
"""TransformerLens 3.9's HookedTransformer (torch 2.13.0 CPU, transformers 5.24.0) dumped from its own forward pass.

    /work/venvs/tlens/bin/python scripts/dump_transformer_lens.py --model HF_FOLDER --ids "[[...]]" --out DIR
        [--decode-steps N] [--tokenizer FOLDER] [--plant BUG ...]

In a venv of its own (TransformerLens pins its own dependencies); NumPy, torch and
scripts/qwen2_dump_writer.py only (no qwen2np). The model is `HookedTransformer.from_pretrained_no_processing`
of the local folder (TransformerLens reads a directory with a config.json), with the transformers model
loaded from it passed as `hf_model`, in float32, with no LayerNorm folding and no centring (those change
every intermediate). TransformerLens loads a tokenizer from the same folder: `--tokenizer` names a folder
with vocab.json, merges.txt and tokenizer_config.json (qwen2np/data/tokenizer has them), linked beside the
checkpoint's files in a temporary folder.

Hook points give every name (docs/porting.md has the table); the layouts the adapter changes:
[B, T, heads, HD] (hook_q/k/v, hook_z) merged to [B, T, heads·HD]; hook_rot_q/k moved to [B, heads, T, HD].
TransformerLens caches keys *before* RoPE and rotates every cached key again at each pass, so hook_rot_k
holds all S positions: its last T are `k_rope`. `hook_attn_scores` is recorded as TransformerLens gives it,
**masked** (−inf above the diagonal), where qwen2np's `scores` are before the mask: a convention, which
`compare` reports as a failure of `scores` today (docs/porting.md).

Planted bugs (`--plant`): `rope-theta` (the rotary tables of block 2 rebuilt with θ = 10000), `q-bias`
(block 4's b_Q zeroed for the run: the fingerprint keeps the checkpoint's, as a port that forgets to add it).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_dump_writer import DumpWriter  # noqa: E402

import transformer_lens  # noqa: E402
import transformer_lens.loading_from_pretrained  # noqa: E402
import transformers  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: E402


def with_tokenizer(folder, tokenizer, tmp):
    """A folder with the checkpoint's files and the tokenizer's, as symbolic links (config.json rewritten)."""
    view = Path(tmp) / "model"
    view.mkdir()
    # subtle: a folder saved by transformers from a GGUF keeps `quantization_config: gguf` in its config,
    # though its weights are plain float32; TransformerLens refuses any quantized checkpoint, so the view's
    # config.json drops it
    config = json.loads((Path(folder) / "config.json").read_text())
    config.pop("quantization_config", None)
    (view / "config.json").write_text(json.dumps(config))
    for source in [*Path(folder).iterdir(), *Path(tokenizer).iterdir()]:
        if source.is_file() and not (view / source.name).exists():
            os.symlink(source.resolve(), view / source.name)
    return view


def load(folder, tokenizer, tmp):
    view = with_tokenizer(folder, tokenizer, tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32)
    # subtle: from_pretrained asks for an official model name before it looks at the path, though the
    # config loader it calls next reads local folders: the check is bypassed for a folder that exists
    official = transformer_lens.loading_from_pretrained.get_official_model_name
    transformer_lens.loading_from_pretrained.get_official_model_name = lambda name: (
        name if Path(name).is_dir() else official(name))
    model = HookedTransformer.from_pretrained_no_processing(str(view), hf_model=hf, dtype=torch.float32,
                                                            device="cpu", default_prepend_bos=False)
    weights = {n: t.detach().float().numpy().copy() for n, t in hf.state_dict().items()}
    del hf
    return model.eval(), json.loads((Path(folder) / "config.json").read_text()), weights


def numpy(t):
    return t.detach().float().cpu().numpy()


def hooks(model, record, T_of_pass):
    """(hook name, function) for every intermediate."""
    merge = lambda x: x.reshape(*x.shape[:2], -1)             # [B, T, heads, HD] -> [B, T, heads·HD]
    heads_first = lambda x: x.transpose(1, 2)                 # [B, T, heads, HD] -> [B, heads, T, HD]

    def at(name, change=lambda x: x):
        def hook(x, hook):
            record(name, numpy(change(x)))
        return hook

    out = [("hook_embed", at("model.embed_tokens"))]
    for l in range(model.cfg.n_layers):
        s, b = f"model.layers.{l}", f"blocks.{l}"
        out += [
            (f"{b}.ln1.hook_normalized", None),   # placeholder: the norm's output is taken by a module hook
            (f"{b}.attn.hook_q", at(f"{s}.self_attn.q_proj", merge)),
            (f"{b}.attn.hook_k", at(f"{s}.self_attn.k_proj", merge)),
            (f"{b}.attn.hook_v", at(f"{s}.self_attn.v_proj", merge)),
            (f"{b}.attn.hook_rot_q", at(f"{s}.self_attn.q_rope", heads_first)),
            # subtle: keys are cached before RoPE and all S are rotated again: the new ones are the last T
            (f"{b}.attn.hook_rot_k", at(f"{s}.self_attn.k_rope", lambda x: heads_first(x[:, -T_of_pass():]))),
            (f"{b}.attn.hook_attn_scores", at(f"{s}.self_attn.scores")),
            (f"{b}.attn.hook_pattern", at(f"{s}.self_attn.probs")),
            (f"{b}.attn.hook_z", at(f"{s}.self_attn.context", merge)),
            (f"{b}.hook_attn_out", at(f"{s}.self_attn.o_proj")),
            (f"{b}.hook_resid_mid", at(f"{s}.resid_mid")),
            (f"{b}.mlp.hook_pre", at(f"{s}.mlp.gate_proj")),
            (f"{b}.mlp.hook_pre_linear", at(f"{s}.mlp.up_proj")),
            (f"{b}.mlp.hook_post", at(f"{s}.mlp.act_up")),
            (f"{b}.hook_mlp_out", at(f"{s}.mlp.down_proj")),
            (f"{b}.hook_resid_post", at(s)),
        ]
    return [(n, f) for n, f in out if f is not None]


def module_hooks(model, record, seen):
    """The norms' outputs (after the weight), which no hook point holds. `seen`: the names recorded in this
    pass (TransformerLens calls ln1 three times, on the query, key and value inputs: the first is kept)."""
    handles = []

    def once(name, y):
        if name not in seen:
            seen.add(name)
            record(name, numpy(y))

    for l, block in enumerate(model.blocks):
        s = f"model.layers.{l}"
        handles.append(block.ln1.register_forward_hook(lambda m, a, y, s=s: once(f"{s}.input_layernorm", y)))
        handles.append(block.ln2.register_forward_hook(
            lambda m, a, y, s=s: record(f"{s}.post_attention_layernorm", numpy(y))))
    handles.append(model.ln_final.register_forward_hook(lambda m, a, y: record("model.norm", numpy(y))))
    return handles


def plant(model, bug):
    """A planted mistake; returns a function that undoes it."""
    if bug == "rope-theta":
        attn = model.blocks[2].attn
        sin, cos = attn.calculate_sin_cos_rotary(attn.cfg.rotary_dim, attn.rotary_sin.shape[0], base=10000,
                                                 dtype=attn.rotary_sin.dtype)
        saved = attn.rotary_sin.clone(), attn.rotary_cos.clone()
        attn.rotary_sin.copy_(sin), attn.rotary_cos.copy_(cos)
        return lambda: (attn.rotary_sin.copy_(saved[0]), attn.rotary_cos.copy_(saved[1]))
    if bug == "q-bias":
        attn = model.blocks[4].attn
        saved = attn.b_Q.detach().clone()
        with torch.no_grad():
            attn.b_Q.zero_()
        return lambda: attn.b_Q.data.copy_(saved)
    raise ValueError(f"--plant {bug!r}: expected rope-theta or q-bias")


def record_dump(model, config, weights, input_ids, out, decode_steps=0, plants=(), model_path=None, overwrite=False):
    ids = torch.tensor(np.asarray(input_ids, dtype=np.int64))
    B, N = ids.shape
    prefill = N - decode_steps
    plan = [(0, prefill)] + [(t, 1) for t in range(prefill, N)]
    undo = [plant(model, bug) for bug in plants]
    current = {}
    versions = {"transformer-lens": transformer_lens.__version__ if hasattr(transformer_lens, "__version__") else "3.9",
                "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    try:
        with torch.no_grad(), DumpWriter(out, producer="TransformerLens (scripts/dump_transformer_lens.py)",
                                         dtype="float32", input_ids=ids.numpy(), config=config, weights=weights,
                                         versions=versions, options={"decode_steps": decode_steps,
                                                                     "plants": list(plants), "cache": "before RoPE"},
                                         model_path=None if model_path is None else str(model_path),
                                         overwrite=overwrite) as writer:
            seen = set()
            handles = module_hooks(model, writer, seen)
            try:
                cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, B)
                for start, length in plan:
                    writer.new_pass(start, length)
                    seen.clear()
                    current["T"] = length
                    logits = model.run_with_hooks(ids[:, start:start + length], past_kv_cache=cache,
                                                  fwd_hooks=hooks(model, writer, lambda: current["T"]))
                    writer("logits", numpy(logits))
            finally:
                for h in handles:
                    h.remove()
    finally:
        for u in reversed(undo):
            u()
    return Path(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--decode-steps", type=int, default=0)
    parser.add_argument("--plant", nargs="*", default=[])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model, config, weights = load(args.model, args.tokenizer, tmp)
        record_dump(model, config, weights, json.loads(args.ids), args.out, args.decode_steps, args.plant,
                    model_path=args.model, overwrite=args.overwrite)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
