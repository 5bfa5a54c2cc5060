"""The backward pass of Qwen2, by hand, beside the forward pass it differentiates (docs/gradients.md).

In reading order:

1. ``layers.py``     linear, RMSNorm, SiLU and the SwiGLU MLP, softmax, the embedding: each backward beside
   the forward of qwen2np/model/layers.py
2. ``attention.py``  RoPE and grouped-query attention backward (a KV head's gradient sums over its G query heads)
3. ``losses.py``     the heads' losses and their gradients (shifted labels, -100, num_items_in_batch)
4. ``model.py``      `value_and_grad`: a forward pass that keeps what the backward needs, layer by layer,
   and the backward through the head, the layers and the embedding
5. ``plan.py``       which layers keep their activations within the memory budget, which are recomputed
6. ``optim.py``      AdamW, as torch.optim.AdamW computes it

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM, value_and_grad
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> loss, grads = value_and_grad(model, [[1, 2, 3]], labels=[[1, 2, 3]])
>>> next(iter(grads)), grads["lm_head.weight"].dtype
('model.embed_tokens.weight', dtype('float32'))
"""

from .model import Gradients, value_and_grad

__all__ = ["value_and_grad", "Gradients"]
