"""The forward pass of Qwen2, in reading order (docs/dimensions.md has the legend and the shapes):

1. ``modeling.py``   Qwen2Model (embed -> layers -> norm) and its heads; `decoder_layer`, one block
2. ``layers.py``     linear, RMSNorm, SiLU, the SwiGLU MLP, softmax: plain functions of arrays
3. ``attention.py``  grouped-query self-attention with q/k/v biases
4. ``rope.py``       rotary position embeddings (half-split), with transformers' scaling types
5. ``masks.py``      causal, padding and sliding-window masks as an additive bias
6. ``cache.py``      the KV cache, full and sliding layers
7. ``inputs.py``     the checks on what a caller passes, with errors that say what and where
8. ``outputs.py``    the output records, with transformers' field names
9. ``losses.py``     the heads' losses (causal LM, sequence and token classification)
10. ``pretrained.py`` what every model shares: construction, from_pretrained, save_pretrained, `to`, and the
    checks a forward pass makes before it runs (files, cache, memory)

How a stored weight becomes the array a product uses is the business of qwen2np/weights/; the forward pass
never sees it.
"""
