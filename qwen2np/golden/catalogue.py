"""Known porting mistakes, each replayable on a port's own inputs: what a root cause *is*, not only where.

Isolation says which operation is wrong (layer 7's `context`); this catalogue says how. For a root cause,
diagnosis.py recomputes the operation once per mistake listed for its kind, from the same recorded inputs
and in the port's rounding orders, and judges each replay with the same policy: a mistake whose replay
agrees with the port's output reproduces it ("layer 7 context: reproduced exactly by KV head h % KV
(tile) instead of h // G").

The entries start from the teaching gallery (qwen2np/teaching/port.py: interleaved RoPE, tile for repeat,
missing biases, eps outside the root, a mask of −inf, sliding windows on the wrong layers) and add what
real ports of Qwen2 and its relatives got wrong: RoPE θ from another model (10000, Llama 3's 500000), the
inverse frequencies rounded to bfloat16 (`model.to(bfloat16)`), positions restarting at each decode step
or taken from the attention mask, the cache not read, keys cached after RoPE and rotated again, the
attention scale of another head size, the softmax without its max, heads merged (HD, H), Llama's eps,
Gemma's (1 + w) norm and √D embedding scale, GELU or ReLU for SiLU, gate and up swapped, a parallel block's
norm, lm_head tied when the checkpoint has its own. An entry with `restore` is a layout: the port's values
are right but stored in another order (diagnosis.py then asks the tensor's consumers which the port used).

mistakes.py holds how each entry computes; plain NumPy, like recipes.py (tests/test_layering.py).

>>> len(MISTAKES), sorted({m.kind for m in MISTAKES})[:4]
(132, ['embed_tokens', 'input_layernorm', 'layer', 'logits'])
>>> next(m.says for m in MISTAKES if m.name == "gqa_tile" and m.kind == "self_attn.context")
'KV head h % KV (tile) instead of h // G (repeat)'
"""

from dataclasses import dataclass

import numpy as np

from . import attention as att
from . import mistakes as replay
from . import recipes as rec


@dataclass(frozen=True)
class Mistake:
    kind: str              # the operation it explains, as tolerances.kind_of names it ("self_attn.context")
    name: str
    says: str              # what the port does, in one phrase
    inputs: tuple          # the dump's tensors the replay reads (as recipes.py names them)
    compute: object        # compute(ctx, *inputs, *weights) -> the port's output under this mistake
    weights: tuple = ()
    restore: object = None  # a layout: restore(ctx, recorded) -> the values in qwen2np's layout
    applies: object = None  # applies(config) -> whether the mistake can differ from the right answer
    unless: tuple = ()      # not replayed when these are recorded (another entry reads them)


NORMS = [("eps outside", "eps outside the square root: x / (sqrt(mean(x²)) + eps)"),
         ("llama eps", "eps 1e-5 (Llama's) instead of the config's"), ("no eps", "no eps"),
         ("1 + w", "the weight applied as (1 + w) (Gemma's RMSNorm)"),
         ("layernorm", "the mean subtracted (LayerNorm, not RMSNorm)"), ("no weight", "the norm's weight not applied")]
THETAS = [(dict(theta=t), f"theta {t:g}", says) for t, says in replay.OTHER_THETAS.items()]
POSITIONS = [(dict(positions=replay.restarting), "restart", "positions restarting at 0 in each pass (the cache's "
              "offset not added)"),
             (dict(positions=replay.from_mask), "mask positions", "positions from the attention mask (cumsum − 1, "
              "as generate does) instead of the plain forward's")]
ROPE = [(dict(rotate="pairs"), "interleaved", "pairs (2i, 2i+1) rotated, as GPT-J and GGML's normal RoPE, instead "
         "of halves (i, i + HD/2)"),
        (dict(rotate="sign"), "sign", "rotate_half with the sign on the other half: (x2, −x1), a rotation by −θ"),
        (dict(twice=True), "twice", "RoPE applied twice (keys cached before RoPE, rotated again)"),
        (dict(none=True), "none", "no RoPE"), (dict(split="dims-first"), "split", "heads split (HD, H) instead of "
                                               "(H, HD)"), *POSITIONS, *THETAS]
TABLES = [*THETAS, *POSITIONS,
          (dict(half_inv_freq=True), "inv_freq rounded", "inv_freq rounded to the dump's dtype (model.to(bfloat16) "
           "after loading in float32)"),
          (dict(interleaved=True), "interleaved", "tables with the angles repeated pairwise (interleaved) instead "
           "of halves"),
          (dict(half_angles=True), "half angles", "the angles position · inv_freq rounded to the dump's dtype"),
          (dict(default_rope=True), "no scaling", "the config's RoPE scaling ignored")]
SCORES = [(dict(tile=True), "gqa_tile", "KV head h % KV (tile) instead of h // G (repeat)"),
          (dict(scale="1/HD"), "scale 1/HD", "scale 1/HD instead of 1/√HD"),
          (dict(scale="1/sqrt(HD+1)"), "scale 1/sqrt(HD+1)", "scale 1/√(HD+1) instead of 1/√HD"),
          (dict(scale="none"), "no scale", "no scale (1/√HD missing)"),
          (dict(keys="twice"), "keys rotated twice", "keys cached after RoPE and rotated again (pre-RoPE keys "
           "assumed)")]
MASKS = [("everywhere", "a sliding window on every layer"), ("nowhere", "no sliding window"),
         ("swapped", "sliding windows on the layers below max_window_layers instead of from it on"),
         ("no causal", "no causal mask"), ("no padding", "padding not masked"),
         ("wider", "a sliding window of W + 1 keys"), ("narrower", "a sliding window of W − 1 keys")]
FUSED = [*SCORES, (dict(full=True), "nowhere", "no sliding window (the full causal mask)"),
         (dict(cache=False), "cache not read", "the KV cache not read: the keys and values of this pass only")]
NAN_ROWS = "a mask of −inf: the padding's empty softmax rows are NaN, and reach every position through 0 · NaN"
CACHE = ("self_attn.q_rope", "self_attn.k_rope@*", "self_attn.v_proj@*")
PROBS_V = ("self_attn.probs", "self_attn.v_proj@*")
HEADS = (("q", "num_attention_heads"), ("k", "num_key_value_heads"))

MISTAKES = [
    Mistake("embed_tokens", "sqrt(D)", "the embedding scaled by √D (Gemma's)", (),
            lambda ctx, t: ctx.r(rec.embedding(ctx, t) * np.sqrt(ctx.config.hidden_size)), ("embed_tokens.weight",)),
    *[Mistake(f"rotary_emb.{w}", name, says, (), replay.table(i, **how))
      for i, w in enumerate(("cos", "sin")) for how, name, says in TABLES],
    *[Mistake(norm, name, says, ("residual",), replay.norm(name), (f"{norm}.weight",))
      for norm in ("input_layernorm", "norm") for name, says in NORMS],
    Mistake("norm", "skipped", "the final norm skipped (its input passed on)", ("residual",), replay.norm("skipped"),
            ("norm.weight",)),
    *[Mistake("post_attention_layernorm", name, says, ("resid_mid",), replay.norm(name),
              ("post_attention_layernorm.weight",)) for name, says in NORMS],
    Mistake("post_attention_layernorm", "parallel", "the layer's input normalised, not resid_mid (a parallel "
            "block, as GPT-J)", ("residual",), replay.norm(""), ("post_attention_layernorm.weight",)),
    *[Mistake(f"self_attn.{p}", "no bias", f"{p} without its bias", ("input_layernorm",), replay.linear("no bias"),
              rec.ATTENTION_WEIGHTS[p]) for p in ("q_proj", "k_proj", "v_proj")],
    *[Mistake(f"self_attn.{q}_proj", "not transposed", f"{q}_proj as x W instead of x Wᵀ", ("input_layernorm",),
              replay.linear("transposed"), rec.ATTENTION_WEIGHTS[f"{q}_proj"], applies=replay.square(h))
      for q, h in (*HEADS, ("v", "num_key_value_heads"))],
    *[Mistake(f"self_attn.{q}_rope", name, says, (f"self_attn.{q}_proj", "rotary_emb.cos", "rotary_emb.sin"),
              replay.roped(h, **how)) for q, h in HEADS for how, name, says in ROPE],
    *[Mistake(f"self_attn.{q}_rope", name, says, (f"self_attn.{q}_proj",), replay.roped(h, **how),
              unless=("rotary_emb.cos", "rotary_emb.sin")) for q, h in HEADS for how, name, says in ROPE],
    *[Mistake(f"self_attn.{q}_rope", "token-first", "stored [B, T, heads, HD] in the dump (the same shape: T = "
              "heads)", (f"self_attn.{q}_proj",), replay.token_first(h), restore=replay.restore_token_first)
      for q, h in HEADS],
    *[Mistake("self_attn.scores", name, says, ("self_attn.q_rope", "self_attn.k_rope@*"), replay.scores(**how))
      for how, name, says in SCORES],
    Mistake("self_attn.scores", "keys unrotated", "keys without RoPE (k_proj's)", ("self_attn.q_rope",
            "self_attn.k_proj@*"), replay.scores(keys="proj")),
    *[Mistake("self_attn.mask", name, says, (), replay.mask(name)) for name, says in MASKS],
    *[Mistake("self_attn.probs", name, says, ("self_attn.scores",), replay.probs(name)) for name, says in (
        ("no mask", "the softmax without the mask"), ("queries", "the softmax over the queries instead of the keys"),
        ("no max", "the softmax without subtracting the row's max (exp overflows on large scores)"))],
    Mistake("self_attn.probs", "-inf", NAN_ROWS, ("self_attn.scores",), replay.nan_rows(att.probs)),
    Mistake("self_attn.context", "-inf", NAN_ROWS, PROBS_V, replay.nan_rows(att.context)),
    Mistake("self_attn.context", "-inf", NAN_ROWS, CACHE, replay.nan_rows(att.fused_context),
            unless=("self_attn.probs",)),
    Mistake("self_attn.context", "gqa_tile", SCORES[0][2], PROBS_V, replay.context(tile=True)),
    Mistake("self_attn.context", "merged (HD, H)", "heads merged (HD, H) instead of (H, HD)", PROBS_V,
            replay.context(merge="dims-first"), restore=replay.restore_merge),
    *[Mistake("self_attn.context", name, f"{says} (in the fused attention)", CACHE, replay.fused(**how),
              unless=("self_attn.probs",)) for how, name, says in FUSED],
    Mistake("self_attn.context", "merged (HD, H)", "heads merged (HD, H) instead of (H, HD) (in the fused attention)",
            CACHE, lambda ctx, q, k, v, m=None: replay.merged_dims_first(ctx, att.fused_context(ctx, q, k, v, m)),
            restore=replay.restore_merge, unless=("self_attn.probs",)),
    Mistake("self_attn.o_proj", "not transposed", "o_proj as x W instead of x Wᵀ", ("self_attn.context",),
            replay.linear("transposed"), ("self_attn.o_proj.weight",), applies=replay.square("num_attention_heads")),
    Mistake("resid_mid", "no residual", "the residual not added: resid_mid = o_proj", ("self_attn.o_proj",),
            lambda ctx, o: o),
    Mistake("layer", "no attention", "the MLP's output added to the layer's input, not to resid_mid",
            ("residual", "mlp.down_proj"), rec.add),
    *[Mistake(f"mlp.{mine}", "swapped", f"{mine} computed with {theirs}'s weight (gate and up swapped)",
              ("post_attention_layernorm",), rec.linear, (f"mlp.{theirs}.weight",))
      for mine, theirs in (("gate_proj", "up_proj"), ("up_proj", "gate_proj"))],
    *[Mistake("mlp.act", name, says, ("mlp.gate_proj",), replay.act(kind)) for kind, name, says in (
        ("gelu_pytorch_tanh", "gelu", "GELU (tanh) for SiLU"), ("gelu", "gelu erf", "GELU (erf) for SiLU"),
        ("relu", "relu", "ReLU for SiLU"), ("sigmoid", "sigmoid", "sigmoid(x) for SiLU (x · sigmoid(x))"))],
    Mistake("mlp.act", "of up", "SiLU of up_proj instead of gate_proj", ("mlp.gate_proj", "mlp.up_proj"),
            replay.act(of_up=True)),
    *[Mistake("mlp.act_up", name, says, ("mlp.gate_proj", "mlp.up_proj"), replay.act_up(kind, swapped))
      for kind, swapped, name, says in ((None, True, "swapped", "silu(up) · gate: gate and up swapped"),
                                        ("gelu_pytorch_tanh", False, "gelu", "GELU (tanh) for SiLU"),
                                        ("relu", False, "relu", "ReLU for SiLU"))],
    Mistake("mlp.down_proj", "no up", "down_proj of act alone (the product by up_proj missing)", ("mlp.act",),
            rec.linear, ("mlp.down_proj.weight",)),
    Mistake("logits", "tied", "lm_head tied to embed_tokens though the checkpoint has its own lm_head.weight",
            ("norm",), rec.linear, ("embed_tokens.weight",), applies=lambda config: not config.tie_word_embeddings),
    Mistake("logits", "no final norm", "logits of the last layer's output: the final norm skipped", ("residual",),
            rec.linear, ("lm_head.weight",)),
]


def mistakes_for(kind, config):
    """The catalogue's entries for an operation kind that can differ from the right answer on `config`."""
    return [m for m in MISTAKES if m.kind == kind and (m.applies is None or m.applies(config))
            and not (m.name.startswith("theta ") and float(m.name[6:]) == float(replay.theta(config)))]
