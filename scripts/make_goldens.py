"""Make the golden fixtures of tests/model/test_model_golden.py with the oracle: transformers 5.24.0.

For each case: a tiny random Qwen2 checkpoint (a Hugging Face folder, saved by transformers itself) and
what transformers computes on fixed inputs: logits, hidden states, attentions, losses, the KV cache, and
logits of incremental decode steps. All in float32, eager attention, on the CPU.

    pip install torch==2.13.0 'qwen2np[oracle]'
    python scripts/make_goldens.py            # rewrites tests/fixtures/golden/

The weights are drawn wider than transformers' init (std 0.02, zero biases, unit norms) so that biases,
norm weights and attention patterns all matter: a bug in any of them shows in the logits.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

assert transformers.__version__ == "5.24.0", f"the goldens come from transformers 5.24.0, not {transformers.__version__}"
assert torch.__version__.split("+")[0] == "2.13.0", f"the goldens come from torch 2.13.0, not {torch.__version__}"

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)

# name -> (head class, config overrides, input settings)
CASES = {
    "causal_kv_group2": ("Qwen2ForCausalLM", {}, {}),
    "causal_kv_group1_tied": ("Qwen2ForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}, {}),
    "causal_kv_group7": ("Qwen2ForCausalLM", {"hidden_size": 56, "num_attention_heads": 7,
                                               "num_key_value_heads": 1}, {}),
    "causal_head_dim_16": ("Qwen2ForCausalLM", {"head_dim": 16}, {}),
    "causal_sliding_window": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4,
                                                    "max_window_layers": 1}, {"T": 14}),
    "causal_all_sliding": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5,
                                                 "max_window_layers": 0, "num_hidden_layers": 2}, {"T": 14}),
    "rope_theta_1e6": ("Qwen2ForCausalLM", {"rope_theta": 1e6}, {}),
    "rope_linear": ("Qwen2ForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}}, {}),
    "rope_dynamic": ("Qwen2ForCausalLM", {"max_position_embeddings": 8,
                                          "rope_scaling": {"type": "dynamic", "factor": 2.0}}, {"T": 14}),
    "rope_yarn": ("Qwen2ForCausalLM", {"max_position_embeddings": 32, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}, {"T": 14}),
    "generate_positions": ("Qwen2ForCausalLM", {}, {"positions_from_mask": True}),
    "packed_sequences": ("Qwen2ForCausalLM", {}, {"packed": True}),
    "bare_model": ("Qwen2Model", {}, {}),
    "seqcls_single_label": ("Qwen2ForSequenceClassification", {"num_labels": 3}, {"labels": "class"}),
    "seqcls_regression": ("Qwen2ForSequenceClassification", {"num_labels": 1}, {"labels": "float"}),
    "seqcls_multi_label": ("Qwen2ForSequenceClassification", {"num_labels": 4}, {"labels": "multi"}),
    "tokcls": ("Qwen2ForTokenClassification", {"num_labels": 5}, {"labels": "token"}),
}

B = 3
DECODE_STEPS = 3


def widen_weights(model, gen):
    """Draw every weight wider than the default init so that each one matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def make_inputs(config, settings, gen):
    T = settings.get("T", 10)
    ids = torch.randint(3, config.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0          # left padding
    mask[2, :T - 3] = 0      # mostly padding
    ids[mask == 0] = config.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if settings.get("positions_from_mask"):  # as generate() computes them
        pos = mask.cumsum(-1) - 1
        inputs["position_ids"] = pos.masked_fill(mask == 0, 0)
    if settings.get("packed"):  # two sequences per row, positions restart, no mask
        inputs = {"input_ids": ids, "position_ids": torch.tensor([list(range(4)) + list(range(T - 4))] * B)}
    kind = settings.get("labels", "causal")
    if kind == "causal":
        labels = ids.clone()
        labels[mask == 0] = -100
    elif kind == "class":
        labels = torch.randint(0, config.num_labels, (B,), generator=gen)
    elif kind == "float":
        labels = torch.randn(B, generator=gen)
    elif kind == "multi":
        labels = torch.randint(0, 2, (B, config.num_labels), generator=gen).float()
    else:  # token
        labels = torch.randint(0, config.num_labels, (B, T), generator=gen)
        labels[mask == 0] = -100
    inputs["labels"] = labels
    return inputs


def run_case(name, head, overrides, settings, seed):
    gen = torch.Generator().manual_seed(seed)
    config = transformers.Qwen2Config(**{**BASE, **overrides})
    model = getattr(transformers, head)._from_config(config, attn_implementation="eager").eval()
    widen_weights(model, gen)
    inputs = make_inputs(config, settings, gen)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)

    kwargs = dict(inputs)
    if head == "Qwen2Model":
        kwargs.pop("labels")
    use_cache = not settings.get("packed") and head != "Qwen2ForTokenClassification"
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True, output_attentions=True, use_cache=use_cache)
    tensors = {k: v.numpy() for k, v in inputs.items()}
    main = out.last_hidden_state if head == "Qwen2Model" else out.logits
    tensors["logits" if head != "Qwen2Model" else "last_hidden_state"] = main.numpy()
    if getattr(out, "loss", None) is not None:
        tensors["loss"] = out.loss.reshape(1).numpy()
    for i, h in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = h.numpy()
    for i, a in enumerate(out.attentions):
        tensors[f"attentions.{i}"] = a.numpy()
    cache = getattr(out, "cache", None)
    if cache is not None:
        for i, layer in enumerate(cache.layers):
            tensors[f"cache.{i}.keys"] = layer.keys.numpy()
            tensors[f"cache.{i}.values"] = layer.values.numpy()
    meta = {"head": head, "use_cache": use_cache, "inputs": sorted(inputs), "decode_steps": 0,
            "transformers": transformers.__version__, "torch": torch.__version__}

    if head == "Qwen2ForCausalLM" and use_cache and "position_ids" not in inputs:
        # incremental decoding: prefill all but the last DECODE_STEPS tokens, then one token at a time
        T = inputs["input_ids"].shape[1]
        prefix = T - DECODE_STEPS
        with torch.no_grad():
            step = model(input_ids=inputs["input_ids"][:, :prefix],
                         attention_mask=inputs["attention_mask"][:, :prefix], use_cache=True)
            cache = step.cache
            for s in range(DECODE_STEPS):
                t = prefix + s
                step = model(input_ids=inputs["input_ids"][:, t:t + 1],
                             attention_mask=inputs["attention_mask"][:, :t + 1], cache=cache, use_cache=True)
                cache = step.cache
                tensors[f"decode.{s}.logits"] = step.logits.numpy()
        for i, layer in enumerate(cache.layers):
            tensors[f"decode.cache.{i}.keys"] = layer.keys.numpy()
        meta["decode_steps"] = DECODE_STEPS
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "outputs.safetensors"))
    (folder / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {head}, {sum(v.size for v in tensors.values())} output values")


def main():
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, (head, overrides, settings)) in enumerate(CASES.items()):
        run_case(name, head, overrides, settings, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
