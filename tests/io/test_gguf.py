"""GGUF files without the oracle: a tiny qwen2 GGUF built here, the header parser against gguf.GGUFReader,
the name mapping, the config, dequantization against `gguf.quants.dequantize`, and bad files.

tests/io/test_gguf_oracle.py compares the real checkpoint with transformers 5.24.
"""

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from qwen2np.errors import CheckpointError, MissingDependencyError
from qwen2np.weights.store import load_checkpoint
from qwen2np.io.gguf_file import gguf_config
from qwen2np.io.gguf_header import minimal_gguf_bytes, read_gguf_header
from qwen2np.io.gguf_names import GLOBAL_NAMES, LAYER_NAMES, gguf_name, hf_name

from support.tiny_gguf import F, H, L, NH, NKV, RNG, V, qwen2_metadata, quantized, tiny_tensors


@pytest.fixture(scope="module")
def tiny(gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(), tiny_tensors(gguf)))
    return path


def test_header_matches_gguf_reader(gguf, tiny):
    ours = read_gguf_header(tiny, string_arrays=all)
    theirs = gguf.GGUFReader(tiny)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.shape == tuple(int(d) for d in reversed(b.shape)) and a.ggml_type == int(b.tensor_type)
        assert a.start == b.data_offset
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key


@pytest.mark.slow
@pytest.mark.checkpoint
def test_header_matches_gguf_reader_on_the_real_checkpoint(gguf, test_gguf):
    ours = read_gguf_header(test_gguf, string_arrays=all)
    theirs = gguf.GGUFReader(test_gguf)
    assert len(ours.tensors) == len(theirs.tensors) == 291
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.shape, a.ggml_type, a.start) == (
            b.name, tuple(int(d) for d in reversed(b.shape)), int(b.tensor_type), b.data_offset)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert ours.array_lengths["tokenizer.ggml.tokens"] == 151936


def test_skipped_string_arrays_keep_their_length(tiny):
    header = read_gguf_header(tiny)
    assert "tokenizer.ggml.tokens" not in header.metadata
    assert header.array_lengths["tokenizer.ggml.tokens"] == V
    assert header.metadata["tokenizer.ggml.token_type"][-2:] == [3, 4]  # numeric arrays are always read


def test_names_map_both_ways():
    names = [f"{g}.weight" for g in GLOBAL_NAMES] + [f"blk.7.{p}.weight" for p in LAYER_NAMES] + ["blk.0.attn_q.bias"]
    for name in names:
        assert gguf_name(hf_name(name)) == name
    assert hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.1.attn_qkv.weight") is None and gguf_name("model.layers.0.mlp.act") is None


def test_tensors_are_dequantized_with_the_gguf_package(gguf, tiny):
    ckpt = load_checkpoint(tiny)
    reader = gguf.GGUFReader(tiny)
    assert len(ckpt.tensors) == len(reader.tensors) == 3 + 12 * L
    for t in reader.tensors:
        name = hf_name(t.name)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)  # the whole tensor at once
        ours = ckpt.tensors[name]
        assert ours.dtype == np.float32 and ours.shape == expected.shape
        assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32)), name  # bitwise
        assert ckpt.origin[name] == f"tiny.gguf ({t.name})"


def test_small_chunks_give_the_same_bits(gguf, tiny, monkeypatch):
    import qwen2np.weights.store as ws

    whole = load_checkpoint(tiny).tensors
    monkeypatch.setattr(ws, "CHUNK_BYTES", 1)  # one row per step
    for name, w in load_checkpoint(tiny).tensors.items():
        assert np.array_equal(w.view(np.uint32), whole[name].view(np.uint32)), name


def test_float64_is_the_exact_upcast(tiny):
    f32 = load_checkpoint(tiny).tensors
    f64 = load_checkpoint(tiny, dtype="float64").tensors
    for name in f32:
        assert f64[name].dtype == np.float64
        np.testing.assert_array_equal(f64[name], f32[name].astype(np.float64))


def test_config_as_transformers_builds_it(tiny):
    config = load_checkpoint(tiny).config
    assert config["model_type"] == "qwen2" and config["_model_name_or_path"] == "tiny"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (H, F, L)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (NH, NKV)
    assert config["max_position_embeddings"] == 128 and config["vocab_size"] == V
    assert config["rms_norm_eps"] == float(np.float32(1e-6)) != 1e-6  # stored as float32
    assert config["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (V - 2, V - 2, None)
    assert config["layer_types"] == ["full_attention"] * L


def test_generation_config_holds_only_what_the_file_states(tiny):
    assert load_checkpoint(tiny).generation_config == {"bos_token_id": V - 2, "eos_token_id": V - 2}


def test_tied_embeddings_when_there_is_no_output_tensor(gguf, tmp_path):
    path = tmp_path / "tied.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(), tiny_tensors(gguf, tied=True)))
    ckpt = load_checkpoint(path)
    assert ckpt.config["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensors


def test_missing_optional_metadata_takes_qwen2config_defaults(gguf, tmp_path):
    md = qwen2_metadata()
    for key in ("qwen2.attention.head_count_kv", "qwen2.rope.freq_base", "qwen2.context_length"):
        del md[key]
    path = tmp_path / "defaults.gguf"
    path.write_bytes(minimal_gguf_bytes(md, tiny_tensors(gguf)))
    config = read_gguf_header(path)
    config = gguf_config(config)
    assert config["num_key_value_heads"] == NH and config["max_position_embeddings"] == 32768
    assert config["rope_parameters"]["rope_theta"] == 10000.0


# --- bad files ------------------------------------------------------------------------------------------


def _fails(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_data(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny.read_bytes()[:-100])
    _fails(path, "tensor 'output.weight' ends at byte .* past the end of the file")


def test_truncated_header(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny.read_bytes()[:300])
    _fails(path, "truncated: the header runs past the end")


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(40))
    _fails(path, "not a GGUF file")


def test_unsupported_version(tiny, tmp_path):
    raw = bytearray(tiny.read_bytes())
    raw[4:8] = (1).to_bytes(4, "little")
    path = tmp_path / "v1.gguf"
    path.write_bytes(bytes(raw))
    _fails(path, "GGUF version 1: expected 2 or 3")


def test_other_architecture(gguf, tmp_path):
    path = tmp_path / "llama.gguf"
    path.write_bytes(minimal_gguf_bytes({**qwen2_metadata(), "general.architecture": "llama"}, tiny_tensors(gguf)))
    _fails(path, "general.architecture is 'llama'; qwen2np reads 'qwen2'")


def test_unknown_tensor(gguf, tmp_path):
    path = tmp_path / "extra.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(), tiny_tensors(gguf) + [("rope_freqs.weight",
                                                                                np.ones(8, np.float32))]))
    _fails(path, "tensor 'rope_freqs.weight' is not part of a qwen2 model")


def test_missing_required_metadata(gguf, tmp_path):
    md = qwen2_metadata()
    del md["qwen2.block_count"]
    path = tmp_path / "nometa.gguf"
    path.write_bytes(minimal_gguf_bytes(md, tiny_tensors(gguf)))
    _fails(path, "'qwen2.block_count' is missing")
    path.write_bytes(minimal_gguf_bytes({**md, "qwen2.block_count": "24"}, tiny_tensors(gguf)))
    _fails(path, "'qwen2.block_count' should be a number .int., found '24'")


def test_block_count_must_match_the_layers(gguf, tmp_path):
    path = tmp_path / "blocks.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(**{"qwen2.block_count": 3}), tiny_tensors(gguf)))
    _fails(path, r"qwen2.block_count is 3, but the file has tensors for 2 layers \(blk.0 .. blk.1\)")


def test_a_file_without_tensors(tmp_path):
    path = tmp_path / "vocab-only.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata()))
    _fails(path, "holds no tensors")


def test_vocab_size_must_match_the_embedding(gguf, tmp_path):
    md = qwen2_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:-1]
    path = tmp_path / "vocab.gguf"
    path.write_bytes(minimal_gguf_bytes(md, tiny_tensors(gguf)))
    _fails(path, "token_embd.weight has 40 rows but the vocabulary has 39 tokens")


def test_type_the_gguf_package_cannot_dequantize(gguf, tmp_path):
    tensors = [t for t in tiny_tensors(gguf) if t[0] != "output_norm.weight"]
    tensors.append(("output_norm.weight", 24, (H,), bytes(H)))  # I8: an integer type, not a weight type
    path = tmp_path / "i8.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(), tensors))
    _fails(path, "tensor 'output_norm.weight' has type I8, which the gguf package cannot dequantize")


def test_unknown_metadata_value_type(tmp_path):
    raw = minimal_gguf_bytes({"general.architecture": "qwen2", "x.bad": 7})
    at = raw.index(b"x.bad") + len(b"x.bad")
    path = tmp_path / "badtype.gguf"
    path.write_bytes(raw[:at] + (13).to_bytes(4, "little") + raw[at + 4:])
    with pytest.raises(CheckpointError, match="'x.bad' has value type 13"):
        read_gguf_header(path)


@settings(max_examples=200)
@given(data=st.data())
def test_corrupt_headers_raise_checkpoint_errors_only(tiny, tmp_path_factory, data):
    """A byte of the header changed, or the file cut anywhere: a clean load or a CheckpointError."""
    raw = bytearray(tiny.read_bytes())
    header_end = read_gguf_header(tiny).data_start
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "x.gguf"
    path.write_bytes(bytes(raw))
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e)


def test_a_quantized_tensor_with_a_zero_dimension(tiny, tmp_path):
    """A header byte that zeroes a quantized tensor's dimension (hypothesis found it above): the tensor
    loads empty (the gguf package cannot dequantize nothing), and a model refuses its shape."""
    from qwen2np import Qwen2ForCausalLM

    raw = bytearray(tiny.read_bytes())
    header = read_gguf_header(tiny)
    name = "blk.0.ffn_down.weight"                                  # Q4_K, GGUF dims (F, H): zero the first
    at = raw.index(name.encode()) + len(name) + 4                  # after the name: n_dims (u32), then dims
    assert int.from_bytes(raw[at:at + 8], "little") == F
    raw[at:at + 8] = (0).to_bytes(8, "little")
    path = tmp_path / "zero.gguf"
    path.write_bytes(bytes(raw))
    assert read_gguf_header(path).data_start == header.data_start
    assert load_checkpoint(path).tensors["model.layers.0.mlp.down_proj.weight"].shape == (H, 0)
    with pytest.raises(CheckpointError, match=r"down_proj.weight: expected shape \(64, 256\), found \(64, 0\)"):
        Qwen2ForCausalLM.from_pretrained(path)


def test_without_the_gguf_package(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'qwen2np\[gguf\]'"):
        load_checkpoint(tiny)
