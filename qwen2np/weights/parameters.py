"""The parameters of a Qwen2 model: their names and shapes, random initialisation, and checks on loading.

Names are the checkpoint's own (`layers.3.self_attn.q_proj.bias` inside `Qwen2Model`,
`model.layers.3.self_attn.q_proj.bias` inside the heads): no renaming layer.

>>> from qwen2np.config import Qwen2Config
>>> shapes = base_parameter_shapes(Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
>>> shapes["layers.0.self_attn.k_proj.weight"], shapes["layers.0.mlp.down_proj.weight"]
((4, 8), (8, 16))
"""

import os

import numpy as np

from ..errors import CheckpointError, ModelTooLargeError
from .system import available_memory


def base_parameter_shapes(config):
    """name -> shape of every parameter of Qwen2Model (D hidden, F MLP width, V vocab, H, KV, HD)."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, KV, HD = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {"embed_tokens.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (D,),
            f"{layer}.self_attn.q_proj.weight": (H * HD, D),
            f"{layer}.self_attn.q_proj.bias": (H * HD,),
            f"{layer}.self_attn.k_proj.weight": (KV * HD, D),
            f"{layer}.self_attn.k_proj.bias": (KV * HD,),
            f"{layer}.self_attn.v_proj.weight": (KV * HD, D),
            f"{layer}.self_attn.v_proj.bias": (KV * HD,),
            f"{layer}.self_attn.o_proj.weight": (D, H * HD),
            f"{layer}.post_attention_layernorm.weight": (D,),
            f"{layer}.mlp.gate_proj.weight": (F, D),
            f"{layer}.mlp.up_proj.weight": (F, D),
            f"{layer}.mlp.down_proj.weight": (D, F),
        })
    shapes["norm.weight"] = (D,)
    return shapes


def parameter_bytes(shapes, dtype):
    return sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


def check_memory(shapes, dtype, what):
    """Refuse, with the figures, to allocate weights that cannot fit, rather than being killed mid-way."""
    needed = parameter_bytes(shapes, dtype)
    available = available_memory()
    if available is not None and needed > 0.9 * available:
        count = sum(int(np.prod(s)) for s in shapes.values())
        raise ModelTooLargeError(
            f"{what} has {count:,} parameters: {_gib(needed)} in {np.dtype(dtype).name}, but only "
            f"{_gib(available)} of memory is available. Use a smaller config (e.g. hidden_size, "
            f"num_hidden_layers, vocab_size) or load a real checkpoint, which is memory-mapped."
        )
    return needed


def random_parameters(shapes, config, dtype, seed=0):
    """Weights drawn as transformers draws them: linear and embedding weights ~ N(0, initializer_range),
    biases 0, norm weights 1, and the padding token's embedding row 0. NumPy's PCG64 seeded with `seed`
    (the values differ from torch's, the distribution does not)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    std = dtype.type(config.initializer_range or 0.02)
    params = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        elif dtype.itemsize < 4:    # NumPy draws float32 or float64 only: drawn in float32, then rounded
            params[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)
        else:
            params[name] = rng.standard_normal(shape, dtype=dtype) * std
    embed = next(n for n in shapes if n.endswith("embed_tokens.weight"))
    pad = config.pad_token_id
    if pad is not None and 0 <= pad < shapes[embed][0]:
        params[embed][pad] = 0
    return params


def check_shapes(tensors, expected, origin, path):
    """Every expected tensor present with its shape; nothing unexpected. Errors name tensor, shapes and file."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{name}: missing from the checkpoint {path} (expected shape {shape})")
        found = tuple(tensors[name].shape)
        if found != tuple(shape):
            raise CheckpointError(
                f"{name}: expected shape {tuple(shape)}, found {found} in {origin.get(name, path)}"
            )
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{unexpected[0]}: unexpected tensor{more} in {origin.get(unexpected[0], path)}; "
            f"does the config ({os.path.basename(str(path))}) describe this checkpoint?"
        )
