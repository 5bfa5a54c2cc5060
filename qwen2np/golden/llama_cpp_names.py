"""llama.cpp's graph tensors as qwen2np intermediates: which node is which name, and how its layout maps.

llama.cpp (through `llama-cpp-python`'s `cb_eval` callback, scripts/dump_llama_cpp.py) shows every node
of its compute graph: a name given by the model's graph code (`attn_norm-3`, `Qcur-3`, …; several nodes
may share one), an op (`MUL_MAT`, `ADD`, `ROPE`, …), `ne` (the sizes, fastest-varying first) and its
sources. For qwen2 (llama.cpp's src/models/qwen2.cpp, llama-cpp-python 0.3.36), with flash attention off
and an F32 KV cache, the nodes that are qwen2np intermediates are (`l` the layer, T the new positions, S
the cached key positions, S_pad the KV cells attended over: S rounded up to 256 at least):

    node          op        ne                   qwen2np name                        layout
    embd          GET_ROWS  [D, T]               model.embed_tokens                  [1, T, D]
    attn_norm-l   MUL       [D, T]               model.layers.l.input_layernorm      [1, T, D]
    Qcur-l        ADD       [H·HD, T]            …self_attn.q_proj (bias added)      [1, T, H·HD]
    Kcur-l        ADD       [KV·HD, T]           …self_attn.k_proj                   [1, T, KV·HD]
    Vcur-l        ADD       [KV·HD, T]           …self_attn.v_proj                   [1, T, KV·HD]
    Qcur-l        ROPE      [HD, H, T]           …self_attn.q_rope                   [1, H, T, HD]
    Kcur-l        ROPE      [HD, KV, T]          …self_attn.k_rope                   [1, KV, T, HD]
    kq-l          MUL_MAT   [S_pad, T, H]        …self_attn.scores (× HD^-0.5)       [1, H, T, S]
    (its mask)    SOFT_MAX  src[1] [S_pad, T']   …self_attn.mask (−inf → finfo.min)  [1, 1, T, S]
    kq_soft_max-l SOFT_MAX  [S_pad, T, H]        …self_attn.probs                    [1, H, T, S]
    kqv_out-l     CONT      [H·HD, T]            …self_attn.context                  [1, T, H·HD]
    node_*        MUL_MAT   [D, T], src[0] = blk.l.attn_output.weight   …self_attn.o_proj   [1, T, D]
    ffn_inp-l     ADD       [D, T]               model.layers.l.resid_mid            [1, T, D]
    ffn_norm-l    MUL       [D, T]               …post_attention_layernorm           [1, T, D]
    ffn_gate-l    MUL_MAT   [F, T]               …mlp.gate_proj                      [1, T, F]
    ffn_up-l      MUL_MAT   [F, T]               …mlp.up_proj                        [1, T, F]
    ffn_swiglu-l  GLU       [F, T]               …mlp.act_up: silu(gate) · up, fused [1, T, F]
    ffn_out-l     MUL_MAT   [F, T]               …mlp.down_proj                      [1, T, D]
    l_out-l       ADD       [D, T]               model.layers.l                      [1, T, D]
    result_norm   MUL       [D, T]               model.norm                          [1, T, D]
    result_output MUL_MAT   [V, T]               logits                              [1, T, V]

subtle: `ne` lists sizes fastest-varying first, so a contiguous tensor is the NumPy array of shape
`ne` reversed: `[D, T]` is `[T, D]`, `[HD, H, T]` is `[T, H, HD]` (heads then transposed to qwen2np's
head-major `[H, T, HD]`), `[S_pad, T, H]` is `[H, T, S_pad]`.

subtle: `kq` is q·kᵀ *before* the scale; llama.cpp scales inside the softmax (`soft_max_ext`), so the
scores are `kq · HD^-0.5`, rounded once in float32, the product the softmax itself forms.

subtle: the KV cells past the S positions written so far are padding (masked with −inf, probability
exactly 0); the columns for them are dropped, which is right only while the cells hold the positions
in order (one sequence, from an empty cache: what the dump script runs). `to_qwen2np` checks that the
dropped probabilities are 0.

Not available from llama.cpp: `rotary_emb.cos/.sin` (RoPE is one fused op), `mlp.act` (SiLU is fused
with the product), `head_out`. Isolation recomputes q_rope/k_rope from the config's tables and
down_proj from `mlp.act_up`.

>>> qwen2np_name("Qcur-3", "ROPE"), qwen2np_name("node_31", "MUL_MAT", "blk.0.attn_output.weight")
('model.layers.3.self_attn.q_rope', 'model.layers.0.self_attn.o_proj')
>>> qwen2np_name("norm-3", "RMS_NORM") is None          # the normalised x before the weight: no qwen2np name
True
>>> import numpy as np
>>> to_qwen2np("model.layers.0.self_attn.q_rope", np.arange(24, dtype=np.float32), [2, 3, 4, 1]).shape
(1, 3, 4, 2)
"""

import re

import numpy as np

from ..errors import DumpError

# (node name without "-{l}", op) -> qwen2np name ("{l}" for the layer)
NODES = {
    ("embd", "GET_ROWS"): "model.embed_tokens",
    ("attn_norm", "MUL"): "model.layers.{l}.input_layernorm",
    ("Qcur", "ADD"): "model.layers.{l}.self_attn.q_proj",
    ("Kcur", "ADD"): "model.layers.{l}.self_attn.k_proj",
    ("Vcur", "ADD"): "model.layers.{l}.self_attn.v_proj",
    ("Qcur", "ROPE"): "model.layers.{l}.self_attn.q_rope",
    ("Kcur", "ROPE"): "model.layers.{l}.self_attn.k_rope",
    ("kq", "MUL_MAT"): "model.layers.{l}.self_attn.scores",
    ("kq_soft_max", "SOFT_MAX"): "model.layers.{l}.self_attn.probs",
    ("kqv_out", "CONT"): "model.layers.{l}.self_attn.context",
    ("ffn_inp", "ADD"): "model.layers.{l}.resid_mid",
    ("ffn_norm", "MUL"): "model.layers.{l}.post_attention_layernorm",
    ("ffn_gate", "MUL_MAT"): "model.layers.{l}.mlp.gate_proj",
    ("ffn_up", "MUL_MAT"): "model.layers.{l}.mlp.up_proj",
    ("ffn_swiglu", "GLU"): "model.layers.{l}.mlp.act_up",
    ("ffn_out", "MUL_MAT"): "model.layers.{l}.mlp.down_proj",
    ("l_out", "ADD"): "model.layers.{l}",
    ("result_norm", "MUL"): "model.norm",
    ("result_output", "MUL_MAT"): "logits",
}
_LAYER_NODE = re.compile(r"(?P<base>.+)-(?P<layer>\d+)")
_ATTN_OUTPUT = re.compile(r"blk\.(?P<layer>\d+)\.attn_output\.weight")

# the layout of each qwen2np kind, from the NumPy view of a contiguous ggml tensor (ne reversed)
_HEADS = {"self_attn.q_rope", "self_attn.k_rope"}          # [T, heads, HD] -> [1, heads, T, HD]
_KEYS = {"self_attn.scores", "self_attn.probs"}            # [H, T, S_pad]  -> [1, H, T, S]


def qwen2np_name(node, op, weight=""):
    """The qwen2np intermediate that llama.cpp's node `node` (op `op`, first source `weight`) is, or None."""
    if op == "MUL_MAT":
        m = _ATTN_OUTPUT.fullmatch(weight)
        if m:   # the product by o_proj's weight is an unnamed node ("node_931")
            return f"model.layers.{m['layer']}.self_attn.o_proj"
    m = _LAYER_NODE.fullmatch(node)
    base, layer = (m["base"], m["layer"]) if m else (node, None)
    template = NODES.get((base, op))
    if template is None or ("{l}" in template) != (layer is not None):
        return None
    return template.format(l=layer)


def mask_name(probs_name):
    """The mask that goes with a probs tensor (read from the softmax's second source)."""
    return probs_name[:-len("probs")] + "mask"


def to_qwen2np(name, values, ne, key_positions=None, scale=None):
    """A node's values (float32, contiguous, in ggml order) as qwen2np's tensor `name`.

    `ne` are the node's sizes (fastest first); `key_positions` is S, the cached positions, for scores,
    probs and mask; `scale` (HD^-0.5) multiplies the scores.
    """
    ne = [int(n) for n in ne] + [1] * (4 - len(ne))
    a = np.asarray(values, dtype=np.float32).reshape(ne[::-1])            # [ne3, ne2, ne1, ne0]
    kind = re.sub(r"^model\.layers\.\d+\.?", "", name) or "layer"
    if ne[3] != 1:
        raise DumpError(f"{name}: llama.cpp node of sizes {ne}: expected a single stream (ne[3] = 1)")
    if kind in _HEADS:
        return np.ascontiguousarray(a[0].transpose(1, 0, 2))[None]          # [T, heads, HD] -> [1, heads, T, HD]
    if kind in _KEYS:
        S = key_positions
        if S is None or S > ne[0]:
            raise DumpError(f"{name}: {S} key positions, but llama.cpp's node has {ne[0]} KV cells")
        if kind == "self_attn.probs" and np.any(a[0][..., S:] != 0):
            raise DumpError(f"{name}: probability on KV cells past the {S} positions written: the cache cells are "
                            f"not the positions in order (one sequence from an empty cache is expected)")
        out = np.ascontiguousarray(a[0][..., :S])[None]                     # [H, T, S_pad] -> [1, H, T, S]
        if kind == "self_attn.scores":
            out *= np.float32(scale)   # as soft_max_ext forms it: kq · scale, one float32 rounding
        return out
    if ne[2] != 1:
        raise DumpError(f"{name}: llama.cpp node of sizes {ne}: expected a matrix [features, T]")
    return np.ascontiguousarray(a[0])                                       # [1, T, F] as it is


def mask_to_qwen2np(values, ne, T, S):
    """llama.cpp's additive mask (0 or −inf, [S_pad, T_pad] in ggml order) -> qwen2np's [1, 1, T, S],
    with −inf as finfo(float32).min, the value qwen2np and transformers use."""
    ne = [int(n) for n in ne] + [1] * (4 - len(ne))
    a = np.asarray(values, dtype=np.float32).reshape(ne[::-1])[0, 0]      # [T_pad, S_pad]
    if a.shape[0] < T or a.shape[1] < S:
        raise DumpError(f"the mask of sizes {ne} is smaller than T = {T} queries by S = {S} keys")
    a = a[:T, :S]
    return np.where(np.isneginf(a), np.finfo(np.float32).min, a).astype(np.float32)[None, None]


# one layer's names in forward order, with the two a port may add: resid_mid, and act_up for a fused SwiGLU
_LAYER_ORDER = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_rope",
    "self_attn.k_rope", "self_attn.scores", "self_attn.mask", "self_attn.probs", "self_attn.context",
    "self_attn.head_out", "self_attn.o_proj", "resid_mid", "post_attention_layernorm", "mlp.gate_proj",
    "mlp.up_proj", "mlp.act", "mlp.act_up", "mlp.down_proj",
)


def forward_order(num_layers):
    """Every name a dump of a causal LM may hold, in forward order (qwen2np's, plus `mlp.act_up`).

    >>> names = forward_order(2)
    >>> names.index("model.layers.0.mlp.act_up") == names.index("model.layers.0.mlp.act") + 1
    True
    """
    names = ["model.embed_tokens", "model.rotary_emb.cos", "model.rotary_emb.sin"]
    for l in range(num_layers):
        names += [f"model.layers.{l}.{n}" for n in _LAYER_ORDER] + [f"model.layers.{l}"]
    return names + ["model.norm", "logits"]
