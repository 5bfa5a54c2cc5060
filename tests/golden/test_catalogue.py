"""The catalogue of porting mistakes (qwen2np/golden/catalogue.py): each mistake planted in a NumPy port
(tests/support/ports.py, written apart from the catalogue's replays) is named at its root causes, in words.
"""

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.catalogue import MISTAKES
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.report import format_isolation
from support.ports import port_dump

# eps at the scale where its mistakes show in float32; two sliding layers (2, 3) over 3 keys; an lm_head of its own
CONFIG = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, pad_token_id=0, rms_norm_eps=1e-3,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6}, use_sliding_window=True, sliding_window=3,
              max_window_layers=2, tie_word_embeddings=False)
IDS = [[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
ROPE = ["self_attn.q_rope", "self_attn.k_rope"]
TABLES = ["rotary_emb.cos", "rotary_emb.sin"]

# the port's mistake -> (the kinds of its root causes, what the catalogue must say of each)
PLANTED = {
    "interleaved_rope": (ROPE, "pairs (2i, 2i+1) rotated, as GPT-J and GGML's normal RoPE, instead of halves"),
    "rope_sign": (ROPE, "rotate_half with the sign on the other half"),
    "rope_twice": (ROPE, "RoPE applied twice"),
    "no_rope": (ROPE, "no RoPE"),
    "rope_split_dims": (ROPE, "heads split (HD, H) instead of (H, HD)"),
    "rope_restart": (TABLES, "positions restarting at 0 in each pass (the cache's offset not added)"),
    "rope_mask_positions": (TABLES, "positions from the attention mask (cumsum − 1, as generate does)"),
    "theta_1e4": (TABLES, "θ = 10000 (the RoPE paper's, Llama 2's)"),
    "theta_5e5": (TABLES, "θ = 500000 (Llama 3's)"),
    "interleaved_tables": (TABLES, "tables with the angles repeated pairwise (interleaved) instead of halves"),
    "gqa_tile": (["self_attn.scores", "self_attn.context"], "KV head h % KV (tile) instead of h // G (repeat)"),
    "scale_hd": (["self_attn.scores"], "scale 1/HD instead of 1/√HD"),
    "scale_hd1": (["self_attn.scores"], "scale 1/√(HD+1) instead of 1/√HD"),
    "no_scale": (["self_attn.scores"], "no scale (1/√HD missing)"),
    "keys_rotated_twice": (["self_attn.scores"], "keys cached after RoPE and rotated again"),
    "keys_unrotated": (["self_attn.scores"], "keys without RoPE (k_proj's)"),
    "cache_not_read": (["self_attn.scores", "self_attn.mask", "self_attn.probs"], "the KV cache not read"),
    "no_causal": (["self_attn.mask"], "no causal mask"),
    "no_padding_mask": (["self_attn.mask"], "padding not masked"),
    "window_wider": (["self_attn.mask"], "a sliding window of W + 1 keys"),
    "window_narrower": (["self_attn.mask"], "a sliding window of W − 1 keys"),
    "sliding_everywhere": (["self_attn.mask"], "a sliding window on every layer"),
    "sliding_nowhere": (["self_attn.mask"], "no sliding window"),
    "sliding_swapped": (["self_attn.mask"], "sliding windows on the layers below max_window_layers instead of from it"),
    "softmax_no_mask": (["self_attn.probs"], "the softmax without the mask"),
    "softmax_queries": (["self_attn.probs"], "the softmax over the queries instead of the keys"),
    "mask_minus_inf": (["self_attn.probs"], "a mask of −inf: the padding's empty softmax rows are NaN"),
    "merge_dims_first": (["self_attn.context"], "heads merged (HD, H) instead of (H, HD)"),
    "no_q_bias": (["self_attn.q_proj"], "q_proj without its bias"),
    "no_k_bias": (["self_attn.k_proj"], "k_proj without its bias"),
    "no_v_bias": (["self_attn.v_proj"], "v_proj without its bias"),
    "q_not_transposed": (["self_attn.q_proj"], "q_proj as x W instead of x Wᵀ"),
    "o_not_transposed": (["self_attn.o_proj"], "o_proj as x W instead of x Wᵀ"),
    "eps_outside": (NORMS, "eps outside the square root"),
    "llama_eps": (NORMS[:2], "eps 1e-5 (Llama's) instead of the config's"),
    "no_eps": (NORMS[:2], "no eps"),
    "gemma_norm": (NORMS, "the weight applied as (1 + w) (Gemma's RMSNorm)"),
    "layernorm": (NORMS, "the mean subtracted (LayerNorm, not RMSNorm)"),
    "no_norm_weight": (NORMS, "the norm's weight not applied"),
    "no_final_norm": (["norm"], "the final norm skipped"),
    "parallel_block": (["post_attention_layernorm"], "the layer's input normalised, not resid_mid (a parallel block"),
    "gelu": (["mlp.act"], "GELU (tanh) for SiLU"),
    "gelu_erf": (["mlp.act"], "GELU (erf) for SiLU"),
    "relu": (["mlp.act"], "ReLU for SiLU"),
    "sigmoid_only": (["mlp.act"], "sigmoid(x) for SiLU"),
    "silu_of_up": (["mlp.act"], "SiLU of up_proj instead of gate_proj"),
    "gate_up_swapped": (["mlp.gate_proj", "mlp.up_proj"], "(gate and up swapped)"),
    "no_up": (["mlp.down_proj"], "down_proj of act alone (the product by up_proj missing)"),
    "no_residual": (["resid_mid"], "the residual not added: resid_mid = o_proj"),
    "mlp_from_input": (["layer"], "the MLP's output added to the layer's input, not to resid_mid"),
    "embed_sqrt_d": (["embed_tokens"], "the embedding scaled by √D (Gemma's)"),
    "lm_head_tied": (["logits"], "lm_head tied to embed_tokens though the checkpoint has its own lm_head.weight"),
}
# in a fused attention (no scores, probs or mask dumped) the same mistakes are named at the context
FUSED = {
    "gqa_tile": "KV head h % KV (tile) instead of h // G (repeat) (in the fused attention)",
    "scale_hd": "scale 1/HD instead of 1/√HD (in the fused attention)",
    "no_scale": "no scale (1/√HD missing) (in the fused attention)",
    "keys_rotated_twice": "keys cached after RoPE and rotated again (pre-RoPE keys assumed) (in the fused attention)",
    "cache_not_read": "the KV cache not read: the keys and values of this pass only (in the fused attention)",
    "sliding_nowhere": "no sliding window (the full causal mask) (in the fused attention)",
    "mask_minus_inf": "a mask of −inf: the padding's empty softmax rows are NaN",
    "merge_dims_first": "heads merged (HD, H) instead of (H, HD) (in the fused attention)",
}


@pytest.fixture(scope="module")
def model():
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG), seed=11)
    rng = np.random.default_rng(0)
    model.load_state_dict({n: (rng.standard_normal(w.shape) * 0.3 + (1 if "norm" in n else 0)).astype(np.float32)
                           for n, w in model.state_dict().items() if n.endswith("bias") or "norm" in n}, strict=False)
    return model


def kind(name):
    name = name.removeprefix("model.")
    return "layer" if name.startswith("layers.") and name.count(".") == 1 else name.split(".", 2)[-1] \
        if name.startswith("layers.") else name


def test_the_clean_port_is_right(model):
    for fused in (False, True):
        isolation = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, fused=fused), model)
        assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_each_planted_mistake_is_named(model, mistake):
    kinds, says = PLANTED[mistake]
    # no_eps: a padding position's zero embedding would divide 0 by 0, whose NaN reaches every position
    ids, mask = (IDS[:1], None) if mistake == "no_eps" else (IDS, MASK)
    isolation = isolate_dump(port_dump(model, ids, mask, decode_steps=2, mistakes=[mistake]), model)
    report = format_isolation(isolation, brief=True)
    assert sorted({kind(c.name) for c in isolation.root_causes}) == sorted(kinds), report
    assert all(says in c.mistake for c in isolation.root_causes), report


@pytest.mark.parametrize("mistake", list(FUSED))
def test_each_planted_mistake_in_a_fused_attention_is_named_at_the_context(model, mistake):
    isolation = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, fused=True, mistakes=[mistake]), model)
    report = format_isolation(isolation, brief=True)
    assert {kind(c.name) for c in isolation.root_causes} == {"self_attn.context"}, report
    assert all(FUSED[mistake] in c.mistake for c in isolation.root_causes), report


@pytest.mark.parametrize("mistake, says", [("gelu", "GELU (tanh) for SiLU"), ("relu", "ReLU for SiLU"),
                                           ("silu_of_up", "silu(up) · gate: gate and up swapped")])
def test_each_planted_mistake_in_a_fused_swiglu_is_named_at_act_up(model, mistake, says):
    """A port that dumps silu(gate) · up (mlx-lm, llama.cpp) instead of silu(gate)."""
    isolation = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, style="mlx", mistakes=[mistake]), model)
    assert {kind(c.name) for c in isolation.root_causes} == {"mlp.act_up"}, format_isolation(isolation, brief=True)
    assert {c.mistake for c in isolation.root_causes} == {says}


def test_a_bfloat16_port_that_rounds_inv_freq_is_named(model):
    """transformers' own trap (`model.to(torch.bfloat16)` rounds the rotary embedding's inv_freq buffer)."""
    ids = [list(np.random.default_rng(3).integers(1, 48, 40))]
    isolation = isolate_dump(port_dump(model, ids, decode_steps=2, dtype="bfloat16", mistakes=["inv_freq_half"]),
                             model)
    assert {c.name for c in isolation.root_causes} == {"model.rotary_emb.cos", "model.rotary_emb.sin"}
    assert {c.mistake for c in isolation.root_causes} == {
        "inv_freq rounded to the dump's dtype (model.to(bfloat16) after loading in float32)"}


def test_every_catalogue_entry_is_planted_or_said_why_not():
    """Each entry of the catalogue is exercised above, or is one that a test port cannot show: the planted
    names cover the catalogue's kinds."""
    said = {kind for kinds, _ in PLANTED.values() for kind in kinds} | {"mlp.act_up"}
    assert {m.kind for m in MISTAKES} <= said
