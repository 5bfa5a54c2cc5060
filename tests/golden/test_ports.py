"""Isolation on the ports people actually write (issue 16): fused attention with nothing between q, k, v and
the context to dump, their own half-precision rounding orders, their own layouts, scores taken after the
mask, a context stored merged (HD, H), a weight lost in conversion, the dumps given in the other order.
The ports are tests/support/ports.py: NumPy, sharing no code with qwen2np's model or the golden recipes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.diagnosis import explain
from qwen2np.golden.dump import write_dump
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation, format_report
from support.ports import port_dump

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})
IDS = [[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16]]
MASK = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]


def with_random_biases_and_norms(model, seed=0):
    """A random model's biases are zeros and its norms ones: give them values, so that a missing bias or a
    norm rounded in another order shows."""
    rng = np.random.default_rng(seed)
    model.load_state_dict({n: (rng.standard_normal(w.shape) * 0.3 + (1 if "norm" in n else 0)).astype(np.float32)
                           for n, w in model.state_dict().items() if n.endswith("bias") or "norm" in n}, strict=False)
    return model


@pytest.fixture(scope="module")
def model():
    return with_random_biases_and_norms(Qwen2ForCausalLM(Qwen2Config(**TINY), seed=11))


@pytest.fixture(scope="module")
def golden(model):
    return record_dump(model, IDS, MASK, decode_steps=2, fingerprint=None)


def roots(isolation):
    return sorted({c.name for c in isolation.root_causes})


def layers(kind, n=4):
    return [f"model.layers.{l}.{kind}" for l in range(n)]


# -- fused attention: no scores, no probs -------------------------------------------------------------


def test_a_fused_attention_port_is_isolated_without_probs(model, golden):
    """The context is recomputed from the port's own q_rope, cached k_rope and v_proj, every pass."""
    dump = port_dump(model, IDS, MASK, decode_steps=2, fused=True)
    assert not any(n.endswith(("scores", "probs", "mask")) for n in dump.names())
    isolation = isolate_dump(dump, model)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)
    context = next(c for c in isolation.checks if c.key == "model.layers.2.self_attn.context@2")
    assert context.inputs == ["model.layers.2.self_attn.q_rope@2"] + [
        f"model.layers.2.self_attn.{n}{p}" for n in ("k_rope", "v_proj") for p in ("", "@1", "@2")]
    assert compare_dumps(dump, golden).ok


def test_a_gqa_bug_in_a_fused_port_is_named(model, golden):
    """Query head h reading KV head h % KV: once "ok: … 0 are root causes; 702 inherit an error from
    upstream"; now the context of every layer and pass, and the mistake that reproduces it."""
    dump = port_dump(model, IDS, MASK, decode_steps=2, fused=True, mistakes=["gqa_tile"])
    isolation = isolate_dump(dump, model)
    assert roots(isolation) == layers("self_attn.context")
    assert len(isolation.root_causes) == 12
    assert {c.mistake for c in isolation.root_causes} == {"KV head h % KV (tile) instead of h // G (repeat) (in the "
                                                          "fused attention)"}
    report = format_isolation(isolation, brief=True, comparison=compare_dumps(dump, golden))
    assert "reproduced exactly by KV head h % KV (tile)" in report and "\nok:" not in report


def test_the_first_failure_that_cannot_be_isolated_is_the_probable_root_cause(model, golden):
    """A fused port that dumps no q_rope or k_rope: its context cannot be recomputed. The verdict never says
    ok, nor that the failures inherit an error, when the first failing tensor was not itself isolated."""
    names = [n for n in golden.names() if not n.endswith(("q_rope", "k_rope"))]
    dump = port_dump(model, IDS, MASK, decode_steps=2, fused=True, mistakes=["gqa_tile"], include=names)
    isolation = isolate_dump(dump, model)
    assert isolation.ok                                        # every operation isolated agrees ...
    comparison = compare_dumps(dump, golden)
    e = explain(isolation, comparison)
    assert e.probable == [("model.layers.0.self_attn.context",
                           "needs model.layers.0.self_attn.q_rope, which A does not record")]
    assert not e.inherited and not e.root_causes
    report = format_isolation(isolation, brief=True, comparison=comparison)
    assert "PROBABLE ROOT CAUSE: model.layers.0.self_attn.context: the first tensor out of tolerance against B, " \
           "and not isolated (needs model.layers.0.self_attn.q_rope, which A does not record)" in report
    assert "\nok:" not in report and "inherit an error from upstream" not in report
    assert "downstream of the probable root cause" in report
    clean = port_dump(model, IDS, MASK, decode_steps=2, fused=True, include=names)
    assert "PROBABLE" not in format_isolation(isolate_dump(clean, model), comparison=compare_dumps(clean, golden))


# -- conventions: layouts, masked scores, a layout mistake in the dump ----------------------------------


def test_token_first_layouts_are_read_with_a_note(model, golden):
    """keras-hub, TransformerLens and C ports keep per-head tensors token-first [B, T, H, HD]: read as such
    (once a shape error that stopped everything), and a bug in them still named."""
    dump = port_dump(model, IDS, MASK, decode_steps=2, layout="token-first")
    assert dump["model.layers.0.self_attn.q_rope"].shape == (2, 7 - 2, 4, 8)
    isolation = isolate_dump(dump, model)
    assert isolation.ok and not isolation.not_isolated
    assert "self_attn.q_rope stored [B, T, H, HD]: read as qwen2np lays it out" in isolation.notes
    comparison = compare_dumps(dump, golden)
    assert comparison.ok and "A's self_attn.k_rope stored [B, T, KV, HD]: compared as B lays it out" in comparison.notes
    bad = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, layout="token-first",
                                 mistakes=["interleaved_rope"]), model)
    assert roots(bad) == sorted(layers("self_attn.q_rope") + layers("self_attn.k_rope"))


def test_scores_taken_after_the_mask_are_recognised(model, golden):
    """TransformerLens' hook_attn_scores: −inf where the mask hides a key. Once 24 "ROOT CAUSE rel inf"."""
    dump = port_dump(model, IDS, MASK, decode_steps=2, masked_scores=True)
    assert np.isneginf(dump["model.layers.0.self_attn.scores"]).any()
    isolation = isolate_dump(dump, model)
    assert isolation.ok, format_isolation(isolation, brief=True)
    scores = next(c for c in isolation.checks if c.key == "model.layers.1.self_attn.scores")
    assert scores.notes == ["scores recorded after the mask (−inf or finfo.min where a key is hidden): compared "
                            "where keys are allowed"]
    comparison = compare_dumps(dump, golden)
    assert comparison.ok, format_report(comparison, brief=True)
    bad = port_dump(model, IDS, MASK, decode_steps=2, masked_scores=True, mistakes=["scale_hd"])
    assert roots(isolate_dump(bad, model)) == layers("self_attn.scores")


def test_a_context_stored_merged_dims_first_is_a_layout_mistake_in_the_dump(model, golden):
    """The port computes right and its dump writer merges the heads (HD, H): the context fails, and its
    consumer o_proj, recomputed from it, too (once both were blamed). Restored, o_proj agrees: a layout
    mistake in the dump, not a bug in the port. The same merge done by the port's forward pass is its bug."""
    isolation = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, dump_merge=True), model)
    assert isolation.ok and not isolation.root_causes, format_isolation(isolation, brief=True)
    assert sorted({c.name for c in isolation.dump_layouts}) == layers("self_attn.context")
    layout = isolation.dump_layouts[0].layout
    assert layout.startswith("stored with its heads merged (HD, H) in the dump; the port computed with qwen2np's "
                             "layout (model.layers.0.self_attn.o_proj")
    assert "DUMP LAYOUT: model.layers.0.self_attn.context: stored with its heads merged" in \
        format_isolation(isolation, brief=True)
    bug = isolate_dump(port_dump(model, IDS, MASK, decode_steps=2, mistakes=["merge_dims_first"]), model)
    assert roots(bug) == layers("self_attn.context") and not bug.dump_layouts
    assert {c.mistake for c in bug.root_causes} == {"heads merged (HD, H) instead of (H, HD)"}


# -- weights lost in conversion; dumps given in the other order ----------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2np", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_a_weight_lost_in_the_port_s_conversion_is_named_and_isolation_goes_on(model, tmp_path):
    """Once exit 2, "give --model the port's own checkpoint": wrong advice there. Now the weight is listed,
    the operation reading it is the root cause, and the mistake it makes is named."""
    bias = "model.layers.1.self_attn.k_proj.bias"
    dump = port_dump(model, IDS, MASK, decode_steps=2, lost=[bias])
    isolation = isolate_dump(dump, model)
    assert f"{bias} (differs from A's fingerprint)" in isolation.notes[1]
    assert "your port's weights differ from the checkpoint in 1 of 51" in isolation.notes[1]
    assert roots(isolation) == ["model.layers.1.self_attn.k_proj"]
    c = isolation.root_causes[0]
    assert c.mistake == "k_proj without its bias" and c.notes == [f"reads {bias}, which differs from A's fingerprint"]
    model.save_pretrained(tmp_path / "tiny")
    write_dump(dump, tmp_path / "port")
    r = run_cli("compare", tmp_path / "port", "--isolate", "--model", tmp_path / "tiny", "--brief")
    assert r.returncode == 1, r.stderr
    assert "model.layers.1.self_attn.k_proj (passes 0, 1, 2): reproduced exactly by k_proj without its bias" in r.stdout


def test_dumps_given_in_the_other_order_are_swapped_with_a_note(model, tmp_path):
    """`compare golden/ mine/ --isolate` once isolated the golden dump (all ok) and named nothing."""
    model.save_pretrained(tmp_path / "tiny")
    golden = write_dump(record_dump(model, IDS, MASK, decode_steps=1, model_path=str(tmp_path / "tiny")),
                        tmp_path / "golden")
    mine = write_dump(port_dump(model, IDS, MASK, decode_steps=1, mistakes=["gelu"]), tmp_path / "mine")
    r = run_cli("compare", golden, mine, "--isolate", "--brief")     # --model from the reference's manifest
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith(f"note: the dumps were given in the other order: {golden} is a qwen2np dump and "
                               f"{mine} is not (a numpy port (transformers)): {mine} is taken as the port (A)")
    assert f"isolation of {mine}" in r.stdout
    assert "model.layers.0.mlp.act (passes 0, 1): reproduced exactly by GELU (tanh) for SiLU" in r.stdout
    report = json.loads(run_cli("compare", golden, mine, "--isolate", "--json").stdout)
    assert report["swapped"] and report["a"].startswith(str(mine))
    assert report["explanation"]["root_causes"][:1] == ["model.layers.0.mlp.act"]


# -- half precision: the frameworks' own rounding orders ------------------------------------------------

# eps at the scale of a 1e-3 bug when placed outside the root; θ whose 0.1 % shows over 40 positions of HD = 8
HALF = dict(TINY, rms_norm_eps=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
LONG = [list(np.random.default_rng(1).integers(1, 48, 40))]


@pytest.fixture(scope="module")
def half_model():
    return with_random_biases_and_norms(Qwen2ForCausalLM(Qwen2Config(**HALF), seed=5), seed=1)


ORDERS = {
    "mlx": ["RMSNorm rounded once, after the weight (as keras-hub and mlx-lm)",
            "RoPE rounded once (a fused kernel, as mlx-lm)", "RoPE tables kept in float32 (as a fused RoPE kernel)",
            "x · sigmoid(x) rounded step by step, the sigmoid from a rounded exp(|x|), then the product by up "
            "(as mlx-lm on CPU)"],
    "keras": ["the bias added after the product's rounding (as keras-hub)",
              "RMSNorm rounded once, after the weight (as keras-hub and mlx-lm)",
              "the queries scaled before the product (as keras-hub)",
              "silu(gate) rounded before the product by up (as keras-hub)"],
}


@pytest.mark.parametrize("style", ["mlx", "keras"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_correct_half_precision_port_passes_in_its_own_rounding_orders(half_model, style, dtype):
    """Once 72 (mlx-lm) and 435 (keras-hub) root causes in a correct bfloat16 port: each framework rounds in
    its own legitimate order. Each is accepted, and reported."""
    isolation = isolate_dump(port_dump(half_model, LONG, decode_steps=2, dtype=dtype, style=style), half_model)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)
    report = format_isolation(isolation, brief=True)
    for order in ORDERS[style]:
        assert f"rounding order: {order}" in report


@pytest.mark.parametrize("style", ["transformers", "mlx", "keras"])
@pytest.mark.parametrize("bug, expected", [
    ("eps_outside_input_0", ["model.layers.0.input_layernorm"]),
    ("theta_low", {"transformers": ["model.rotary_emb.cos", "model.rotary_emb.sin"],
                   "keras": ["model.rotary_emb.cos", "model.rotary_emb.sin"],
                   "mlx": sorted(layers("self_attn.q_rope") + layers("self_attn.k_rope"))}),
])
def test_a_per_mille_bug_in_a_half_precision_port_is_named_alone(half_model, style, bug, expected):
    """A bug at the 1e-3 level, a quarter of bfloat16's step, in a port rounding in its own orders: named,
    and nothing else (the legitimate orders do not hide it, and do not add to it)."""
    dump = port_dump(half_model, LONG, decode_steps=2, dtype="bfloat16", style=style, mistakes=[bug])
    isolation = isolate_dump(dump, half_model)
    want = expected[style] if isinstance(expected, dict) else expected
    assert roots(isolation) == want, format_isolation(isolation, brief=True)
    # a decode step's table has HD = 8 elements: θ 0.1 % low moves fewer than the limit's floor of two there
    assert {c.pass_index for c in isolation.root_causes} == ({0} if want[0].startswith("model.rotary") else {0, 1, 2})


# -- the real checkpoint ------------------------------------------------------------------------------


@pytest.mark.checkpoint
@pytest.mark.slow
def test_a_gqa_bug_in_a_fused_port_of_the_real_checkpoint_is_named(real_model, real_tokenizer):
    """Qwen2.5-Coder-0.5B (14 query heads over 2 KV heads) as a fused port computes it, h % KV for h // 7:
    named at the context of the layers dumped, in every pass; the same port without the bug is clean (its
    layer-0 context, 4e-5 from float64 through the sharp softmax, within the fused context's limit)."""
    ids = [real_tokenizer("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n")[
        "input_ids"]]
    include = [n for n in real_model.intermediate_names() if n.startswith(("model.embed_tokens", "model.rotary_emb",
                                                                            "model.layers.0", "model.layers.1."))]
    bad = port_dump(real_model, ids, decode_steps=2, fused=True, mistakes=["gqa_tile"], include=include)
    isolation = isolate_dump(bad, real_model)
    assert roots(isolation) == layers("self_attn.context", 2), format_isolation(isolation, brief=True)
    assert {c.pass_index for c in isolation.root_causes} == {0, 1, 2}
    assert {c.mistake for c in isolation.root_causes} == {
        "KV head h % KV (tile) instead of h // G (repeat) (in the fused attention)"}
    clean = isolate_dump(port_dump(real_model, ids, decode_steps=2, fused=True, include=include), real_model)
    assert clean.ok and not clean.not_isolated, format_isolation(clean, brief=True)
