"""Q4_K, the 4-bit "k-quant" block of llama.cpp, decoded and encoded by hand in NumPy (notebook 5).

A Q4_K block holds 256 weights in 144 bytes (4.5 bits per weight):

    bytes 0-1     d     float16: the scale of the sub-block scales
    bytes 2-3     dmin  float16: the scale of the sub-block minimums
    bytes 4-15    8 scales and 8 minimums of 6 bits each, packed in 12 bytes
    bytes 16-143  256 quants of 4 bits: 4 chunks of 32 bytes; in chunk c, byte l holds weight 64c + l in its
                  low nibble and weight 64c + 32 + l in its high nibble

and weight i of sub-block j (32 weights each) is d · scale[j] · q[i] - dmin · min[j]. `q4k_fields`
decodes the fields, `q4k_decode` the weights; both are a second implementation of what the gguf package
does (tests/teaching/test_quant.py holds them equal, bit for bit, on the real checkpoint). `q4k_encode` is a
plain encoder (the minimum and maximum of each sub-block, then rounding), simpler than llama.cpp's, which
searches for better scales; it is here to measure what 4 bits cost.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 256, dtype=np.float32)
>>> block = q4k_encode(x)
>>> block.shape, block.dtype
((144,), dtype('uint8'))
>>> err = q4k_decode(block) - x    # at most half of a sub-block's step (its range / 15, from min(x, 0))
>>> round(float(np.abs(err).max()), 3), round(float(np.sqrt((err ** 2).mean())), 4)
(0.032, 0.0099)
"""

import numpy as np

QK_K = 256                 # weights per block
Q4_K_BYTES = 144           # bytes per block
SUB = 32                   # weights per sub-block


def q4k_fields(block):
    """The fields of Q4_K blocks [..., 144] (uint8): {"d", "dmin" [...] (float32), "scales", "mins" [..., 8]
    (uint8), "q" [..., 256] (uint8, in weight order)}."""
    block = np.asarray(block)
    if block.dtype != np.uint8 or block.shape[-1:] != (Q4_K_BYTES,):
        raise ValueError(f"a Q4_K block is {Q4_K_BYTES} bytes (uint8), found {block.dtype} {block.shape}")
    lead = block.shape[:-1]
    d = np.ascontiguousarray(block[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    dmin = np.ascontiguousarray(block[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    s = block[..., 4:16]
    # subtle: sub-blocks 0-3 have their 6 bits in the low bits of bytes 0-3 (scales) and 4-7 (mins);
    # sub-blocks 4-7 get their low 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-7
    scales = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = block[..., 16:].reshape(lead + (4, 32))                            # 4 chunks of 32 bytes
    q = np.stack([qs & 15, qs >> 4], axis=-2).reshape(lead + (QK_K,))      # chunk c: 32 low, then 32 high
    return {"d": d, "dmin": dmin, "scales": scales, "mins": mins, "q": q}


def q4k_decode(block):
    """The float32 weights [..., 256] of Q4_K blocks [..., 144]."""
    f = q4k_fields(block)
    scale = (f["d"][..., None] * f["scales"].astype(np.float32)).repeat(SUB, axis=-1)   # [..., 256]: d · scale[j]
    offset = (f["dmin"][..., None] * f["mins"].astype(np.float32)).repeat(SUB, axis=-1)  # [..., 256]: dmin · min[j]
    return scale * f["q"].astype(np.float32) - offset


def q4k_encode(x):
    """Float weights [..., 256] -> Q4_K blocks [..., 144] (uint8), by the minimum and maximum of each
    sub-block."""
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    x = x.reshape(-1, 8, SUB)                                               # [n, 8 sub-blocks, 32]
    low = np.minimum(x.min(axis=-1), 0)                                     # [n, 8]: the offset is never < 0
    step = (x.max(axis=-1) - low) / 15                                      # [n, 8]: 16 levels per sub-block
    d = (step.max(axis=-1) / 63).astype(np.float16)                         # [n]
    dmin = (-low.min(axis=-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d[:, None] > 0, np.round(step / d[:, None].astype(np.float32)), 0)
        mins = np.where(dmin[:, None] > 0, np.round(-low / dmin[:, None].astype(np.float32)), 0)
        scales, mins = (np.clip(a, 0, 63).astype(np.uint8) for a in (scales, mins))
        width = d[:, None].astype(np.float32) * scales                      # the step actually stored
        offset = dmin[:, None].astype(np.float32) * mins
        q = np.where(width[..., None] > 0, np.round((x + offset[..., None]) / width[..., None]), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(-1, 4, 2, SUB)          # chunk c: low half, high half
    packed = np.concatenate([(scales[:, :4] & 63) | ((scales[:, 4:] >> 4) << 6),
                             (mins[:, :4] & 63) | ((mins[:, 4:] >> 4) << 6),
                             (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)], axis=-1)   # [n, 12]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    head = np.stack([d, dmin], axis=-1).view(np.uint8)                      # [n, 4]
    return np.concatenate([head, packed, qs], axis=-1).astype(np.uint8).reshape(lead + (Q4_K_BYTES,))


def q4k_roundtrip(weights):
    """Every row of `weights` [R, C] (C a multiple of 256) encoded to Q4_K blocks and decoded again."""
    w = np.asarray(weights, dtype=np.float32)
    return q4k_decode(q4k_encode(w.reshape(-1, QK_K))).reshape(w.shape)
