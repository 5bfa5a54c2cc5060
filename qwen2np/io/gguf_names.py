"""GGUF tensor names (llama.cpp's) and the Hugging Face names qwen2np uses, for the qwen2 architecture.

    token_embd.weight                  model.embed_tokens.weight
    blk.{i}.attn_norm.weight           model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_{q,k,v}.{weight,bias} model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}
    blk.{i}.attn_output.weight         model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.ffn_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.ffn_{gate,up,down}.weight  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    output_norm.weight                 model.norm.weight
    output.weight                      lm_head.weight   (absent when the embeddings are tied)

subtle: llama.cpp's converter permutes the rows of Q and K for the llama architecture (to interleave
RoPE pairs) but not for qwen2, so the weights are used as they are; tests/io/test_gguf_oracle.py checks
that transformers 5.24 loads bitwise the same tensors.

>>> hf_name("blk.3.attn_q.bias")
'model.layers.3.self_attn.q_proj.bias'
>>> gguf_name("lm_head.weight")
'output.weight'
>>> hf_name("rope_freqs.weight") is None
True
"""

import re

__all__ = ["hf_name", "gguf_name", "GLOBAL_NAMES", "LAYER_NAMES"]

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")
_LAYER_GGUF = {hf: gguf for gguf, hf in LAYER_NAMES.items()}
_GLOBAL_GGUF = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}


def hf_name(name):
    """The Hugging Face name of the GGUF tensor `name`, or None if qwen2 has no such tensor."""
    if m := _GGUF_LAYER.fullmatch(name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}" if part in LAYER_NAMES else None
    stem, _, kind = name.rpartition(".")
    if stem in GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{GLOBAL_NAMES[stem]}.{kind}"
    return None


def gguf_name(name):
    """The GGUF name of the Hugging Face tensor `name`, or None (the inverse of `hf_name`)."""
    if m := _HF_LAYER.fullmatch(name):
        layer, part, kind = m.groups()
        return f"blk.{layer}.{_LAYER_GGUF[part]}.{kind}" if part in _LAYER_GGUF else None
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_GGUF and kind in ("weight", "bias"):
        return f"{_GLOBAL_GGUF[stem]}.{kind}"
    return None
