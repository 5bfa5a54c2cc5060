"""`resolve_model_path`: local paths, the test checkpoint, Hub ids (mocked, and offline for real)."""

import os
import subprocess
import sys

import pytest

from qwen2np.errors import CheckpointError, DownloadError, MissingDependencyError
from qwen2np.io.hub import HUB_ALLOW_PATTERNS, resolve_model_path


def test_local_folder_and_files(tmp_path):
    assert resolve_model_path(tmp_path) == tmp_path
    for name in ("m.gguf", "model.safetensors"):
        (tmp_path / name).write_bytes(b"")
        assert resolve_model_path(str(tmp_path / name)) == tmp_path / name
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="expected a checkpoint folder, a .gguf file or a .safetensors"):
        resolve_model_path(tmp_path / "notes.txt")


@pytest.mark.parametrize("spec", ["./missing", "missing.gguf", "/no/such/dir", "a/b/c", "org/model.safetensors"])
def test_unknown_local_paths(spec):
    with pytest.raises(CheckpointError, match=f"no such file or folder: {spec}"):
        resolve_model_path(spec)


@pytest.mark.parametrize("spec", ["test", "qwen2np:test"])
def test_the_test_checkpoint(tmp_path, monkeypatch, spec):
    path = tmp_path / "t.gguf"
    monkeypatch.setenv("QWEN2NP_TEST_CHECKPOINT", str(path))
    with pytest.raises(CheckpointError, match="run `qwen2np fetch`"):
        resolve_model_path(spec)
    path.write_bytes(b"GGUF")
    assert resolve_model_path(spec) == path


def test_hub_ids_go_to_snapshot_download_without_pickles(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == tmp_path
    assert resolve_model_path("Qwen/Qwen2.5-0.5B@main") == tmp_path
    assert calls == [("Qwen/Qwen2.5-0.5B-Instruct", None, HUB_ALLOW_PATTERNS), ("Qwen/Qwen2.5-0.5B", "main",
                                                                                   HUB_ALLOW_PATTERNS)]
    assert not any(p.endswith((".bin", ".pt", ".pth", "*")) for p in HUB_ALLOW_PATTERNS)


def test_hub_errors_become_one_line(monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        raise OSError("Repository Not Found for url: https://huggingface.co/api/models/x/y.\nMore text.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(DownloadError) as info:
        resolve_model_path("x/y")
    assert "\n" not in str(info.value) and "Repository Not Found" in str(info.value) and "'x/y'" in str(info.value)


def test_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'qwen2np\[hub\]'"):
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")


def test_offline_for_real(tmp_path):
    """The real huggingface_hub, offline with an empty cache: a one-line DownloadError."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = ("from qwen2np.io.hub import resolve_model_path\n"
            "try:\n    resolve_model_path('Qwen/Qwen2.5-0.5B-Instruct')\n"
            "except Exception as e:\n    print(type(e).__name__); print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    kind, message = out.rstrip("\n").split("\n")  # exactly one line of message
    assert kind == "DownloadError" and "could not be fetched from the Hugging Face Hub" in message


def test_a_sharded_model_from_a_hub_cache_snapshot(monkeypatch, tmp_path):
    """A hub id resolves to a snapshot whose shards are links into the repository's blobs/ (as
    huggingface_hub lays out its cache): the model loads, given as the id or as the snapshot path."""
    import hashlib

    import huggingface_hub
    import numpy as np

    from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    config = Qwen2Config(vocab_size=151665, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config, seed=0)
    written = tmp_path / "written"
    model.save_pretrained(written, max_shard_bytes=4_000_000)
    Qwen2Tokenizer.from_pretrained().save_pretrained(written)
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-Tiny"
    snapshot = repo / "snapshots" / "5e6f7a8b"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in written.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(f"../../blobs/{digest}")
    assert len(list(snapshot.glob("model-*.safetensors"))) > 1
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    ids = np.array([[9707, 1879]])
    for spec in ("Qwen/Qwen2-Tiny", snapshot):
        loaded = Qwen2ForCausalLM.from_pretrained(spec)
        assert np.array_equal(loaded(ids).logits, model(ids).logits)
        assert Qwen2Tokenizer.from_pretrained(spec)("Hello world")["input_ids"] == [9707, 1879]
