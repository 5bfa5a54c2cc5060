"""A tiny qwen2 GGUF's metadata and tensors, for the tests that build one (tests/io/test_gguf.py,
tests/cli/test_cli_io.py). `gguf` is the package, from conftest's `gguf` fixture."""

import numpy as np

H, F, NH, NKV, L, V = 64, 256, 4, 2, 2, 40
RNG = np.random.default_rng(2)


def qwen2_metadata(**extra):
    md = {
        "general.architecture": "qwen2",
        "general.name": "tiny",
        "qwen2.block_count": L,
        "qwen2.context_length": 128,
        "qwen2.embedding_length": H,
        "qwen2.feed_forward_length": F,
        "qwen2.attention.head_count": NH,
        "qwen2.attention.head_count_kv": NKV,
        "qwen2.rope.freq_base": 1e6,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(V - 2)] + ["<|endoftext|>",
                                                                                                 "<tool_call>"],
        "tokenizer.ggml.token_type": [1] * (V - 2) + [3, 4],
        "tokenizer.ggml.merges": ["a a", "b b"],
        "tokenizer.ggml.eos_token_id": V - 2,
        "tokenizer.ggml.bos_token_id": V - 2,
    }
    md.update(extra)
    return md


def quantized(gguf, name, shape, kind):
    """(name, type id, numpy shape, raw bytes) of a random tensor stored as `kind`."""
    t = gguf.GGMLQuantizationType[kind]
    values = RNG.standard_normal(shape).astype(np.float32)
    if kind in ("Q4_K", "Q6_K"):  # gguf cannot quantize these: random blocks with sane float16 scales
        block, size = gguf.GGML_QUANT_SIZES[t]
        blocks = RNG.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
        scale = np.array([0.01], np.float16).view(np.uint8)
        for at in ((0, 2) if kind == "Q4_K" else (size - 2,)):  # Q4_K: d, dmin first; Q6_K: d last
            blocks[:, at:at + 2] = scale
        raw = blocks.tobytes()
    else:
        raw = np.ascontiguousarray(gguf.quants.quantize(values, t)).view(np.uint8).tobytes()
    return (name, int(t), shape, raw)


def tiny_tensors(gguf, tied=False):
    tensors = [quantized(gguf, "token_embd.weight", (V, H), "Q8_0")]
    for i in range(L):
        b = f"blk.{i}"
        tensors += [
            (f"{b}.attn_norm.weight", RNG.standard_normal(H).astype(np.float32)),
            quantized(gguf, f"{b}.attn_q.weight", (NH * 16, H), "Q5_0"),
            (f"{b}.attn_q.bias", RNG.standard_normal(NH * 16).astype(np.float32)),
            quantized(gguf, f"{b}.attn_k.weight", (NKV * 16, H), "Q8_0"),
            (f"{b}.attn_k.bias", RNG.standard_normal(NKV * 16).astype(np.float32)),
            quantized(gguf, f"{b}.attn_v.weight", (NKV * 16, H), "Q4_0"),
            (f"{b}.attn_v.bias", RNG.standard_normal(NKV * 16).astype(np.float32)),
            quantized(gguf, f"{b}.attn_output.weight", (H, NH * 16), "F16"),
            (f"{b}.ffn_norm.weight", RNG.standard_normal(H).astype(np.float32)),
            quantized(gguf, f"{b}.ffn_gate.weight", (F, H), "Q5_0"),
            quantized(gguf, f"{b}.ffn_up.weight", (F, H), "BF16"),
            quantized(gguf, f"{b}.ffn_down.weight", (H, F), "Q4_K" if i == 0 else "Q6_K"),
        ]
    tensors.append(("output_norm.weight", RNG.standard_normal(H).astype(np.float32)))
    if not tied:
        tensors.append(quantized(gguf, "output.weight", (V, H), "Q8_0"))
    return tensors
