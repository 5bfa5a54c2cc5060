"""scripts/qwen2_dump_writer.py, the dump writer a Python port copies (no qwen2np import): what it writes,
qwen2np reads back bit for bit, with the same manifest facts and fingerprints as qwen2np's own dumps;
it writes whole or not at all, and refuses names, layouts and values that would misreport the port."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump
from qwen2np.golden.fingerprint import architecture, config_fingerprint, weights_fingerprint
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.record import record_dump

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
IDS = [[3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def writer():
    spec = importlib.util.spec_from_file_location("qwen2_dump_writer", ROOT / "scripts" / "qwen2_dump_writer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=3)


def hf_config(model):
    """The model's config as a config.json dict, which is what a port has."""
    return json.loads(model.config.to_json_string())


def rewrite(writer, golden, model, folder, dtype="float32", convert=lambda a: a, reverse=False, **kwargs):
    """Every tensor of `golden` through the writer, pass by pass (within a pass in reverse order if asked)."""
    with writer.DumpWriter(folder, producer="test", dtype=dtype, input_ids=golden.manifest["input_ids"],
                           config=hf_config(model), weights=model.state_dict(), **kwargs) as dump:
        for k, p in enumerate(golden.passes):
            dump.new_pass(p["start"], p["length"])
            for entry in (reversed(p["tensors"]) if reverse else p["tensors"]):
                dump(entry["name"], convert(np.asarray(golden[entry["key"]])))
    return read_dump(folder)


def test_the_writer_writes_what_qwen2np_reads_bit_for_bit(writer, model, tmp_path):
    """A tiny model's every intermediate, prefill and two decode steps, recorded in reverse order: the
    manifest lists them in forward order, the values are equal bit for bit, the fingerprints are qwen2np's,
    and isolation finds the weights and every operation right."""
    golden = record_dump(model, IDS, decode_steps=2)
    mine = rewrite(writer, golden, model, tmp_path / "mine", reverse=True)
    assert [(p["start"], p["length"]) for p in mine.passes] == [(0, 4), (4, 1), (5, 1)]
    assert [e["key"] for _, e in mine.entries()] == [e["key"] for _, e in golden.entries()]
    description = mine.manifest["model"]
    assert description["config"] == architecture(model.config)
    assert description["config_fingerprint"] == config_fingerprint(model.config)
    assert description["weights_fingerprint"] == weights_fingerprint(model.state_dict())
    c = compare_dumps(mine, golden)
    assert c.ok and all(t.max_abs == 0 for t in c.tensors) and len(c.tensors) == 3 * len(model.intermediate_names())
    isolation = isolate_dump(mine, model)
    assert isolation.ok and not isolation.not_isolated and "checked against A's fingerprint" in isolation.notes[0]


def test_a_bfloat16_dump(writer, model, tmp_path):
    """bfloat16 values, as ml_dtypes arrays or as float32 holding them, are stored as BF16, bit for bit;
    a float32 value that is not a bfloat16 one is refused."""
    golden = record_dump(model, IDS)
    as_bf16 = lambda a: a.astype(ml_dtypes.bfloat16)
    mine = rewrite(writer, golden, model, tmp_path / "a", dtype="bfloat16", convert=as_bf16)
    again = rewrite(writer, golden, model, tmp_path / "b", dtype="bfloat16",
                    convert=lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32))
    raw = (tmp_path / "a" / "tensors.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"} and mine.dtype == "bfloat16"
    for key in golden.tensors:
        assert np.array_equal(np.asarray(mine[key], np.float32), as_bf16(golden[key]).astype(np.float32))
        assert np.array_equal(np.asarray(again[key], np.float32), np.asarray(mine[key], np.float32))
    with pytest.raises(ValueError, match="model.embed_tokens: values are not bfloat16 values"):
        rewrite(writer, golden, model, tmp_path / "c", dtype="bfloat16")
    assert not (tmp_path / "c").exists()


def test_names_layouts_and_passes_are_checked_where_they_are_recorded(writer, model, tmp_path):
    kwargs = dict(producer="test", dtype="float32", input_ids=IDS, config=hf_config(model))
    q = np.zeros((1, 4, 6, 4), np.float32)                                  # [B, H, T, HD]
    with pytest.raises(ValueError) as error:
        with writer.DumpWriter(tmp_path / "a", **kwargs) as dump:
            dump.new_pass(0, 6)
            dump("model.layers.0.self_attn.q_rope", q)
            dump("model.layers.1.self_attn.q_rope", q.transpose(0, 2, 1, 3))   # token-first [B, T, H, HD]
    assert str(error.value) == ("model.layers.1.self_attn.q_rope: expected [B, heads, T, …] with B=1, T=6 "
                                "(docs/intermediates.md), found shape [1, 6, 4, 4]")
    assert not (tmp_path / "a").exists()        # nothing written: the block ended by an exception
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.qproj' is not an intermediate"):
        with writer.DumpWriter(tmp_path / "a", **kwargs) as dump:
            dump.new_pass(0, 6)
            dump("model.layers.0.self_attn.qproj", np.zeros((1, 6, 16), np.float32))
    with pytest.raises(ValueError, match="recorded twice in pass 0"):
        with writer.DumpWriter(tmp_path / "a", **kwargs) as dump:
            dump.new_pass(0, 6)
            dump("logits", np.zeros((1, 6, 48), np.float32))
            dump("logits", np.zeros((1, 6, 48), np.float32))
    with pytest.raises(ValueError, match="pass 1: expected start 4"):
        with writer.DumpWriter(tmp_path / "a", **kwargs) as dump:
            dump.new_pass(0, 4)
            dump.new_pass(5, 1)
    with pytest.raises(ValueError, match="the passes cover 4 of the 6 positions"):
        with writer.DumpWriter(tmp_path / "a", **kwargs) as dump:
            dump.new_pass(0, 4)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


def test_a_write_is_whole_or_not_at_all(writer, model, tmp_path):
    """An existing dump is refused, or replaced whole with overwrite=True; a failure leaves it as it was."""
    golden = record_dump(model, IDS)
    rewrite(writer, golden, model, tmp_path / "d")
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="the folder holds files"):
        rewrite(writer, golden, model, tmp_path / "d")
    with pytest.raises(ValueError, match="not exactly float16 values"):
        rewrite(writer, golden, model, tmp_path / "d", dtype="float16", overwrite=True)
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before
    again = rewrite(writer, golden, model, tmp_path / "d", overwrite=True, options={"run": 2})
    assert again.manifest["options"] == {"run": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_writer_imports_nothing_of_qwen2np():
    """It is for ports that do not have qwen2np: a fresh interpreter that cannot import qwen2np loads it."""
    code = ("import sys; sys.modules['qwen2np'] = None; sys.path.insert(0, 'scripts'); import qwen2_dump_writer as w; "
            "print(len(w.forward_order(24)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(3 + 24 * 20 + 2), r.stderr


def test_config_json_spellings_give_qwen2np_s_fingerprint(writer):
    """An older config.json (rope_theta at the top, no layer_types) and transformers 5's spelling give the
    same `config` and fingerprint as qwen2np's own Qwen2Config of it."""
    old = {"vocab_size": 48, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
           "rope_theta": 1000000, "max_position_embeddings": 32768, "sliding_window": 32768,
           "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True}
    config = Qwen2Config(**old)
    assert writer.architecture(old) == architecture(config)
    assert writer.config_fingerprint(writer.architecture(old)) == config_fingerprint(config)
