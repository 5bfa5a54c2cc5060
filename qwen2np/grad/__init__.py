"""The backward pass of Qwen2, by hand, beside the forward pass it differentiates (docs/gradients.md).

In reading order:

1. ``layers.py``     linear, RMSNorm, SiLU and the SwiGLU MLP, softmax, the embedding: each backward beside
   the forward of qwen2np/model/layers.py
2. ``attention.py``  RoPE and grouped-query attention backward (a KV head's gradient sums over its G query heads)
3. ``losses.py``     the heads' losses and their gradients (shifted labels, -100, num_items_in_batch)
"""
