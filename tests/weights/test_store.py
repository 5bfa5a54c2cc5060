"""Weights held as stored and converted per use (qwen2np/weights/store.py), the memory budget that decides
(qwen2np/weights/plan.py), and files changed under a memory-mapped model (qwen2np/io/stored.py)."""

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qwen2np.weights.store as ws
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.weights.plan import plan_weights
from qwen2np.errors import CheckpointError, ModelTooLargeError
from qwen2np.io.checkpoint import open_checkpoint
from qwen2np.io.safetensors_file import write_safetensors
from qwen2np.io.stored import open_safetensors
from qwen2np.weights.store import StoredWeight, convert_rows, matmul_t

RNG = np.random.default_rng(7)
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
STORED = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def stored_matrix(tmp_path, w, kind):
    path = tmp_path / f"w-{kind}.safetensors"
    write_safetensors(path, {"w": w}, dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                                             "F64": "float64"}[kind])
    return open_safetensors(path)["w"]


@pytest.mark.parametrize("kind", STORED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conversion_is_the_exact_cast(tmp_path, kind, dtype):
    w = RNG.standard_normal((5, 7), dtype=np.float32)
    stored = stored_matrix(tmp_path, w, kind)
    exact = w.astype(STORED[kind]).astype(dtype)
    assert np.array_equal(convert_rows(stored, 0, 5, dtype), exact)
    assert np.array_equal(convert_rows(stored, 2, 4, dtype), exact[2:4])
    assert np.array_equal(np.asarray(StoredWeight(stored, dtype)), exact)


@settings(max_examples=40, deadline=None)
@example(N=1, O=49, I=49, kind="F32", dtype=np.float32, block_bytes=400)   # a 1-row last block (CI found it)
@example(N=1, O=17, I=16, kind="F32", dtype=np.float32, block_bytes=1)
@example(N=1, O=4865, I=896, kind="BF16", dtype=np.float32, block_bytes=1 << 20)
@example(N=1, O=4864, I=896, kind="F16", dtype=np.float32, block_bytes=1 << 20)
@given(N=st.integers(1, 40), O=st.integers(1, 70), I=st.integers(1, 50), kind=st.sampled_from(list(STORED)),
       dtype=st.sampled_from([np.float32, np.float64]), block_bytes=st.sampled_from([1, 64, 400, 1 << 20]))
def test_a_converted_weight_gives_bitwise_the_kept_ones_product(tmp_path_factory, N, O, I, kind, dtype,
                                                                 block_bytes):
    """Kept (an array) or stored (converted per use, block by block): the same blocks, the same bits."""
    tmp_path = tmp_path_factory.mktemp("w")
    w = RNG.standard_normal((O, I), dtype=np.float32)
    stored = stored_matrix(tmp_path, w, kind)
    kept = ws.convert_whole(stored, dtype)
    x = RNG.standard_normal((N, I)).astype(dtype)
    old = ws.DECODE_BLOCK_BYTES, ws.PREFILL_BLOCK_BYTES
    ws.DECODE_BLOCK_BYTES = ws.PREFILL_BLOCK_BYTES = block_bytes
    try:
        for stream in (False, True):
            assert np.array_equal(matmul_t(x, StoredWeight(stored, dtype, stream)), matmul_t(x, kept))
    finally:
        ws.DECODE_BLOCK_BYTES, ws.PREFILL_BLOCK_BYTES = old
    np.testing.assert_allclose(matmul_t(x, kept), x @ kept.T, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def test_indexing_a_stored_weight_converts_only_what_it_gathers(tmp_path):
    """`embed_tokens[ids]` reads the same whatever holds the table: a StoredWeight gathers the rows as
    the kept array would, any shape of ids, an int, -1 for the last row; a bad index is refused."""
    w = RNG.standard_normal((9, 4), dtype=np.float32)
    stored = stored_matrix(tmp_path, w, "BF16")
    kept = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    weight = StoredWeight(stored, np.float32)
    for ids in (np.array([[3, 3, 0], [8, 1, 2]]), np.array([5]), np.array([-1, 0, -9]), 4,
                np.zeros((2, 0), np.int64)):
        gathered = weight[ids]
        assert gathered.dtype == np.float32 and np.array_equal(gathered, kept[ids])
    with pytest.raises(IndexError, match="row 9 is out of bounds for 9 rows"):
        weight[np.array([0, 9])]
    with pytest.raises(TypeError, match="integer array of rows"):
        weight[1:3]


# -- the model within a budget ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same random model saved in float32 and in bfloat16."""
    model = Qwen2ForCausalLM(Qwen2Config(**TINY), seed=2)
    out = {}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path_factory.mktemp(dtype)
        from qwen2np.io.hf_folder import save_hf_folder

        config = model.config.to_dict()
        save_hf_folder(folder, config, model.state_dict(), dtype=dtype, max_shard_bytes=40_000)
        out[dtype] = folder
    return out


def budget_for(folder, dtype, how):
    """A max_memory that holds every matrix `how` ("kept", "mapped" or "streamed")."""
    ckpt = open_checkpoint(folder)
    config = Qwen2Config.from_dict(ckpt.config)
    roomy = plan_weights(ckpt.tensors, dtype, config, None)
    fixed = roomy.figures["needed_always"]
    matrices = [t for t in ckpt.tensors.values() if len(t.shape) == 2]
    return {"kept": None, "mapped": fixed + sum(t.nbytes for t in matrices),
            "streamed": fixed}[how]


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("how", ["mapped", "streamed"])
def test_a_budget_that_forces_per_use_conversion_gives_bitwise_the_same_logits(folders, stored, dtype, how,
                                                                                 monkeypatch):
    monkeypatch.setattr(ws, "DECODE_BLOCK_BYTES", 256)     # several blocks per matrix, even in this tiny model
    monkeypatch.setattr(ws, "PREFILL_BLOCK_BYTES", 1024)
    folder = folders[stored]
    kept = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype)
    assert not kept.weight_plan.mapped and not kept.weight_plan.streamed
    small = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, max_memory=budget_for(folder, dtype, how))
    matrices = [n for n, w in small.params.items() if w.ndim == 2]
    if stored == dtype and how == "mapped":      # the map already holds the compute dtype: kept as it is
        assert all(not isinstance(small.params[n], StoredWeight) for n in matrices)
    else:
        assert all(isinstance(small.params[n], StoredWeight) and small.params[n].stream == (how == "streamed")
                   for n in matrices)
    ids = RNG.integers(0, TINY["vocab_size"], (2, 17))
    assert np.array_equal(small(ids).logits, kept(ids).logits)                     # a prefill of 17 rows
    a, b = small(ids[:, :9]), kept(ids[:, :9])
    for t in range(9, 12):                                                        # decode steps of one row
        a = small(ids[:, t:t + 1], past_key_values=a.past_key_values)
        b = kept(ids[:, t:t + 1], past_key_values=b.past_key_values)
        assert np.array_equal(a.logits, b.logits)


def test_the_plan_is_described(folders):
    model = Qwen2ForCausalLM.from_pretrained(folders["bfloat16"], max_memory=budget_for(folders["bfloat16"],
                                                                                         "float32", "mapped"))
    text = model.weight_plan.description
    assert "parameters, bf16 on disk" in text and "converted to float32 per use" in text and "budget" in text
    kept = Qwen2ForCausalLM.from_pretrained(folders["bfloat16"])
    assert "every weight kept as float32" in kept.weight_plan.description


def test_layers_are_kept_whole_while_they_fit(folders):
    folder = folders["bfloat16"]
    ckpt = open_checkpoint(folder)
    config = Qwen2Config.from_dict(ckpt.config)
    mapped = budget_for(folder, "float32", "mapped")
    layer0 = [t for n, t in ckpt.tensors.items() if "layers.0." in n and len(t.shape) == 2]
    extra = sum(t.size * 4 - t.nbytes for t in layer0)
    plan = plan_weights(ckpt.tensors, "float32", config, mapped + extra)
    assert all(plan.how(t.name) == "kept" for t in layer0)
    assert all(plan.how(n) == "mapped" for n in ckpt.tensors if "layers.1." in n and len(ckpt.tensors[n].shape) == 2)
    assert "1 of 3 layers kept as float32, the rest converted per use" in plan.description


def test_a_budget_too_small_for_any_forward_pass_is_refused_before_allocating(folders):
    folder = folders["bfloat16"]
    needed = budget_for(folder, "float32", "streamed")
    with pytest.raises(ModelTooLargeError) as e:
        Qwen2ForCausalLM.from_pretrained(folder, max_memory=needed - 1)
    message = str(e.value)
    assert "cannot run within" in message and "streamed" in message and "512-token" in message


# -- files changed under a memory-mapped model --------------------------------------------------------


@pytest.mark.parametrize("change", ["truncated", "rewritten in place"])
def test_a_file_changed_under_the_model_is_refused(tmp_path, folders, change):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(folders["float32"], folder)
    model = Qwen2ForCausalLM.from_pretrained(folder)
    ids = np.array([[1, 2, 3]])
    before = model(ids).logits
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    if change == "truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        data = bytearray(shard.read_bytes())
        data[-4:] = b"\x00\x00\xc0\x7f"                     # a NaN in place of the last value
        with open(shard, "r+b") as f:
            f.write(data)
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # a coarse clock still sees it
    with pytest.raises(CheckpointError, match="changed on disk since it was loaded"):
        model(ids)
    assert model is not None and before.shape == (1, 3, 96)


def test_a_file_replaced_by_rename_does_not_disturb_the_model(tmp_path, folders):
    """Writing beside and renaming over (as save_pretrained does) leaves the mapped old file alive."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(folders["float32"], folder)
    model = Qwen2ForCausalLM.from_pretrained(folder)
    ids = np.array([[1, 2, 3]])
    before = model(ids).logits
    for shard in folder.glob("model-*.safetensors"):
        replacement = shard.with_suffix(".new")
        replacement.write_bytes(b"\x00" * 16)
        os.replace(replacement, shard)
    assert np.array_equal(model(ids).logits, before)


def test_a_forward_pass_too_big_for_the_budget_is_refused_before_it_starts(folders):
    """The budget keeps room for a 512-token prompt; a call that needs more than is left is refused with
    the figures, and the cache is as it was."""
    from qwen2np.weights.plan import NOMINAL_CACHE_POSITIONS, NOMINAL_TOKENS

    folder = folders["float32"]
    model = Qwen2ForCausalLM.from_pretrained(folder, max_memory=budget_for(folder, "float32", "streamed"))
    ids = RNG.integers(0, TINY["vocab_size"], (1, 8))
    cache = model(ids).past_key_values
    seen = cache.get_seq_length()
    long = RNG.integers(0, TINY["vocab_size"], (4, NOMINAL_TOKENS + NOMINAL_CACHE_POSITIONS))
    with pytest.raises(ModelTooLargeError, match="temporaries"):
        model(long)
    with pytest.raises(ModelTooLargeError, match="temporaries"):
        model(long[:1], past_key_values=cache)
    assert cache.get_seq_length() == seen
    unlimited = Qwen2ForCausalLM.from_pretrained(folder)          # no budget given: what the machine has
    assert unlimited(long[:1, :600]).logits.shape == (1, 600, TINY["vocab_size"])


@pytest.mark.parametrize("shape", [(4864, 896), (896, 4864), (1000, 1000), (152, 3584)])
@pytest.mark.parametrize("rows", [16, 64, 272])
def test_a_matrix_vector_product_in_blocks_of_16_rows_equals_one_call(shape, rows):
    """What lets a kept weight's decode product be one call while a converted one goes in blocks."""
    w = RNG.standard_normal(shape, dtype=np.float32)
    v = RNG.standard_normal(shape[1], dtype=np.float32)
    blocks = np.concatenate([w[r:r + rows] @ v for r in range(0, shape[0], rows)])
    assert np.array_equal(blocks, w @ v)
