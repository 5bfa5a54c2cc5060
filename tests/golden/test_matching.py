"""Isolation's input checks (qwen2np/golden/matching.py, issue 17): a model whose weights are converted per use,
a dump that kept some positions, a dump of another architecture, a negative token id. Each once crashed
`compare --isolate` (TypeError, a broadcasting ValueError, KeyError) or passed silently."""

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import DumpError
from qwen2np.golden.isolate import isolate_dump
from qwen2np.golden.record import record_dump
from qwen2np.golden.report import format_isolation
from qwen2np.inspection.tracing import trace
from qwen2np.weights.store import StoredWeight

TINY = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=3)


def test_a_model_whose_weights_are_converted_per_use(model, tmp_path):
    """Under a small memory budget the weights stay in their file and are converted per use (a 7B float32
    isolation on 24 GB): isolation reads them a block of rows at a time. ('StoredWeight' object is not
    subscriptable, then a TypeError on a slice.)"""
    model.save_pretrained(tmp_path / "tiny")
    dump = record_dump(model, [[1, 2, 3, 4, 5]], decode_steps=1)
    # float64 from a float32 file: every matrix needs converting; a budget of what a forward pass needs with
    # every weight streamed, plus 1 kB, leaves no room to keep them
    planned = Qwen2ForCausalLM.from_pretrained(tmp_path / "tiny", dtype="float64").weight_plan
    streamed = Qwen2ForCausalLM.from_pretrained(tmp_path / "tiny", dtype="float64",
                                                max_memory=planned.figures["needed_always"] + 1000)
    assert isinstance(streamed.state_dict()["model.layers.0.mlp.up_proj.weight"], StoredWeight)
    isolation = isolate_dump(dump, streamed)
    assert isolation.ok and not isolation.not_isolated, format_isolation(isolation, brief=True)
    assert "as loaded, checked against A's fingerprint" in isolation.notes[0] and len(isolation.notes) == 1


def test_a_dump_that_kept_some_positions(model):
    """`qwen2np dump --positions`: the operations of each position are recomputed at the positions kept;
    the attention over the cache, which needs every position, is not isolated, and says why. (A NumPy
    broadcasting ValueError.)"""
    dump = record_dump(model, [[1, 2, 3, 4, 5, 6, 7]], positions="-3:", decode_steps=1)
    isolation = isolate_dump(dump, model)
    assert isolation.ok, format_isolation(isolation, brief=True)
    isolated = {c.key for c in isolation.checks if c.ok is not None}
    assert {"model.layers.1.mlp.act", "model.rotary_emb.cos", "model.layers.1.self_attn.q_rope", "logits",
            "model.layers.0.self_attn.probs", "model.layers.1.mlp.act@1"} <= isolated
    missing = {c.key: c.missing for c in isolation.not_isolated}
    assert set(missing) == {f"model.layers.{l}.self_attn.{n}{p}" for l in (0, 1) for n in ("scores", "context")
                            for p in ("", "@1")}
    assert missing["model.layers.1.self_attn.context@1"] == (
        "needs every position of model.layers.1.self_attn.v_proj (the KV cache), and A keeps only positions "
        "[4, 5] of that pass")
    with trace(model, edits={"model.layers.1.mlp.act": lambda x: x * np.float32(1.01)}):
        with_bug = record_dump(model, [[1, 2, 3, 4, 5, 6, 7]], positions="-3:", decode_steps=1)
    assert [c.key for c in isolate_dump(with_bug, model).root_causes] == ["model.layers.1.mlp.act",
                                                                          "model.layers.1.mlp.act@1"]


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 3}, "A has at least 3 layers, the model 2: A ran another architecture"),
    ({"intermediate_size": 40}, r"model.layers.0.mlp.gate_proj: A records shape \[1, 3, 40\], the model makes "
                                r"\[1, 3, 48\] \(intermediate_size 48\): A ran another architecture"),
    ({"num_key_value_heads": 4}, r"model.layers.0.self_attn.k_proj: A records shape \[1, 3, 32\], the model makes "
                                 r"\[1, 3, 16\] \(num_key_value_heads × head_dim 16\)"),
])
def test_a_dump_of_another_architecture_without_fingerprint_is_refused(model, change, message):
    """No fingerprint to tell: the shapes and the layers say it, in one line. (KeyError, ValueError.)"""
    other = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **change}), seed=3)
    dump = record_dump(other, [[1, 2, 3]], fingerprint=None)
    dump.manifest["model"] = {}                       # a port's hand-made manifest: no config declared either
    with pytest.raises(DumpError, match=message):
        isolate_dump(dump, model)


def test_a_declared_config_of_another_depth_is_refused(model):
    other = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": 3}), seed=3)
    dump = record_dump(other, [[1, 2, 3]], include=["model.layers.0.*"], fingerprint=None)
    with pytest.raises(DumpError, match="A has 3 layers, the model 2"):
        isolate_dump(dump, model)


def test_a_negative_token_id_is_refused(model):
    """-2 would read the embedding's second row from the end: refused, not wrapped."""
    dump = record_dump(model, [[1, 2, 3]])
    dump.manifest["input_ids"] = [[1, -2, 3]]
    with pytest.raises(DumpError, match=r"input_ids\[0\]\[1\] = -2: expected a token id in \[0, 48\)"):
        isolate_dump(dump, model)
    dump.manifest["input_ids"] = [[1, 48, 3]]
    with pytest.raises(DumpError, match=r"input_ids\[0\]\[1\] = 48"):
        isolate_dump(dump, model)
