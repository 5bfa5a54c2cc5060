"""llama.cpp as a foreign implementation: the map of its graph nodes to qwen2np names and layouts
(qwen2np/golden/llama_cpp_names.py), and scripts/dump_llama_cpp.py against qwen2np on the real checkpoint:
float32 on the F32 file, the quantized policy on Q4_K_M, and a planted RoPE θ caught and isolated."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from qwen2np.errors import DumpError
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.llama_cpp_names import (NODES, forward_order, mask_name, mask_to_qwen2np, qwen2np_name,
                                            to_qwen2np)
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation, format_report

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON = "0.3.36"


# -- the map, on synthetic tensors ------------------------------------------------------------------------


def test_every_mapped_node_has_its_qwen2np_name():
    for (node, op), template in NODES.items():
        ggml_name = node + "-7" if "{l}" in template else node
        assert qwen2np_name(ggml_name, op) == template.format(l=7)
        assert qwen2np_name(ggml_name, "RESHAPE") is None        # views of the same name are not intermediates
    assert qwen2np_name("node_931", "MUL_MAT", "blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj"
    assert qwen2np_name("node_931", "MUL_MAT", "blk.12.attn_q.weight") is None
    assert qwen2np_name("attn_norm", "MUL") is None              # a layer name needs its layer
    names = forward_order(2)
    assert all(qwen2np_name(n, op) in names for (n, op) in [("Qcur-1", "ROPE"), ("ffn_swiglu-0", "GLU")])


def ggml_order(x, kind):
    """A qwen2np tensor [1, …] as llama.cpp holds it: (flat values, ne), the inverse of to_qwen2np."""
    if kind == "heads":                                          # [1, h, T, HD] -> memory [T, h, HD]
        m = x[0].transpose(1, 0, 2)
    else:                                                        # [1, T, F] or [1, H, T, S] as they are
        m = x[0]
    return m.reshape(-1), list(m.shape[::-1]) + [1] * (4 - m.ndim)


def test_layouts_round_trip():
    rng = np.random.default_rng(0)
    T, H, HD, S, S_pad = 3, 4, 8, 5, 16
    rows = rng.standard_normal((1, T, 40)).astype(np.float32)
    assert np.array_equal(to_qwen2np("model.layers.2.mlp.up_proj", *ggml_order(rows, "rows")), rows)
    q = rng.standard_normal((1, H, T, HD)).astype(np.float32)
    assert np.array_equal(to_qwen2np("model.layers.2.self_attn.q_rope", *ggml_order(q, "heads")), q)
    probs = np.zeros((1, H, T, S_pad), np.float32)
    probs[..., :S] = rng.random((1, H, T, S))
    values, ne = ggml_order(probs, "keys")
    assert np.array_equal(to_qwen2np("model.layers.2.self_attn.probs", values, ne, S), probs[..., :S])
    kq = rng.standard_normal((1, H, T, S_pad)).astype(np.float32)
    scores = to_qwen2np("model.layers.2.self_attn.scores", *ggml_order(kq, "keys"), S, 0.125)
    assert np.array_equal(scores, kq[..., :S] * np.float32(0.125))
    probs[0, 1, 2, S + 3] = 0.5      # probability on a cell past the positions written: refused
    with pytest.raises(DumpError, match="probability on KV cells past the 5 positions"):
        to_qwen2np("model.layers.2.self_attn.probs", *ggml_order(probs, "keys"), S)


def test_the_mask_becomes_qwen2np_s():
    T, S, T_pad, S_pad = 2, 3, 4, 8
    raw = np.full((T_pad, S_pad), -np.inf, np.float32)           # memory [T_pad, S_pad]
    raw[0, :2] = raw[1, :3] = 0
    mask = mask_to_qwen2np(raw.reshape(-1), [S_pad, T_pad, 1, 1], T, S)
    assert mask.shape == (1, 1, T, S) and mask.dtype == np.float32
    assert (mask == 0).tolist() == [[[[True, True, False], [True, True, True]]]]
    assert mask[0, 0, 0, 2] == np.finfo(np.float32).min
    assert mask_name("model.layers.4.self_attn.probs") == "model.layers.4.self_attn.mask"


# -- llama.cpp itself, on the real checkpoint ---------------------------------------------------------------


PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        llama_cpp = None
        problem = f"llama-cpp-python is not installed ({e}); see the README's test set-up"
    else:
        problem = None if llama_cpp.__version__ == LLAMA_CPP_PYTHON else \
            f"llama-cpp-python {llama_cpp.__version__} (want {LLAMA_CPP_PYTHON})"
    require(problem is None, problem)
    return llama_cpp


@pytest.fixture(scope="module")
def ids(real_tokenizer):
    return np.array([real_tokenizer(PROMPT)["input_ids"]])


@pytest.fixture(scope="module")
def ours(real_model, ids):
    """qwen2np float32 on the test GGUF's dequantized weights (those of the F32 file, bit for bit)."""
    return record_dump(real_model, ids, decode_steps=2)


def llama_dump(tmp_path_factory, gguf, ids, *flags):
    out = tmp_path_factory.mktemp("llama") / "dump"
    command = [sys.executable, str(ROOT / "scripts" / "dump_llama_cpp.py"), "--model", str(gguf), "--ids",
               json.dumps(ids.tolist()), "--decode-steps", "2", "--out", str(out), *flags]
    r = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_dump(out)


@pytest.fixture(scope="module")
def llama_f32(llama_cpp, test_gguf, ids, tmp_path_factory):
    return llama_dump(tmp_path_factory, test_gguf, ids, "--requantize", "F32")


@pytest.fixture(scope="module")
def llama_q4(llama_cpp, test_gguf, ids, tmp_path_factory):
    return llama_dump(tmp_path_factory, test_gguf, ids)




@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
def test_llama_cpp_float32_passes_the_float32_policy(llama_f32, ours, real_model):
    """On the F32 file, every intermediate llama.cpp has is within qwen2np's float32 policy, in the prefill
    and both decode steps, and every one of its operations agrees with its float64 recomputation."""
    per_layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.q_rope", "self_attn.k_rope", "self_attn.scores", "self_attn.mask", "self_attn.probs",
                 "self_attn.context", "self_attn.o_proj", "resid_mid", "post_attention_layernorm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.act_up", "mlp.down_proj"]
    expected = ["model.embed_tokens"] + [f"model.layers.{l}.{n}" for l in range(24) for n in per_layer] + \
        [f"model.layers.{l}" for l in range(24)] + ["model.norm", "logits"]
    assert sorted(llama_f32.names(2)) == sorted(expected)
    # llama.cpp's own dequantization is the gguf package's, bit for bit: the F32 file's fingerprint is the GGUF's
    assert llama_f32.manifest["model"]["weights_fingerprint"] == ours.manifest["model"]["weights_fingerprint"]
    assert llama_f32.manifest["model"]["file_type"] == "F32"
    c = compare_dumps(llama_f32, ours)
    assert c.ok, format_report(c, brief=True)
    assert [t.name for t in c.tensors if t.name == "logits" and t.top1 == 1.0] == ["logits"] * 3
    assert c.only_in_a == [f"model.layers.{l}.mlp.act_up{s}" for s in ("", "@1", "@2") for l in range(24)]
    isolation = isolate_dump(llama_f32, real_model)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
def test_llama_cpp_on_q4_k_m_passes_the_quantized_policy(llama_q4, ours, real_model):
    """Q4_K_M: llama.cpp quantizes activations to 8 bits for its products, so the float32 policy fails at
    layer 0; against qwen2np on the same dequantized weights it is a correct quantized implementation, and
    each of its operations is within the q4_k_m isolation policy."""
    assert llama_q4.manifest["model"]["file_type"] == "Q4_K_M"
    float32 = compare_dumps(llama_q4, ours)
    assert not float32.ok and float32.first_failure.name.startswith("model.layers.0.")
    assert "--policy q4_k_m" in " ".join(float32.notes)
    c = compare_dumps(llama_q4, ours, policy="q4_k_m")
    assert c.ok, format_report(c, brief=True)
    isolation = isolate_dump(llama_q4, real_model, "q4_k_m")
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
def test_a_planted_rope_theta_on_the_llama_cpp_side_is_caught_and_isolated(llama_cpp, test_gguf, ids, ours,
                                                                          real_model, tmp_path_factory):
    """rope θ 1e6 -> 999000 in llama.cpp (its context parameter): compare fails under the float32 policy, and
    isolation names exactly the RoPE'd queries and keys of every layer, in every pass; on the Q4_K_M file
    too, where the comparison cannot see it under the quantization error."""
    planted = llama_dump(tmp_path_factory, test_gguf, ids, "--requantize", "F32", "--rope-freq-base", "999000")
    c = compare_dumps(planted, ours)   # caught downstream: layer 0's sharp softmax amplifies it first
    assert not c.ok and c.first_failure.name.startswith("model.layers.0.self_attn."), format_report(c, brief=True)
    isolation = isolate_dump(planted, real_model)
    expected = sorted(f"model.layers.{l}.self_attn.{n}" for l in range(24) for n in ("q_rope", "k_rope"))
    assert sorted({r.name for r in isolation.root_causes}) == expected, format_isolation(isolation, brief=True)
    assert {r.pass_index for r in isolation.root_causes} == {0, 1, 2}
    assert any("A declares another config" in n for n in isolation.notes)

    planted = llama_dump(tmp_path_factory, test_gguf, ids, "--rope-freq-base", "999000")
    assert compare_dumps(planted, ours, policy="q4_k_m").ok        # hidden in the quantization error
    isolation = isolate_dump(planted, real_model, "q4_k_m")
    assert sorted({r.name for r in isolation.root_causes}) == expected, format_isolation(isolation, brief=True)


def run(*command):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900)


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
def test_llama_cpp_on_q8_0_from_the_command_line(llama_cpp, test_gguf, ids, tmp_path):
    """The Q8_0 conversion, end to end with the commands of docs/porting.md: llama.cpp's dump, qwen2np's
    reference on the same file (named in the dump's manifest), compare and isolate under --policy q8_0."""
    script = ROOT / "scripts" / "dump_llama_cpp.py"
    r = run(sys.executable, script, "--model", test_gguf, "--ids", json.dumps(ids.tolist()), "--decode-steps", "2",
            "--requantize", "Q8_0", "--out", tmp_path / "llama")
    assert r.returncode == 0, r.stderr[-3000:]
    q8 = read_dump(tmp_path / "llama").manifest["model"]
    assert q8["file_type"] == "Q8_0" and Path(q8["path"]).is_file()
    r = run(sys.executable, "-m", "qwen2np", "dump", "--model", q8["path"], "--tokenizer", test_gguf, "--ids",
            json.dumps(ids.tolist()), "--decode-steps", "2", "--out", tmp_path / "reference")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(sys.executable, "-m", "qwen2np", "compare", tmp_path / "llama", tmp_path / "reference", "--policy", "q8_0",
            "--isolate", "--brief")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "ok: consistent with a correct q8_0 implementation" in r.stdout
    assert "operations isolated agree with their recomputation (q8_0 policy)" in r.stdout
    r = run(sys.executable, "-m", "qwen2np", "compare", tmp_path / "llama", tmp_path / "reference", "--brief")
    assert r.returncode == 1 and "--policy q8_0" in r.stdout
