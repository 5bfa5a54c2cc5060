"""Comparing dumps (qwen2np/golden/compare.py, `qwen2np compare`): the metrics, the first divergence, padding,
refusals, the tolerance policy, exit codes; and a tiny model against the transformers dump script."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import DumpError
from qwen2np.golden.compare import compare_dumps, compare_tensor
from qwen2np.golden.dump import DumpWriter, new_dump, write_dump
from qwen2np.golden.manifest import FORMAT, FORMAT_VERSION
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.metrics import top_k_agreement
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation, format_report
from qwen2np.golden.tolerances import TOLERANCES, kind_of, parse_tolerance, tolerance_for

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)
IDS = [[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]]
MASK = [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=7)


def perturbed(model, name, change):
    """A copy of `model` sharing every array but `name`, which `change` replaces."""
    copy = Qwen2ForCausalLM._from_params(model.config, dict(model.params), model.dtype)
    copy.load_state_dict({name: change(model.state_dict()[name].copy())}, strict=False)
    return copy


@settings(max_examples=40)
@given(a=arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)), scale=st.floats(-1e-3, 1e-3))
@example(a=np.array([4907.0, 0.0]), scale=1.4273844909105372e-158)   # error energy below float range: log10(0)
@example(a=np.array([-2.22044605e-16, -2.22044605e-16]), scale=-0.00035007664054390096)   # NMSE near 0 dB
def test_metrics_follow_their_definitions(a, scale):
    b = a + scale * np.cos(np.arange(a.size))
    t = compare_tensor("model.norm", "model.norm", 0, a, b, None, 1e-4)
    err = np.abs(a - b)
    assert t.max_abs == err.max() and math.isclose(t.mean_abs, err.mean(), rel_tol=1e-12, abs_tol=1e-300)
    peak = max(np.abs(a).max(), np.abs(b).max())
    assert t.rel == (0.0 if err.max() == 0 else err.max() / peak if peak else math.inf)
    if not err.any():
        assert t.nmse_db is None
    elif b.any():   # the exact ratio of the two energies, in rationals (floats would underflow)
        ratio = sum(Fraction(float(e)) ** 2 for e in err) / sum(Fraction(float(v)) ** 2 for v in b)
        exact = 10 * (math.log10(ratio.numerator) - math.log10(ratio.denominator))
        assert math.isclose(t.nmse_db, exact, rel_tol=1e-9, abs_tol=1e-9)   # dB: near 0 dB, absolute
    assert t.ok == (t.rel <= 1e-4)
    assert compare_tensor("model.norm", "k", 0, b, a, None, 1e-4).rel == t.rel   # symmetric


def test_non_finite_values_fail():
    a = np.ones((1, 2, 3))
    b = a.copy()
    b[0, 1, 2] = np.nan
    t = compare_tensor("model.norm", "model.norm", 0, a, b, None, 1.0)
    assert t.rel == math.inf and not t.ok
    same = compare_tensor("model.norm", "model.norm", 0, b, b.copy(), None, 0.0)
    assert same.ok and same.max_abs == 0   # NaN where the other has NaN: the rest is compared


def test_top_k_agreement():
    x = np.array([[0.0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]])
    y = x.copy()
    y[1, [0, 1]] = y[1, [1, 0]]          # row 1: best token changes, top-5 set does not
    assert top_k_agreement(x, y) == (0.5, 1.0)
    y[0, [2, 1]] = [0.5, 2]              # row 0: the 5 best stay {2..6}? no: 1 now beats 2
    assert top_k_agreement(x, y) == (0.5, 0.5)


def test_tolerance_policy_and_overrides():
    assert kind_of("model.layers.12.self_attn.probs") == "self_attn.probs" and kind_of("layers.0") == "layer"
    assert tolerance_for("model.layers.3.self_attn.probs", "float32") == TOLERANCES["float32"]["self_attn.probs"]
    assert tolerance_for("model.layers.3.mlp.act", "float64") == TOLERANCES["float64"]["*"]
    assert tolerance_for("model.embed_tokens", "float32") == 0.0
    assert tolerance_for("logits", "float32", [parse_tolerance("1e-2"), parse_tolerance("logits=3")]) == 3.0
    with pytest.raises(ValueError, match="expected a number or GLOB=NUMBER"):
        parse_tolerance("logits=big")


def test_identical_dumps_agree_exactly(model):
    dump = record_dump(model, IDS, MASK, decode_steps=2, fingerprint=None)
    c = compare_dumps(dump, dump)
    assert c.ok and c.first_failure is None and all(t.max_abs == 0 and t.nmse_db is None for t in c.tensors)
    assert len(c.tensors) == 3 * len(model.intermediate_names()) == 129
    assert "ok: all 129 tensors within tolerance" in format_report(c)


@pytest.mark.parametrize("weight, first", [
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj"),
    ("model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.k_proj"),
    ("model.layers.0.post_attention_layernorm.weight", "model.layers.0.post_attention_layernorm"),
    ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.head_out"),   # each head's share of o_proj
    ("model.norm.weight", "model.norm"),
    ("lm_head.weight", "logits"),
])
def test_a_planted_error_is_found_where_it_is(model, weight, first):
    """Perturb one weight by 1% of its scale at one element: the first divergence is the tensor it makes,
    and the note names the weight (from the fingerprints)."""
    def change(w):
        w.reshape(-1)[3] += 0.01 * np.abs(w).max() + 0.01
        return w

    good = record_dump(model, IDS, MASK)
    bad = record_dump(perturbed(model, weight, change), IDS, MASK)
    c = compare_dumps(bad, good)
    assert not c.ok and c.first_failure.name == first
    assert c.notes == [f"the weights differ: 1 of them ({weight})"]
    assert f"the first, in forward order, is {first} " in format_report(c, brief=True)


def test_padding_positions_are_not_compared(model):
    """Values at left-padding positions may differ (they are backend-dependent); real positions may not."""
    good = record_dump(model, IDS, MASK, fingerprint=None)

    def tampered(where):
        tensors = {k: a.copy() for k, a in good.tensors.items()}
        for key in ("model.layers.1.mlp.act", "logits"):
            tensors[key][where] += 1.0
        probs = tensors["model.layers.1.self_attn.probs"]     # [B, H, T, S]
        probs[(1, slice(None)) + ((slice(None), 0) if where == (1, 0) else (3, 3))] += 1.0
        return new_dump(producer="tampered", dtype="float32", input_ids=IDS, attention_mask=MASK,
                        passes=[{"start": 0, "length": 6, "tensors": [(n, tensors[n]) for n in good.names()]}])

    assert compare_dumps(tampered((1, 0)), good).ok            # row 1, position 0 is padding (and key 0 in probs)
    c = compare_dumps(tampered((1, 3)), good)                  # a real position
    assert [t.name for t in c.tensors if not t.ok] == ["model.layers.1.self_attn.probs", "model.layers.1.mlp.act", "logits"]


def test_dumps_of_different_inputs_are_refused(model):
    a = record_dump(model, IDS, MASK, fingerprint=None)
    with pytest.raises(DumpError, match=r"different token ids \(first difference at \[row, position\] \[0, 5\]\)"):
        compare_dumps(a, record_dump(model, [IDS[0][:5] + [1], IDS[1]], MASK, fingerprint=None))
    with pytest.raises(DumpError, match="different token ids \\(shapes"):
        compare_dumps(a, record_dump(model, [IDS[0]], fingerprint=None))
    with pytest.raises(DumpError, match="different attention masks"):
        compare_dumps(a, record_dump(model, IDS, None, fingerprint=None))
    with pytest.raises(DumpError, match="different forward passes"):
        compare_dumps(a, record_dump(model, IDS, MASK, decode_steps=1, fingerprint=None))
    with pytest.raises(DumpError, match="different prompts"):
        compare_dumps(record_dump(model, [[1, 2]], prompt="a", fingerprint=None),
                      record_dump(model, [[1, 2]], prompt="b", fingerprint=None))
    x = new_dump(producer="x", dtype="float32", input_ids=[[1]], passes=[{"start": 0, "length": 1, "tensors": [
        ("logits", np.zeros((1, 1, 4), np.float32))]}])
    y = new_dump(producer="y", dtype="float32", input_ids=[[1]], passes=[{"start": 0, "length": 1, "tensors": [
        ("logits", np.zeros((1, 1, 5), np.float32))]}])
    with pytest.raises(DumpError, match=r"logits: shape \[1, 1, 4\] in A but \[1, 1, 5\] in B"):
        compare_dumps(x, y)


def test_names_in_one_dump_only_are_listed(model):
    a = record_dump(model, IDS, MASK, include=["model.layers.1.*", "logits"], fingerprint=None)
    b = record_dump(model, IDS, MASK, include=["logits", "model.norm"], fingerprint=None)
    c = compare_dumps(a, b)
    assert [t.name for t in c.tensors] == ["logits"] and "model.norm" in c.only_in_b and len(c.only_in_a) == 18


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2np", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_the_compare_command_exit_codes_and_json(model, tmp_path):
    good = write_dump(record_dump(model, IDS, MASK), tmp_path / "good")
    bad = write_dump(record_dump(perturbed(model, "model.layers.1.mlp.up_proj.weight", lambda w: w * 1.01), IDS, MASK),
                     tmp_path / "bad")
    other = write_dump(record_dump(model, [IDS[0]]), tmp_path / "other")
    r = run_cli("compare", good, good)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok: all 43 tensors within tolerance"), r.stdout + r.stderr
    r = run_cli("compare", bad, good, "--brief")
    assert r.returncode == 1
    assert "the first, in forward order, is model.layers.1.mlp.up_proj" in r.stdout
    assert "note: the weights differ: 1 of them (model.layers.1.mlp.up_proj.weight)" in r.stdout
    r = run_cli("compare", bad, good, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False and report["exit_status"] == 1
    assert (report["format"], report["format_version"], report["isolation"], report["swapped"]) == \
        ("qwen2np-compare", 2, None, False)
    assert report["comparison"]["first_failure"] == "model.layers.1.mlp.up_proj"
    assert [t["name"] for t in report["comparison"]["tensors"]][:3] == ["model.embed_tokens", "model.rotary_emb.cos",
                                                                         "model.rotary_emb.sin"]
    assert run_cli("compare", bad, good, "--tolerance", "1").returncode == 0
    assert run_cli("compare", bad, good, "--tolerance", "1", "--tolerance", "logits=0").returncode == 1
    r = run_cli("compare", good, other)
    assert r.returncode == 2 and "different token ids" in r.stderr
    r = run_cli("compare", good, tmp_path / "missing")
    assert r.returncode == 2 and "not a dump" in r.stderr
    r = run_cli("compare", good, good, "--tolerance", "x")
    assert r.returncode == 2 and "expected a number or GLOB=NUMBER" in r.stderr


def test_compare_exits_2_for_what_is_not_a_verdict(model, tmp_path):
    """0 and 1 are verdicts, read by a port's CI; a manifest it cannot read, or a report it cannot write, is
    status 2 and one line (an id of 2**70, a manifest nested 100k deep, a full stdout or a broken pipe
    exited 1 before)."""
    good = write_dump(record_dump(model, IDS, MASK, include=["logits"], fingerprint=None), tmp_path / "good")
    manifest = json.loads((good / "manifest.json").read_text())
    big, negative = json.loads(json.dumps(manifest)), json.loads(json.dumps(manifest))
    big["input_ids"][1][3], negative["input_ids"][0][0] = 2**70, -5
    texts = {"big": json.dumps(big), "negative": json.dumps(negative), "deep": "[" * 100_000 + "]" * 100_000}
    for name, text in texts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tensors.safetensors").write_bytes((good / "tensors.safetensors").read_bytes())
        (folder / "manifest.json").write_text(text)
    for name, message in [("big", "input_ids[1][3]: expected a token id, 0 <= id < 2**63, found 1180591620717411303424"),
                          ("negative", "input_ids[0][0]: expected a token id, 0 <= id < 2**63, found -5"),
                          ("deep", "manifest.json: nested too deeply for a manifest")]:
        r = run_cli("compare", tmp_path / name, good)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert r.stderr.startswith(f"qwen2np compare: error: {tmp_path / name}"), r.stderr
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "qwen2np", "compare", str(good), str(good)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == "qwen2np compare: error: cannot write to stdout: No space left on device\n"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "qwen2np", "compare", str(good), str(good)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 2 and r.stderr == "qwen2np compare: error: cannot write to stdout: Broken pipe\n"


def test_the_reports_read_right_in_the_singular(model):
    one = record_dump(model, IDS, MASK, include=["logits"], fingerprint=None)
    assert format_report(compare_dumps(one, one)).endswith("\nok: 1 tensor within tolerance")
    off = new_dump(producer="off", dtype="float32", input_ids=IDS, attention_mask=MASK, passes=[
        {"start": 0, "length": 6, "tensors": [("logits", one["logits"] * np.float32(1.5)), ("model.norm", one["logits"])]}])
    report = format_report(compare_dumps(off, one))
    assert "\nnot compared: 1 tensor only in A, 0 only in B " in report
    assert "\nFAIL: 1 of 1 tensor out of tolerance; the first, in forward order, is logits " in report
    assert "\nFAIL: 1 of 1 tensor is beyond what a correct bfloat16 implementation reaches: logits" in \
        format_report(compare_dumps(off, one, policy="bfloat16"))
    assert format_report(compare_dumps(one, one, policy="bfloat16")).endswith(
        "\nok: consistent with a correct bfloat16 implementation (1 tensor within the bfloat16 policy)")

    include = ["model.layers.1", "model.norm"]   # the final norm is isolated, the last layer is not (no inputs)
    good = record_dump(model, IDS, MASK, include=include, fingerprint=None)
    report = format_isolation(isolate_dump(good, model), brief=True)
    assert "\nnot isolated: 1 tensor whose inputs A does not record (e.g. model.layers.1: needs " in report
    assert report.endswith("\nok: 1 operation isolated agrees with its recomputation (float32 policy)")
    bad = record_dump(perturbed(model, "model.norm.weight", lambda w: w * 1.5), IDS, MASK, include=include,
                      fingerprint=None)
    report = format_isolation(isolate_dump(bad, model), comparison=compare_dumps(bad, good))
    assert "\nROOT CAUSES: 1 of 1 operation is wrong on its own inputs: model.norm (rel " in report
    assert report.endswith("\nof the 1 tensor out of tolerance against B, 1 is a root cause; 0 inherit an error "
                           "from upstream")


MEASURE_COMPARE = r"""
import json, os, sys
from qwen2np.cli import main
import qwen2np.cli.compare   # all that compare imports, before the baseline

def status(key):  # bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

baseline = status("VmRSS")
sys.stdout = open(os.devnull, "w")
code = main(["compare", *sys.argv[1:]])
print(json.dumps({"code": code, "baseline": baseline, "peak": status("VmHWM")}), file=sys.stderr)
"""


@pytest.mark.slow
def test_compare_reads_a_large_tensor_in_blocks(tmp_path):
    """The peak memory of `qwen2np compare` stays under 2x its largest tensor plus a fixed overhead (it was
    10x: 1.56 GB above the baseline for the 156 MB logits here), so that what `dump` writes on a machine,
    `compare` reads there. Measured in a fresh process, from the kernel's VmHWM (as
    tests/weights/test_loading_peak_memory.py does: ru_maxrss would carry pytest's)."""
    shape = (1, 256, 151936)   # the logits of 256 positions over Qwen2's vocabulary: 156 MB in float32
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(shape, dtype=np.float32) * np.float32(4)   # peaked, as logits are
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float32", "producer": "test",
                "input_ids": [[1] * shape[1]], "passes": [{"start": 0, "length": shape[1], "tensors": [
                    {"name": "logits", "key": "logits", "shape": list(shape), "dtype": "float32"}]}]}
    for name in ("a", "b"):
        with DumpWriter(tmp_path / name) as writer:
            writer.add("logits", logits)
            writer.finish(manifest)
        logits += np.float32(1e-3) * rng.standard_normal(shape, dtype=np.float32)
    del logits
    r = subprocess.run([sys.executable, "-c", MEASURE_COMPARE, str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stderr.strip().splitlines()[-1])
    used, size = m["peak"] - m["baseline"], 4 * math.prod(shape)
    assert m["code"] == 1, m   # out of tolerance: the comparison ran to its verdict
    assert used <= 2 * size + FIXED_OVERHEAD, (used, size)
    assert used < size, (used, size)   # what reading in blocks gives: not even one copy of the tensor


FIXED_OVERHEAD = 128 * 2**20   # bytes: the blocks in flight (metrics.BLOCK elements, float64, a few times over)


# -- against transformers, on a tiny random model (the real checkpoint: test_inspection_checkpoint.py) ---


@pytest.mark.oracle
def test_a_tiny_model_matches_the_transformers_dump(dt, model, tmp_path):
    """Every intermediate, through padding and decode steps, within the float32 policy; the config and the
    weights fingerprints are equal on both sides."""
    model.save_pretrained(tmp_path / "tiny")
    theirs = dt.record_dump(dt.load_model(tmp_path / "tiny"), IDS, MASK, decode_steps=2)
    ours = record_dump(model, IDS, MASK, decode_steps=2)
    assert [e["key"] for _, e in theirs.entries()] == [e["key"] for _, e in ours.entries()]   # same names, order
    c = compare_dumps(ours, theirs)
    assert c.ok, format_report(c, brief=True)
    assert c.notes == []   # same config, same weights
    assert max(t.rel for t in c.tensors) > 0                   # two implementations, not one compared with itself


@pytest.mark.oracle
@pytest.mark.slow
def test_the_transformers_script_end_to_end(oracle, model, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    script = [sys.executable, str(ROOT / "scripts" / "dump_transformers.py"), "--model", str(tmp_path / "tiny")]
    r = subprocess.run(script + ["--ids", json.dumps(IDS), "--attention-mask", json.dumps(MASK), "--out",
                                 str(tmp_path / "theirs")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_cli("dump", "--model", tmp_path / "tiny", "--ids", json.dumps(IDS), "--attention-mask", json.dumps(MASK),
                "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    r = run_cli("compare", tmp_path / "ours", tmp_path / "theirs")
    assert r.returncode == 0, r.stdout
    r = subprocess.run(script + ["--ids", "1,2", "--include", "nothing.*", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "matches no intermediate" in r.stderr


def test_correct_float32_rope_tables_pass_against_float64_at_every_position():
    """A float32 RoPE table computes its angles position · inv_freq in float32: its error grows with the
    position (the test checkpoint's θ and head size: 2.2e-6 at position 60, scripts/measure_rope_tables.py).
    compare once failed a correct float32 dump against a float64 one there (tolerance 1e-6 flat)."""
    config = Qwen2Config(vocab_size=48, hidden_size=128, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_parameters={"rope_type": "default",
                                                                                         "rope_theta": 1e6})
    ids = [np.arange(70) % 48]
    f32 = Qwen2ForCausalLM(config, seed=1)
    f64 = Qwen2ForCausalLM._from_params(config, {n: w.astype(np.float64) for n, w in f32.params.items()}, "float64")
    tables = ["model.rotary_emb.cos", "model.rotary_emb.sin"]
    c = compare_dumps(record_dump(f32, ids, include=tables, decode_steps=2), record_dump(f64, ids, include=tables,
                                                                                       decode_steps=2))
    assert c.ok, format_report(c)
    assert max(t.rel for t in c.tensors) > 1e-6          # beyond the old flat tolerance: what it failed
    assert [t.tolerance for t in c.tensors] == pytest.approx([1e-6 + 1e-7 * p for p in (67, 67, 68, 68, 69, 69)])
    wrong = compare_dumps(record_dump(f32, ids, include=tables), record_dump(
        Qwen2ForCausalLM._from_params(Qwen2Config(**{**config.to_dict(), "rope_parameters": {
            "rope_type": "default", "rope_theta": 1e6 * 0.999}}), f64.params, "float64"), ids, include=tables))
    assert not wrong.ok                                  # θ 0.1 % off is still out of tolerance
