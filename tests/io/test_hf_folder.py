"""Hugging Face folders: single file and shards, bare Qwen2Model names, refused files, and the round trip
with transformers 5.24 (it loads what we save; we load what it saves)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from qwen2np.errors import CheckpointError
from qwen2np.io.hf_folder import save_hf_folder
from qwen2np.io.stored import Checkpoint
from qwen2np.weights.store import load_checkpoint
from qwen2np.io.safetensors_file import is_memory_mapped, write_safetensors

RNG = np.random.default_rng(1)
CONFIG = {"model_type": "qwen2", "hidden_size": 8}


def _tensors():
    return {
        "model.embed_tokens.weight": RNG.standard_normal((16, 8), dtype=np.float32),
        "model.norm.weight": RNG.standard_normal(8, dtype=np.float32),
        "lm_head.weight": RNG.standard_normal((16, 8), dtype=np.float32),
    }


def test_single_file_round_trip(tmp_path):
    tensors = _tensors()
    save_hf_folder(tmp_path, CONFIG, tensors, generation_config={"eos_token_id": 3})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and ckpt.path == tmp_path
    assert ckpt.config == CONFIG and ckpt.generation_config == {"eos_token_id": 3}
    assert ckpt.tensors.keys() == tensors.keys()
    for name, w in tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], w)
        assert is_memory_mapped(ckpt.tensors[name])
        assert ckpt.origin[name] == "model.safetensors"


def test_config_json_is_written_like_transformers(tmp_path):
    save_hf_folder(tmp_path, {"b": 1, "a": [1, 2]}, {})
    assert (tmp_path / "config.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_sharded_round_trip(tmp_path):
    tensors = _tensors()
    save_hf_folder(tmp_path, CONFIG, tensors, max_shard_bytes=520)  # 512, 512 and 32 bytes: one per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in tensors.values())
    ckpt = load_checkpoint(tmp_path)
    for name, w in tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], w)
        assert ckpt.origin[name] == index["weight_map"][name]


def test_progress_runs_once_over_all_shards(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors(), max_shard_bytes=520)
    calls = []
    load_checkpoint(tmp_path, progress=lambda d, t, n: calls.append((d, t)))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == calls[-1][1] == 512 + 32 + 512


def test_saving_in_bfloat16_records_the_dtype(tmp_path):
    tensors = _tensors()
    save_hf_folder(tmp_path, CONFIG, tensors, dtype="bfloat16")
    ckpt = load_checkpoint(tmp_path, dtype="float64")
    assert ckpt.config["dtype"] == "bfloat16"
    for name, w in tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], w.astype(ml_dtypes.bfloat16).astype(np.float64))


def test_resaving_in_the_other_layout_removes_stale_weights(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors(), max_shard_bytes=520)
    tensors = _tensors()
    save_hf_folder(tmp_path, CONFIG, tensors)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    save_hf_folder(tmp_path, CONFIG, tensors, max_shard_bytes=520)
    assert "model.safetensors" not in os.listdir(tmp_path)
    np.testing.assert_array_equal(load_checkpoint(tmp_path).tensors["lm_head.weight"], tensors["lm_head.weight"])


def test_bare_model_names_are_returned_as_stored(tmp_path):
    tensors = {"embed_tokens.weight": np.ones((4, 2), np.float32), "norm.weight": np.ones(2, np.float32)}
    save_hf_folder(tmp_path, CONFIG, tensors)
    assert sorted(load_checkpoint(tmp_path).tensors) == ["embed_tokens.weight", "norm.weight"]


def test_a_single_safetensors_file_takes_the_config_beside_it(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors())
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.config == CONFIG and ckpt.path == tmp_path / "model.safetensors"
    (tmp_path / "config.json").unlink()
    assert load_checkpoint(tmp_path / "model.safetensors").config == {}


def test_float64_request_copies(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors())
    t = load_checkpoint(tmp_path, dtype="float64").tensors["model.norm.weight"]
    assert t.dtype == np.float64 and not is_memory_mapped(t)


# --- refused folders and files ------------------------------------------------------------------------


def _index(folder, weight_map):
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_safetensors(tmp_path / "x.safetensors", {"w": np.ones(2, np.float32)})
    _index(folder, {"w": shard})
    with pytest.raises(CheckpointError, match="not a file inside"):
        load_checkpoint(folder)


def test_index_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_safetensors(tmp_path / "x.safetensors", {"w": np.ones(2, np.float32)})
    (folder / "link.safetensors").symlink_to(tmp_path / "x.safetensors")
    _index(folder, {"w": "link.safetensors"})
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(folder)


def test_missing_shard(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors(), max_shard_bytes=520)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors \(holding tensor 'model\.embed"):
        load_checkpoint(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    _index(tmp_path, {"w": "a.safetensors", "v": "a.safetensors"})
    with pytest.raises(CheckpointError, match="tensor 'v' in a.safetensors"):
        load_checkpoint(tmp_path)


def test_index_entries_may_start_with_dot_slash(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    _index(tmp_path, {"w": "./a.safetensors"})
    assert load_checkpoint(tmp_path).origin == {"w": "a.safetensors"}


def test_tensor_stored_in_two_shards(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"w": np.ones(2, np.float32)})
    _index(tmp_path, {"w": "a.safetensors", "x": "b.safetensors"})
    with pytest.raises(CheckpointError, match="'w' is stored twice"):
        load_checkpoint(tmp_path)


def test_bad_index(tmp_path):
    _index(tmp_path, ["not", "a", "map"])
    with pytest.raises(CheckpointError, match="weight_map"):
        load_checkpoint(tmp_path)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    # a pickle that would run code if loaded: it must never be opened
    (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/qwen2np-pwned'\ntR.")
    with pytest.raises(CheckpointError, match="never unpickles.*convert to safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(tmp_path / "pytorch_model.bin")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load_checkpoint(tmp_path)


def test_folder_without_config(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_bad_config_json(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors())
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)


def test_bad_dtype_arguments(tmp_path):
    save_hf_folder(tmp_path, CONFIG, _tensors())
    with pytest.raises(CheckpointError, match="expected one of float32, float64"):
        load_checkpoint(tmp_path, dtype="int8")
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        save_hf_folder(tmp_path / "x", CONFIG, _tensors(), dtype="int8")
    assert not (tmp_path / "x").exists()


def test_unknown_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="expected a checkpoint folder"):
        load_checkpoint(tmp_path / "notes.txt")


# --- transformers 5.24 reads what we write, and we read what it writes ---------------------------------


def _tiny_hf_model(oracle, tie):
    import torch

    torch.manual_seed(0)
    config = oracle.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return oracle.Qwen2ForCausalLM(config).eval()


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_we_load_what_transformers_saves(oracle, tmp_path, dtype, shard):
    import torch

    model = _tiny_hf_model(oracle, tie=False).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    ckpt = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert ckpt.tensors.keys() == state.keys()
    for name, w in state.items():
        np.testing.assert_array_equal(ckpt.tensors[name], w.float().numpy())
        assert is_memory_mapped(ckpt.tensors[name]) == (dtype == "float32")
    assert ckpt.config["model_type"] == "qwen2" and ckpt.config["dtype"] == dtype


@pytest.mark.oracle
def test_we_load_a_bare_qwen2model_saved_by_transformers(oracle, tmp_path):
    model = _tiny_hf_model(oracle, tie=True).model  # Qwen2Model: names without "model."
    model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert sorted(ckpt.tensors) == sorted(model.state_dict())
    assert "embed_tokens.weight" in ckpt.tensors


@pytest.mark.oracle
@pytest.mark.parametrize("dtype,shard", [(None, None), ("bfloat16", 6000), ("float16", None)])
def test_transformers_loads_what_we_save(oracle, tmp_path, dtype, shard):
    import torch

    model = _tiny_hf_model(oracle, tie=False)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    config = {**model.config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    save_hf_folder(tmp_path, config, state, max_shard_bytes=shard, dtype=dtype)
    loaded = oracle.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs = loaded.state_dict()
    assert theirs.keys() == state.keys()
    for name, w in state.items():
        expected = w if dtype is None else w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        np.testing.assert_array_equal(theirs[name].numpy(), expected.astype(np.float32))


def _hub_cache_snapshot(root, max_shard_bytes=520, repo="models--Qwen--Tiny"):
    """A Hugging Face hub cache as huggingface_hub lays it out: every file stored once in blobs/ under its
    hash, and the snapshot folder holding relative links `../../blobs/<hash>` to them."""
    import hashlib

    written = root / "written"
    tensors = _tensors()
    save_hf_folder(written, CONFIG, tensors, max_shard_bytes=max_shard_bytes)
    blobs, snapshot = root / repo / "blobs", root / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / repo / "refs").mkdir()
    (root / repo / "refs" / "main").write_text("0123abcd")
    for path in written.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(blobs / digest)
        (snapshot / path.name).symlink_to(f"../../blobs/{digest}")
    return snapshot, tensors


def test_a_sharded_hub_cache_snapshot_loads(tmp_path):
    """Every shard of a snapshot is a link out of the snapshot folder into the repository's blobs/."""
    snapshot, tensors = _hub_cache_snapshot(tmp_path)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    ckpt = load_checkpoint(snapshot)
    for name, w in tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], w)
    assert ckpt.origin["model.norm.weight"].startswith("model-000")


def test_a_hub_cache_snapshot_link_leaving_the_repository_is_refused(tmp_path):
    snapshot, _ = _hub_cache_snapshot(tmp_path)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    target = (snapshot / shard).resolve()
    outside = tmp_path / "elsewhere.safetensors"          # the same bytes, but outside models--Qwen--Tiny
    outside.write_bytes(target.read_bytes())
    (snapshot / shard).unlink()
    (snapshot / shard).symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside .*models--Qwen--Tiny"):
        load_checkpoint(snapshot)


def test_a_folder_that_only_looks_like_a_snapshot_keeps_its_own_bounds(tmp_path):
    """snapshots/<rev> under a folder that is not a hub repository (no models--… name, no blobs/): links
    must stay inside the folder itself."""
    folder = tmp_path / "project" / "snapshots" / "v1"
    folder.mkdir(parents=True)
    write_safetensors(tmp_path / "project" / "x.safetensors", {"w": np.ones(2, np.float32)})
    (folder / "link.safetensors").symlink_to(tmp_path / "project" / "x.safetensors")
    _index(folder, {"w": "link.safetensors"})
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(folder)
