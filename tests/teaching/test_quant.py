"""qwen2np/teaching/quant.py, the Q4_K decoder and encoder of notebook 5, against the gguf package (the
code transformers dequantizes GGUF files with): the same weights, bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from qwen2np.teaching.quant import Q4_K_BYTES, q4k_decode, q4k_encode, q4k_fields, q4k_roundtrip


def gguf_module():
    try:
        import gguf
    except ImportError as e:
        require(False, f"the gguf package is not installed ({e}); pip install 'qwen2np[gguf]'")
    return gguf


def gguf_decode(gguf, blocks):
    return gguf.quants.dequantize(blocks.reshape(1, -1), gguf.GGMLQuantizationType.Q4_K).reshape(-1, 256)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-2, 1e3), shift=st.floats(-2, 2))
def test_encoded_blocks_decode_as_gguf_decodes_them(seed, scale, shift):
    gguf = gguf_module()
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((3, 256)) + shift) * scale).astype(np.float32)
    blocks = q4k_encode(x)
    assert blocks.shape == (3, Q4_K_BYTES) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(q4k_decode(blocks), gguf_decode(gguf, blocks))
    err = np.abs(q4k_decode(blocks) - x)
    step = (x.reshape(3, 8, 32).max(-1) - np.minimum(x.reshape(3, 8, 32).min(-1), 0)) / 15
    assert (err.reshape(3, 8, 32) <= step[..., None] * 0.55 + 1e-3 * np.abs(x).max()).all()   # half a step, + rounding


def test_fields_of_a_block_and_a_round_trip():
    x = np.zeros(256, dtype=np.float32)
    f = q4k_fields(q4k_encode(x))
    assert f["d"] == 0 and f["dmin"] == 0 and not f["q"].any()
    np.testing.assert_array_equal(q4k_roundtrip(x.reshape(1, 256)), x.reshape(1, 256))
    with pytest.raises(ValueError, match="a Q4_K block is 144 bytes"):
        q4k_fields(np.zeros(143, dtype=np.uint8))


@pytest.mark.checkpoint
def test_the_checkpoint_q4k_tensors_decode_as_gguf_decodes_them(test_gguf):
    gguf = gguf_module()
    from qwen2np.io.checkpoint import open_checkpoint

    tensors = [t for t in open_checkpoint(test_gguf).tensors.values() if t.kind == "Q4_K"]
    assert len(tensors) == 12
    for t in tensors[:3]:
        raw = np.asarray(t.raw_rows(0, t.num_rows)).reshape(-1, Q4_K_BYTES)
        np.testing.assert_array_equal(q4k_decode(raw), gguf_decode(gguf, raw), err_msg=t.name)
