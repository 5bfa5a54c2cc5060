"""value_and_grad as a user meets it: names, dtypes, the loss of the model's own forward, gradients of
named intermediates through qwen2np.trace, activation checkpointing within a memory budget, and the
errors for what it does not do."""

import numpy as np
import pytest

import qwen2np
from grad_support import CONFIGS, config_of, directional_fd
from qwen2np import Qwen2ForCausalLM, Qwen2Model, trace, value_and_grad
from qwen2np.errors import IntermediateNameError, ModelInputError, ModelInputTypeError, ModelTooLargeError, TraceError
from qwen2np.grad.plan import layer_activation_bytes

IDS = np.array([[3, 7, 1, 9, 4, 4, 12], [5, 2, 2, 8, 11, 6, 1]])


def tiny(dtype="float32", **overrides):
    return Qwen2ForCausalLM(config_of(CONFIGS["gqa-sliding"], **overrides), dtype=dtype, seed=11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_names_dtypes_and_the_loss_of_the_models_own_forward(dtype):
    model = tiny(dtype)
    loss, grads = value_and_grad(model, IDS, labels=IDS)
    assert list(grads) == list(model.params)                    # the checkpoint's names, in its order
    assert "lm_head.weight" in grads and "model.layers.1.self_attn.q_proj.bias" in grads
    assert all(g.dtype == np.dtype(dtype) and g.shape == model.params[n].shape for n, g in grads.items())
    assert loss == model(IDS, labels=IDS).loss                  # bit for bit: the same forward pass
    assert qwen2np.value_and_grad is value_and_grad


def test_a_tied_lm_head_adds_its_gradient_to_the_embedding():
    model = Qwen2ForCausalLM(config_of(CONFIGS["mqa-tied"]), dtype="float64", seed=2)
    _, grads = value_and_grad(model, IDS[:, :5], labels=IDS[:, :5] % 18)
    assert "lm_head.weight" not in grads
    unused = np.setdiff1d(np.arange(18), IDS[:, :5] % 18)       # rows never looked up: lm_head's share only
    _, head_only = value_and_grad(model, IDS[:, :5] % 18, labels=IDS[:, :5] % 18, params=["model.embed_tokens.weight"])
    assert np.array_equal(grads["model.embed_tokens.weight"], head_only["model.embed_tokens.weight"])
    assert np.abs(grads["model.embed_tokens.weight"][unused]).sum() > 0


def test_gradients_of_named_intermediates_through_trace():
    """`name.grad` under a trace: the gradient of the loss with respect to that intermediate. Checked by
    finite differences: adding ε·u to resid_mid (an edit) moves the loss by ε·⟨grad, u⟩."""
    model = tiny("float64")
    name = "model.layers.0.resid_mid"
    with trace(model, name, f"{name}.grad", "logits.grad", "model.embed_tokens.grad") as t:
        loss, _ = value_and_grad(model, IDS, labels=IDS)
    g = t[f"{name}.grad"]
    assert g.shape == t[name].shape == (2, 7, 12) and t["logits.grad"].shape == (2, 7, 20)
    assert np.allclose(t["logits.grad"].sum(-1), 0, atol=1e-15)  # softmax − onehot: each row sums to 0
    u = np.random.default_rng(0).standard_normal(g.shape)
    eps = np.zeros(1)

    def loss_with_shift():
        with trace(model, edits={name: lambda x: x + eps[0] * u}):
            return float(model(IDS, labels=IDS).loss)

    fd = directional_fd(loss_with_shift, eps, np.ones(1))
    assert abs(fd - float((g * u).sum())) <= 1e-7 * np.linalg.norm(g) * np.linalg.norm(u)


def test_every_differentiable_intermediate_has_a_gradient_of_its_shape():
    model = tiny()
    with trace(model, "*") as t:
        value_and_grad(model, IDS, labels=IDS)
    expected = qwen2np.inspection.names.gradient_names(model.intermediate_names())
    grads = [n for n in t.names() if n.endswith(".grad")]
    assert sorted(grads) == sorted(expected)
    assert all(t[n].shape == t[n[:-5]].shape and t[n].dtype == np.float32 for n in grads)
    assert grads[0] == "logits.grad" and grads[-1] == "model.embed_tokens.grad"   # in backward order


def test_a_trace_pattern_for_a_gradient_is_checked_like_any_name():
    model = tiny()
    with pytest.raises(IntermediateNameError):
        trace(model, "model.layers.0.no_such.grad")
    with pytest.raises(IntermediateNameError):
        trace(model, "model.layers.0.self_attn.mask.grad")     # a constant: it has no gradient


def test_an_edit_of_a_gradient_changes_what_flows_back():
    """Zeroing resid_mid's gradient in layer 1 leaves layer 1's MLP gradients as they were and sends
    nothing into layer 1's attention."""
    model = tiny("float64")
    _, plain = value_and_grad(model, IDS, labels=IDS)
    with trace(model, edits={"model.layers.1.resid_mid.grad": np.zeros((2, 7, 12))}):
        _, cut = value_and_grad(model, IDS, labels=IDS)
    assert np.array_equal(cut["model.layers.1.mlp.up_proj.weight"], plain["model.layers.1.mlp.up_proj.weight"])
    assert not cut["model.layers.1.self_attn.q_proj.weight"].any()
    assert not cut["model.layers.0.mlp.up_proj.weight"].any()


def test_an_edit_of_the_forward_pass_is_refused():
    model = tiny()
    with trace(model, edits={"model.layers.0.mlp.act": lambda x: x * 0}):
        with pytest.raises(TraceError, match="cannot differentiate through the trace's edit of model.layers.0.mlp.act"):
            value_and_grad(model, IDS, labels=IDS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_recomputed_layers_give_the_same_bits(dtype):
    """Activation checkpointing runs a layer's forward again: the same numbers, so the same gradients."""
    model = tiny(dtype)
    _, kept = value_and_grad(model, IDS, labels=IDS, checkpoint=False)
    with trace(model, "*") as t:
        _, recomputed = value_and_grad(model, IDS, labels=IDS, checkpoint=True)
    assert kept.plan.recomputed == 0 and recomputed.plan.recomputed == 2
    assert all(np.array_equal(kept[n], recomputed[n]) for n in kept)
    assert all(len(t.history(n)) == 1 for n in t.names())     # the traces saw each tensor once


def test_the_budget_decides_which_layers_are_recomputed():
    model = tiny()
    B, T = IDS.shape
    grads_bytes = sum(a.size for a in model.params.values()) * 4
    per_layer = layer_activation_bytes(model.config, 4, B, T)
    _, all_kept = value_and_grad(model, IDS, labels=IDS, max_memory="1GB")
    assert all_kept.plan.kept == 2 and "every layer keeps its activations" in all_kept.plan.description
    f = all_kept.plan.figures
    weights = grads_bytes          # the model's arrays, held in memory: as many bytes as the gradients
    room_for_one = weights + f["gradients"] + f["working"] + 2 * f["layer_input"] + (per_layer - f["layer_input"])
    _, one_kept = value_and_grad(model, IDS, labels=IDS, max_memory=room_for_one)
    assert (one_kept.plan.kept, one_kept.plan.recomputed) == (1, 1)
    assert "layers 0-0 keep their activations (1 x" in one_kept.plan.description
    assert "the other 1 are recomputed" in one_kept.plan.description
    assert all(np.array_equal(all_kept[n], one_kept[n]) for n in all_kept)
    with pytest.raises(ModelTooLargeError, match="needs at least .* beside the weights .* memory budget leaves"):
        value_and_grad(model, IDS, labels=IDS, max_memory=weights + f["gradients"])
    with pytest.raises(ModelTooLargeError):
        value_and_grad(model, IDS, labels=IDS, max_memory=room_for_one, checkpoint=False)


def test_a_subset_of_parameters():
    model = tiny()
    _, grads = value_and_grad(model, IDS, labels=IDS, params=["*.mlp.*", "lm_head.weight"])
    assert set(grads) == {n for n in model.params if ".mlp." in n} | {"lm_head.weight"}
    _, every = value_and_grad(model, IDS, labels=IDS)
    assert all(np.array_equal(grads[n], every[n]) for n in grads)
    assert grads.plan.figures["gradients"] == sum(g.nbytes for g in grads.values())
    with pytest.raises(ModelInputError, match="params: 'model.layers.9.*' matches no parameter"):
        value_and_grad(model, IDS, labels=IDS, params=["model.layers.9.*"])


def test_weights_converted_per_use_give_the_same_bits(tmp_path):
    """A model whose matrices stay in their file (converted a block at a time) and one that keeps them:
    the same gradients, bit for bit (the backward's products go in the same blocks either way)."""
    tiny().save_pretrained(tmp_path)                  # float32 on disk, float64 in compute: a conversion
    kept = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype="float64")
    least = kept.weight_plan.figures["needed_always"]
    per_use = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype="float64", max_memory=least + 10_000)
    assert "every weight kept" in kept.weight_plan.description
    assert "converted per use: 2 layers" in per_use.weight_plan.description
    _, a = value_and_grad(kept, IDS, labels=IDS)
    _, b = value_and_grad(per_use, IDS, labels=IDS)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_what_it_refuses():
    model = tiny()
    with pytest.raises(ModelInputError, match="needs labels"):
        value_and_grad(model, IDS)
    with pytest.raises(ModelInputError, match="labels: expected shape"):
        value_and_grad(model, IDS, labels=IDS[:, :3])
    with pytest.raises(ModelInputError, match="num_items_in_batch: expected a positive count"):
        value_and_grad(model, IDS, labels=IDS, num_items_in_batch=0)
    with pytest.raises(ModelInputTypeError, match="needs a model with a loss"):
        value_and_grad(Qwen2Model(config_of(CONFIGS["gqa-sliding"])), IDS, labels=IDS)
    half = tiny("bfloat16")
    with pytest.raises(ModelInputTypeError, match="computes in float32 or float64; this model computes in bfloat16"):
        value_and_grad(half, IDS, labels=IDS)
    seq = qwen2np.Qwen2ForSequenceClassification(config_of(CONFIGS["gqa-sliding"], num_labels=3))
    with pytest.raises(ModelInputError, match="does not pass it to the loss of Qwen2ForSequenceClassification"):
        value_and_grad(seq, IDS, labels=np.array([0, 2]), num_items_in_batch=2)


def test_inputs_embeds_get_the_gradient_the_embedding_would():
    model = tiny("float64")
    embeds = model.params["model.embed_tokens.weight"][IDS]
    with trace(model, "model.embed_tokens.grad") as t:
        loss, grads = value_and_grad(model, inputs_embeds=embeds, labels=IDS)
    loss_ids, grads_ids = value_and_grad(model, IDS, labels=IDS)
    assert loss == loss_ids and "model.embed_tokens.weight" not in grads
    d_e = np.zeros_like(model.params["model.embed_tokens.weight"])
    np.add.at(d_e, IDS.reshape(-1), t["model.embed_tokens.grad"].reshape(-1, 12))
    assert np.allclose(d_e, grads_ids["model.embed_tokens.weight"], rtol=0, atol=1e-15)
