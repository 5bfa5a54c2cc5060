"""Golden dumps of the real checkpoint (Qwen2.5-Coder-0.5B-Instruct GGUF): qwen2np against transformers
5.24.0 name by name, a planted error found in the right place, and the command line end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen2np
from conftest import transformers_checkpoint_folder
from qwen2np import Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps, format_report
from qwen2np.golden.record import record_dump
from qwen2np.inspection.edits import zero_head

pytestmark = [pytest.mark.oracle, pytest.mark.checkpoint, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'


@pytest.fixture(scope="module")
def prompt_ids(real_tokenizer):
    return np.array([real_tokenizer(PROMPT)["input_ids"]])


@pytest.fixture(scope="module")
def theirs(dt, hf_real_model, prompt_ids):
    """transformers' dump: every intermediate of a prefill and two decode steps, weights fingerprinted."""
    return dt.record_dump(hf_real_model, prompt_ids, decode_steps=2, prompt=PROMPT)


@pytest.fixture(scope="module")
def ours(real_model, prompt_ids):
    return record_dump(real_model, prompt_ids, decode_steps=2, prompt=PROMPT)


def test_every_intermediate_matches_transformers(ours, theirs):
    """All 24 layers, every name, three forward passes: within the float32 policy; the same top-1 token."""
    assert [e["key"] for _, e in ours.entries()] == [e["key"] for _, e in theirs.entries()]
    c = compare_dumps(ours, theirs)
    assert c.ok, format_report(c, brief=True)
    assert len(c.tensors) == 3 * (3 + 24 * 19 + 2)
    assert all(t.top1 == 1.0 for t in c.tensors if t.name == "logits")


def test_same_config_and_weights_on_both_sides(ours, theirs):
    """qwen2np's own GGUF reading and dequantization give transformers' weights bit for bit (the float32
    weights fingerprint covers every one of the 291 tensors), and the same architecture."""
    a, b = ours.manifest["model"], theirs.manifest["model"]
    assert a["config"] == b["config"] and a["config_fingerprint"] == b["config_fingerprint"]
    assert a["weights_fingerprint"] == b["weights_fingerprint"]
    assert len(a["weights_fingerprint"]["tensors"]) == 291


@pytest.mark.parametrize("change", ["scale the weight by 1.001", "add 0.05 to one element"])
def test_a_planted_error_in_layer_5_is_found_there(real_model, prompt_ids, theirs, change):
    """A copy of the model sharing every array but layer 5's up_proj weight, perturbed: compared with
    transformers, the first tensor out of tolerance is model.layers.5.mlp.up_proj."""
    name = "model.layers.5.mlp.up_proj.weight"
    w = real_model.state_dict()[name].copy()
    if change.startswith("scale"):
        w *= np.float32(1.001)
    else:
        w[0, 0] += np.float32(0.05)
    copy = Qwen2ForCausalLM._from_params(real_model.config, dict(real_model.params), real_model.dtype)
    copy.load_state_dict({name: w}, strict=False)
    bad = record_dump(copy, prompt_ids, decode_steps=2, prompt=PROMPT)
    c = compare_dumps(bad, theirs)
    assert c.first_failure is not None and c.first_failure.key == "model.layers.5.mlp.up_proj", format_report(c, True)
    assert c.notes == [f"the weights differ: 1 of them ({name})"]
    assert real_model.state_dict()[name] is not w   # the shared model is untouched


def test_an_intervention_on_the_real_model(real_model, prompt_ids):
    """Zeroing head 5 of layer 3 leaves layers 0-2 as they were and changes the next-token logits."""
    x = prompt_ids[:, :12]
    with qwen2np.trace(real_model, "model.layers.2", "logits") as base:
        real_model(x)
    with qwen2np.trace(real_model, "model.layers.2", "model.layers.3.self_attn.context", "logits",
                       edits={"model.layers.3.self_attn.probs": zero_head(5)}) as t:
        real_model(x)
    assert np.array_equal(base["model.layers.2"], t["model.layers.2"])
    assert not t["model.layers.3.self_attn.context"][..., 5 * 64:6 * 64].any()
    assert not np.array_equal(base["logits"], t["logits"])


def run(*command):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900)


def test_the_command_line_end_to_end(oracle, test_gguf, tmp_path):
    """qwen2np dump and scripts/dump_transformers.py on transformers' own conversion of the checkpoint, then
    qwen2np compare: 0 when they agree, 2 against a dump of other token ids."""
    folder = transformers_checkpoint_folder(oracle, test_gguf)
    include = ["--include", "model.layers.5.*", "logits"]
    r = run(sys.executable, "-m", "qwen2np", "dump", "--model", folder, "--tokenizer", test_gguf, "--prompt", PROMPT,
            *include, "--decode-steps", "1", "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    ids = json.loads((tmp_path / "ours" / "manifest.json").read_text())["input_ids"]
    r = run(sys.executable, ROOT / "scripts" / "dump_transformers.py", "--model", folder, "--ids", json.dumps(ids),
            *include, "--decode-steps", "1", "--out", tmp_path / "theirs")
    assert r.returncode == 0, r.stderr
    r = run(sys.executable, "-m", "qwen2np", "compare", tmp_path / "ours", tmp_path / "theirs")
    assert r.returncode == 0, r.stdout + r.stderr
    from qwen2np.inspection.names import LAYER_NAMES

    compared = 2 * (len(LAYER_NAMES) + 1)       # layer 5's intermediates and the logits, in two passes
    assert f"ok: all {compared} tensors within tolerance" in r.stdout

    r = run(sys.executable, "-m", "qwen2np", "dump", "--model", folder, "--ids", json.dumps([ids[0][:-1] + [13]]),
            *include, "--decode-steps", "1", "--fingerprint", "none", "--out", tmp_path / "other")
    assert r.returncode == 0, r.stderr
    r = run(sys.executable, "-m", "qwen2np", "compare", tmp_path / "other", tmp_path / "theirs")
    assert r.returncode == 2 and "different token ids" in r.stderr
