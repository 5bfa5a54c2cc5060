"""Isolation (qwen2np/golden/isolate.py, `qwen2np compare --isolate`): every operation recomputed from the
dump's own inputs, so that every root cause is named in one run, in float32 and in half precision."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import DumpError
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import new_dump, write_dump
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.metrics import ulps
from qwen2np.golden.policies import POLICIES, policy_named
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation, format_report
from qwen2np.golden.rounding import rounding
from qwen2np.inspection.tracing import trace

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)
IDS = [[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=11)


def root_causes(isolation):
    return sorted({c.name for c in isolation.root_causes})


def test_a_correct_dump_has_no_root_cause_and_every_operation_is_isolated(model):
    """Padding, decode steps through the cache, every name: each operation agrees with its recomputation."""
    dump = record_dump(model, IDS, MASK, decode_steps=2)
    isolation = isolate_dump(dump, model)
    assert isolation.ok and not isolation.not_isolated
    assert len(isolation.checks) == len(dump.tensors) == 3 * len(model.intermediate_names())
    assert 0 < max(c.rel for c in isolation.checks) < 1e-6     # float32 rounding, not an exact copy


# each kind of operation, planted wrong in one layer: isolation names that tensor and nothing else, while
# compare names it first and then every tensor downstream
PLANTED = [
    "model.embed_tokens", "model.rotary_emb.cos", "model.rotary_emb.sin",
    "model.layers.1.input_layernorm", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
    "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.q_rope", "model.layers.1.self_attn.k_rope",
    "model.layers.1.self_attn.scores", "model.layers.1.self_attn.mask", "model.layers.1.self_attn.probs",
    "model.layers.1.self_attn.context", "model.layers.1.self_attn.head_out", "model.layers.1.self_attn.o_proj",
    "model.layers.1.resid_mid", "model.layers.1.post_attention_layernorm", "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.up_proj", "model.layers.1.mlp.act", "model.layers.1.mlp.down_proj", "model.layers.1",
    "model.norm", "logits",
]


def planted_error(name):
    """An edit that makes tensor `name` wrong by about 1e-2 of its scale, in every pass."""
    if name.endswith(".mask"):   # allow one masked key: position 0 seen by nothing but itself, now by 1
        def unmask(x):
            x = x.copy()
            x[0, 0, 0, -1] = 0 if x.shape[-1] > 1 else x[0, 0, 0, -1]
            return x
        return unmask
    if name.endswith(".head_out"):   # head 1's share; o_proj then sums the edited shares
        def one_head(x):
            x = x.copy()
            x[:, 1] *= x.dtype.type(1.01)
            return x
        return one_head
    return lambda x: x + x.dtype.type(1e-2) * np.abs(x).max() * np.cos(np.arange(x.size, dtype=x.dtype)).reshape(x.shape)


@pytest.mark.parametrize("name", PLANTED)
def test_each_operation_wrong_alone_is_its_own_root_cause(model, name):
    good = record_dump(model, IDS, MASK, decode_steps=2, fingerprint=None)
    with trace(model, edits={name: planted_error(name)}):
        bad = record_dump(model, IDS, MASK, decode_steps=2)
    isolation = isolate_dump(bad, model)
    # subtle: an edit of head_out makes o_proj the sum of the edited shares (docs/intermediates.md), so the
    # port's o_proj is no longer context · W_oᵀ either: both are wrong, as they are in that port
    expected = [name, "model.layers.1.self_attn.o_proj"] if name.endswith("head_out") else [name]
    assert root_causes(isolation) == expected, format_isolation(isolation, brief=True)
    assert not isolation.not_isolated
    comparison = compare_dumps(bad, good)
    assert comparison.first_failure.name == name
    if name not in ("logits", "model.layers.1.self_attn.mask"):   # downstream tensors inherit the error
        assert len([t for t in comparison.tensors if not t.ok]) > len(isolation.root_causes)


def interleaved_rope(x, cos, sin):
    """RoPE with GGML's "normal" layout: pairs (2i, 2i+1) rotated by angle i, a classic porting bug."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]       # [B, 1, T, HD/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
    return out


@contextlib.contextmanager
def two_bugs(layer_rope, layer_act):
    """A port with two independent bugs: interleaved RoPE pairs in one layer, gelu for silu in another.
    Made by patching qwen2np's own functions for those layers' scopes only."""
    import qwen2np.model.attention as attention
    import qwen2np.model.modeling as modeling
    from qwen2np.model.layers import gelu_tanh

    original_attention, original_mlp, original_rope = modeling.self_attention, modeling.swiglu_mlp, attention.apply_rope

    def self_attention(x, p, cos, sin, mask, cache_layer, *args, **kwargs):
        scope = args[3] if len(args) > 3 else kwargs.get("scope")
        attention.apply_rope = interleaved_rope if scope.endswith(f"layers.{layer_rope}.self_attn") else original_rope
        try:
            return original_attention(x, p, cos, sin, mask, cache_layer, *args, **kwargs)
        finally:
            attention.apply_rope = original_rope

    def swiglu_mlp(x, gate, up, down, act, scope=None):
        return original_mlp(x, gate, up, down, gelu_tanh if scope.endswith(f"layers.{layer_act}.mlp") else act, scope)

    modeling.self_attention, modeling.swiglu_mlp = self_attention, swiglu_mlp
    try:
        yield
    finally:
        modeling.self_attention, modeling.swiglu_mlp = original_attention, original_mlp


def test_two_independent_bugs_are_both_named_in_one_run(model):
    """compare stops at the first (every later tensor fails); isolate names exactly the planted tensors."""
    good = record_dump(model, IDS, MASK, decode_steps=2, fingerprint=None)
    with two_bugs(1, 3):
        bad = record_dump(model, IDS, MASK, decode_steps=2)
    comparison = compare_dumps(bad, good)
    assert comparison.first_failure.name == "model.layers.1.self_attn.q_rope"
    isolation = isolate_dump(bad, model)
    assert root_causes(isolation) == ["model.layers.1.self_attn.k_rope", "model.layers.1.self_attn.q_rope",
                                      "model.layers.3.mlp.act"]
    assert {c.pass_index for c in isolation.root_causes} == {0, 1, 2}   # the prefill and both decode steps
    report = format_isolation(isolation, brief=True, comparison=comparison)
    assert f"ROOT CAUSES: 9 of {3 * len(model.intermediate_names())} operations" in report
    assert "inherit an error from upstream" in report


def test_a_failure_with_no_upstream_does_not_inherit(model):
    """The RoPE tables have no recorded input: when they fail against B while agreeing with their own
    recomputation, it is B that differs there (once: "inherit an error from upstream")."""
    mine = record_dump(model, IDS, MASK, decode_steps=1, fingerprint=None)
    other = Qwen2ForCausalLM._from_params(Qwen2Config(**TINY, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000 * 0.999}),
                                          dict(model.params), model.dtype)
    comparison = compare_dumps(mine, record_dump(other, IDS, MASK, decode_steps=1, fingerprint=None))
    isolation = isolate_dump(mine, model)
    assert isolation.ok and not comparison.ok
    report = format_isolation(isolation, comparison=comparison)
    assert "inherit" not in report, report
    assert "have no upstream and agree with their recomputation from the model (model.rotary_emb.cos, " \
           "model.rotary_emb.sin, model.rotary_emb.cos@1): B differs from the model there" in report


def test_weights_are_checked_against_the_fingerprint(model):
    """A weight that differs from A's fingerprint is named, and the isolation goes on: the operation that
    reads it is the root cause, marked as reading it (a conversion bug in the port, not a refusal)."""
    dump = record_dump(model, [[1, 2, 3]])
    other = Qwen2ForCausalLM._from_params(model.config, dict(model.params), model.dtype)
    w = other.state_dict()["model.layers.2.mlp.up_proj.weight"].copy()
    w[0, 0] += 1
    other.load_state_dict({"model.layers.2.mlp.up_proj.weight": w}, strict=False)
    isolation = isolate_dump(dump, other)
    assert "weights differ from the checkpoint in 1 of" in isolation.notes[1]
    assert "model.layers.2.mlp.up_proj.weight (differs from A's fingerprint)" in isolation.notes[1]
    assert root_causes(isolation) == ["model.layers.2.mlp.up_proj"]
    assert "reads model.layers.2.mlp.up_proj.weight, which differs" in isolation.root_causes[0].notes[0]
    unrelated = Qwen2ForCausalLM(Qwen2Config(**TINY), seed=12)   # another checkpoint (its norms, all ones, match)
    with pytest.raises(DumpError, match=r"not the ones A ran with: \d+ of the 51 weights checked differ"):
        isolate_dump(dump, unrelated)
    unhashed = record_dump(model, [[1, 2, 3]], fingerprint=None)
    assert "A records no weights fingerprint" in isolate_dump(unhashed, model).notes[0]


def test_an_operation_whose_inputs_are_not_recorded_is_not_isolated(model):
    dump = record_dump(model, [[1, 2, 3, 4]], include=["model.layers.2.mlp.*", "logits"])
    isolation = isolate_dump(dump, model)
    assert isolation.ok
    isolated = sorted(c.name for c in isolation.checks if c.ok is not None)
    assert isolated == ["model.layers.2.mlp.act", "model.layers.2.mlp.down_proj"]
    missing = {c.name: c.missing for c in isolation.not_isolated}
    assert missing["logits"] == "needs model.norm, which A does not record"
    assert "not isolated: 3 tensors" in format_isolation(isolation, brief=True)


def test_half_precision_rounding_and_ulps():
    r = rounding("bfloat16")
    x = np.array([1.0, 1 + 2 ** -9, 1 + 3 * 2 ** -9, 3.0e-39])
    assert r(x).tolist() == [1.0, 1.0, 1 + 2 ** -7, r(np.array([3.0e-39]))[0]]   # ties to even; subnormals kept
    assert rounding("float32")(x) is x
    assert ulps(np.array([1 + 2 ** -7, 2.0, 0.0]), np.array([1.0, 2.0, 2.0 ** -133]), "bfloat16").tolist() == \
        [1.0, 0.0, 1.0]   # one step at 1, none at 2; a bfloat16 subnormal step is 2^-133


def test_policies_judge_what_they_say():
    from qwen2np.golden.isolate import OpCheck

    check = OpCheck("model.layers.0.mlp.act", "k", 0, [], compared=10_000, rel=2e-5, off=0.001, beyond=0.0,
                    nmse_db=-80.0)
    policy_named("bfloat16").judge_isolation(check)
    assert check.ok and "≠" in check.limit
    check.off = 0.5
    policy_named("bfloat16").judge_isolation(check)
    assert not check.ok
    check.compared, check.off = 100, 0.02       # 2 elements of 100: within the floor of two elements
    policy_named("bfloat16").judge_isolation(check)
    assert check.ok
    check.off, check.rel = None, 3e-5
    policy_named("float32").judge_isolation(check)
    assert check.ok is False and check.limit == "rel ≤ 2.0e-05"
    check.name, check.position = "model.layers.0.self_attn.q_rope", 1000   # RoPE: + 1e-7 per position
    policy_named("float32").judge_isolation(check)
    assert check.ok and check.limit == "rel ≤ 1.0e-04"
    check.name = "model.layers.0.mlp.down_proj"
    policy_named("q4_k_m").judge_isolation(check)
    assert check.ok and check.limit == "NMSE ≤ -23 dB"   # 8-bit activations: -80 dB of local error is fine
    check.nmse_db = -10.0
    policy_named("q4_k_m").judge_isolation(check)
    assert not check.ok
    with pytest.raises(DumpError, match="expected one of float32, float64, bfloat16"):
        policy_named("int4")
    assert sorted(POLICIES) == ["bfloat16", "float16", "float32", "float64", "q4_k_m", "q8_0"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2np", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_the_compare_command_isolates(model, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    good = write_dump(record_dump(model, IDS, MASK, decode_steps=1), tmp_path / "good")
    with two_bugs(1, 3):
        bad = write_dump(record_dump(model, IDS, MASK, decode_steps=1), tmp_path / "bad")
    r = run_cli("compare", bad, good, "--isolate", "--model", tmp_path / "tiny", "--brief")
    assert r.returncode == 1, r.stderr
    assert f"ROOT CAUSES: 6 of {2 * len(model.intermediate_names())} operations are wrong on their own inputs: " \
           f"model.layers.1.self_attn.q_rope" in r.stdout
    r = run_cli("compare", good, "--isolate", "--model", tmp_path / "tiny", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["isolation"]["ok"] and report["comparison"] is None
    assert report["format_version"] == 2 and report["ok"] and report["explanation"] is None
    lone = write_dump(record_dump(model, IDS, MASK, include=["logits"]), tmp_path / "lone")
    r = run_cli("compare", lone, "--isolate", "--model", tmp_path / "tiny")
    assert r.returncode == 2 and "no operation can be isolated" in r.stderr and "needs model.norm" in r.stderr
    r = run_cli("compare", good, "--isolate")      # the manifest names no checkpoint (record_dump had no path)
    assert r.returncode == 2 and "give --model the port's checkpoint" in r.stderr
    r = run_cli("compare", good)
    assert r.returncode == 2 and "needs a reference dump B" in r.stderr
    r = run_cli("compare", good, good, "--policy", "int4")
    assert r.returncode == 2 and "policy 'int4'" in r.stderr


def test_a_hand_made_half_precision_dump(model):
    """A dump in bfloat16 written by a port: the weights rounded to bfloat16 are recognised by their
    fingerprint, and each operation rounded as the recipe says agrees exactly."""
    import ml_dtypes

    from qwen2np.golden.fingerprint import weights_fingerprint
    from qwen2np.golden.isolate import port_weights
    from qwen2np.golden.recipes import Context, rms_norm

    bf16 = {n: w.astype(ml_dtypes.bfloat16) for n, w in model.state_dict().items()}
    x = model.state_dict()["model.embed_tokens.weight"][[[3, 4]]].astype(ml_dtypes.bfloat16)   # [1, 2, D]
    description = {"weights_fingerprint": weights_fingerprint(bf16)}
    dump = new_dump(producer="hand", dtype="bfloat16", input_ids=[[3, 4]], model=description,
                    passes=[{"start": 0, "length": 2, "tensors": [("model.embed_tokens", x)]}])
    held = port_weights(model, dump)
    assert "rounded to bfloat16" in held.notes[0] and not held.differ
    w = held.weights["model.layers.0.input_layernorm.weight"]
    assert w.held == "bfloat16" and w.weight is model.state_dict()["model.layers.0.input_layernorm.weight"]
    ctx = Context(model.config, r=rounding(dump.dtype))              # no rounded copy held: rounded as read
    norm = rms_norm(ctx, np.asarray(x, np.float64), w)
    assert np.array_equal(norm, norm.astype(ml_dtypes.bfloat16).astype(np.float64))   # on the bfloat16 grid
    assert isolate_dump(dump, model).ok


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_qwen2np_s_own_half_precision_modes_are_correct_half_precision_implementations(model, tmp_path, dtype):
    """qwen2np computing in bfloat16 or float16 (another implementation of the recipe than transformers'):
    every operation agrees with its rounded recomputation, with the weights recognised rounded; and a
    planted 1e-3 error in one norm is named."""
    model.save_pretrained(tmp_path / "tiny")
    half = Qwen2ForCausalLM.from_pretrained(tmp_path / "tiny", dtype=dtype)
    ids = np.random.default_rng(1).integers(1, 48, (1, 40))
    isolation = isolate_dump(record_dump(half, ids, decode_steps=2), model)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)
    assert f"rounded to {dtype}" in isolation.notes[0]
    # subtle: the error must come before the rounding, as a bug in the arithmetic would; scaling the rounded
    # output by 1.001 changes nothing in bfloat16 (its half-step is 2e-3 to 4e-3)
    import qwen2np.model.modeling as modeling

    calls, original = [0], modeling.rms_norm
    per_pass = 2 * model.config.num_hidden_layers + 1        # two per layer, then the final norm

    def rms_norm(x, weight, eps):
        calls[0] += 1
        if (calls[0] - 1) % per_pass != 5:                   # layer 2's post_attention_layernorm
            return original(x, weight, eps)
        h = x.astype(np.float32)
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + np.float32(eps)) * np.float32(1.001)
        return weight * h.astype(x.dtype)

    modeling.rms_norm = rms_norm
    try:
        bad = record_dump(half, ids, decode_steps=2)
    finally:
        modeling.rms_norm = original
    assert root_causes(isolate_dump(bad, model)) == ["model.layers.2.post_attention_layernorm"]


@pytest.mark.oracle
def test_transformers_to_bfloat16_rounds_rope_s_inv_freq_and_isolation_names_it(dt, oracle, model, tmp_path):
    """A real half-precision trap: float32 then .to(bfloat16) also rounds the rotary embedding's inv_freq
    buffer, so every angle is off by up to 2^-9 relative. Isolation names the RoPE tables and nothing else;
    from_pretrained(dtype=torch.bfloat16), which keeps inv_freq in float32, is clean."""
    import torch

    model.save_pretrained(tmp_path / "tiny")
    ids = np.random.default_rng(0).integers(1, 48, (1, 40))
    converted = oracle.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32,
                                                            attn_implementation="eager").to(torch.bfloat16)
    assert converted.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    isolation = isolate_dump(dt.record_dump(converted.eval(), ids, decode_steps=2), model)
    assert root_causes(isolation) == ["model.rotary_emb.cos", "model.rotary_emb.sin"], \
        format_isolation(isolation, brief=True)
    loaded = dt.load_model(tmp_path / "tiny", "bfloat16")
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert isolate_dump(dt.record_dump(loaded, ids, decode_steps=2), model).ok


# -- the real checkpoint: half-precision ports from transformers ------------------------------------------


PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n' \
         "        a, b = b, a + b\n    return a\n\nprint([fibonacci(i) for i in range(10)])\n"


@pytest.fixture(scope="module")
def real_ids(real_tokenizer):
    return np.array([real_tokenizer(PROMPT)["input_ids"]])


@pytest.fixture(scope="module")
def real_reference(real_model, real_ids):
    """qwen2np float32 on the real checkpoint: at -120 dB from float64, a reference as good as float64 for
    half-precision ports (5 GB less memory)."""
    return record_dump(real_model, real_ids, decode_steps=2, fingerprint=None)


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
def test_two_independent_bugs_in_the_real_model_are_both_named(real_model, real_ids, real_reference):
    """The real checkpoint with interleaved RoPE pairs in layer 3 and GELU for SiLU in layer 9: compare stops
    at layer 3; isolation names exactly those operations, in the prefill and both decode steps."""
    with two_bugs(3, 9):
        bad = record_dump(real_model, real_ids, decode_steps=2)
    assert compare_dumps(bad, real_reference).first_failure.name == "model.layers.3.self_attn.q_rope"
    isolation = isolate_dump(bad, real_model)
    assert root_causes(isolation) == ["model.layers.3.self_attn.k_rope", "model.layers.3.self_attn.q_rope",
                                      "model.layers.9.mlp.act"], format_isolation(isolation, brief=True)
    assert len(isolation.root_causes) == 9 and not isolation.not_isolated


BOUND = r"""
import contextlib, io, json, sys, time
start, cpu = time.perf_counter(), time.process_time()
from qwen2np.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
report = json.loads(out.getvalue())
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
with open("/proc/loadavg") as f:
    load = float(f.read().split()[0])
print(json.dumps({"exit": code, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "peak": peak, "load": load, "isolation": report["isolation"]["seconds"],
                  "roots": len(report["isolation"]["root_causes"]),
                  "mistakes": sorted({r["mistake"] for r in report["isolation"]["root_causes"]})}))
"""


@pytest.mark.checkpoint
@pytest.mark.slow
def test_isolating_the_real_checkpoint_takes_under_a_minute_and_4_gb(real_model, real_ids, test_gguf, tmp_path):
    """`qwen2np compare mine/ --isolate --model test` on a port with two bugs, 2 decode steps, in a fresh
    process: the isolation (weights checked, every operation recomputed, the catalogue replayed on the 9 root
    causes) under 60 s, the catalogue at most doubling it, and the whole process (the checkpoint loaded as
    the command loads it, 2.5 GB of float32 weights) under 4 GB at its peak (VmHWM)."""
    with two_bugs(3, 9):
        record_dump(real_model, real_ids, decode_steps=2, out=tmp_path / "mine")
    r = subprocess.run([sys.executable, "-c", BOUND, "compare", str(tmp_path / "mine"), "--isolate", "--model",
                        str(test_gguf), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    print(m)
    assert m["exit"] == 1 and m["roots"] == 9
    assert m["mistakes"] == ["GELU (tanh) for SiLU", "pairs (2i, 2i+1) rotated, as GPT-J and GGML's normal RoPE, "
                                                     "instead of halves (i, i + HD/2)"]
    isolation = sum(m["isolation"].values())
    # wall clock; on a machine shared with other jobs (load above its cores) it measures them too, and the
    # whole process's CPU time (the checkpoint's loading included) bounds the isolation's work instead
    assert isolation < 60 or m["load"] > os.cpu_count() and m["cpu"] < 60, m
    assert m["isolation"]["catalogue"] <= isolation - m["isolation"]["catalogue"], m   # at most 2x
    assert m["peak"] < 4e9, m


def eps_outside_the_root(model):
    """Layer 0's input RMSNorm computing x / (sqrt(mean(x²)) + eps) instead of x / sqrt(mean(x²) + eps)."""
    import torch

    norm = model.model.layers[0].input_layernorm

    def forward(hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h / (h.pow(2).mean(-1, keepdim=True).sqrt() + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    patch = contextlib.ExitStack()
    patch.callback(setattr, norm, "forward", norm.forward)
    norm.forward = forward
    return patch


def rope_theta_low(model):
    """RoPE with θ = 999000 instead of 1e6 (0.1 % low): inv_freq = θ^(-2i/HD) of the wrong θ."""
    import torch

    rotary = model.model.rotary_emb
    HD = 2 * rotary.inv_freq.numel()
    patch = contextlib.ExitStack()
    patch.callback(setattr, rotary, "inv_freq", rotary.inv_freq)
    rotary.inv_freq = rotary.inv_freq * (1e6 / 999000) ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    return patch


BF16_BUGS = {"eps outside the square root": (eps_outside_the_root, ["model.layers.0.input_layernorm"]),
             "rope theta 0.1% low": (rope_theta_low, ["model.rotary_emb.cos", "model.rotary_emb.sin"])}


@pytest.fixture(scope="module")
def half_ports(oracle, dt, test_gguf, real_ids):
    """Dumps of transformers' half-precision models of the real checkpoint (from_pretrained(dtype=...)):
    bfloat16 as it is ("correct") and with each planted bug, and float16; each model is let go before the
    next is loaded and before the tests isolate the dumps."""
    import gc

    import torch
    from conftest import transformers_checkpoint_folder

    folder = transformers_checkpoint_folder(oracle, test_gguf)
    model = oracle.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    dumps = {"correct": dt.record_dump(model.eval(), real_ids, decode_steps=2)}
    for bug, (plant, _) in BF16_BUGS.items():
        with plant(model):
            dumps[bug] = dt.record_dump(model, real_ids, decode_steps=2)
    del model
    gc.collect()
    model = oracle.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, attn_implementation="eager")
    dumps["float16"] = dt.record_dump(model.eval(), real_ids, decode_steps=2)
    del model
    gc.collect()
    return dumps


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_transformers_in_half_precision_is_a_correct_half_precision_implementation(half_ports, real_model,
                                                                                    real_reference, dtype):
    dump = half_ports["correct" if dtype == "bfloat16" else dtype]
    assert dump.dtype == dtype
    c = compare_dumps(dump, real_reference)
    assert c.policy.name == dtype and c.ok, format_report(c, brief=True)
    assert not compare_dumps(dump, real_reference, policy="float32").ok     # the float32 policy is not for it
    isolation = isolate_dump(dump, real_model)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)
    assert f"rounded to {dtype}" in isolation.notes[0]


@pytest.mark.oracle
@pytest.mark.checkpoint
@pytest.mark.slow
@pytest.mark.parametrize("bug", list(BF16_BUGS))
def test_a_bfloat16_bug_at_the_per_mille_level_is_isolated(half_ports, real_model, real_reference, bug):
    """Two planted bugs far below bfloat16's rounding step (4e-3), in transformers' own bfloat16 model: the
    comparison with a reference cannot tell them from rounding, isolation in the port's precision names
    exactly the tensors they make, in every pass."""
    dump = half_ports[bug]
    isolation = isolate_dump(dump, real_model)
    assert root_causes(isolation) == BF16_BUGS[bug][1], format_isolation(isolation, brief=True)
    assert {c.pass_index for c in isolation.root_causes} == {0, 1, 2}
    print(format_isolation(isolation, brief=True))
    print(format_report(compare_dumps(dump, real_reference), brief=True))
