"""The model's own contracts: construction, dtypes, errors on bad input, heads, saving and loading.

The parts have their own files: test_masks.py, test_rope.py, test_cache.py, test_losses.py."""

import numpy as np
import pytest

import qwen2np
from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model
from qwen2np.errors import CheckpointError, ConfigError, ModelTooLargeError
from tiny_model import TINY, cache_contents, ids, same_contents, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_default_config_is_refused_before_allocating():
    """The seed's example describes 11 billion parameters: say how much memory, don't get killed."""
    with pytest.raises(ModelTooLargeError) as e:
        Qwen2Model(Qwen2Config())
    message = str(e.value)
    assert "parameters" in message and "GiB" in message and "available" in message
    assert isinstance(e.value, MemoryError)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_intermediate_keeps_the_model_dtype(dtype):
    """No silent upcasts: every named intermediate, the cache and the outputs are in the model dtype."""
    model = Qwen2ForCausalLM(Qwen2Config(**TINY), dtype=dtype, seed=0)
    with qwen2np.trace(model) as t:
        out = model(ids(), attention_mask=np.ones((2, 6), int), labels=ids())
    assert set(t.names()) == set(model.intermediate_names())
    wrong = {n: str(t[n].dtype) for n in t.names() if t[n].dtype != np.dtype(dtype)}
    assert not wrong, wrong
    assert out.logits.dtype == dtype and np.asarray(out.loss).dtype == dtype
    assert all(layer.keys.dtype == dtype for layer in out.past_key_values.layers)


def test_trace_records_without_changing_results(lm):
    plain = lm(ids()).logits
    with qwen2np.trace(lm, "model.layers.1.*", "logits") as t:
        traced = lm(ids()).logits
    assert np.array_equal(plain, traced)
    assert np.array_equal(t["logits"], traced)
    assert t["model.layers.1.self_attn.probs"].shape == (2, 6, 6, 6)


def test_inputs_embeds_equal_input_ids(lm):
    x = ids()
    embeds = lm.params["model.embed_tokens.weight"][x]
    assert np.array_equal(lm(x).logits, lm(inputs_embeds=embeds).logits)


def test_logits_to_keep_and_tuples(lm):
    full = lm(ids()).logits
    assert np.allclose(lm(ids(), logits_to_keep=2).logits, full[:, -2:], rtol=0, atol=1e-6)
    assert np.allclose(lm(ids(), logits_to_keep=np.array([0, 3])).logits, full[:, [0, 3]], rtol=0, atol=1e-6)
    as_tuple = lm(ids(), return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], full)


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m(np.array([[1, 2, 40]])), ValueError, "id 40 at [0, 2] is outside the vocabulary [0, 40)"),
    (lambda m: m(np.array([[1, -1]])), ValueError, "id -1 at [0, 1]"),
    (lambda m: m(np.array([1, 2])), ValueError, "expected shape [B, T]"),
    (lambda m: m(np.array([[1.5, 2]])), TypeError, "expected an integer array"),
    (lambda m: m(), ValueError, "exactly one of input_ids or inputs_embeds"),
    (lambda m: m(np.array([[1, 2]]), attention_mask=np.ones((1, 3), int)), ValueError, "attention_mask: expected shape"),
    (lambda m: m(np.array([[1, 2]]), position_ids=np.array([[0, 1, 2]])), ValueError, "position_ids: expected shape"),
    (lambda m: m(np.array([[1, 2]]), past_key_values=[(1, 2)]), TypeError, "expected a qwen2np DynamicCache"),
    (lambda m: m(inputs_embeds=np.zeros((1, 2, 5), np.float32)), ValueError, "inputs_embeds: expected shape [B, T, 24]"),
    (lambda m: m(np.array([[1, 2]]), labels=np.array([[1, 99]])), ValueError, "label 99 at index (0, 1)"),
    (lambda m: m(np.array([[1, 2]]), bogus=1), TypeError, "bogus"),
])
def test_bad_input_gets_a_clear_error(lm, call, error, message):
    with pytest.raises(error) as e:
        call(lm)
    assert message in str(e.value)


def test_bad_input_does_not_corrupt_the_cache(lm):
    out = lm(ids(1, 4))
    cache = out.past_key_values
    with pytest.raises(ValueError):
        lm(np.array([[1, 99]]), past_key_values=cache)
    assert cache.get_seq_length() == 4
    good = lm(ids(1, 5)[:, 4:], past_key_values=cache)
    assert cache.get_seq_length() == 5 and good.logits.shape == (1, 1, 40)


def _raising_edit(x):
    raise RuntimeError("an edit that fails half way through the forward pass")


# calls that fail after the prompt was cached; each must leave the cache exactly as it was
FAILING_STEPS = {
    "labels out of range": (lambda m, c: m(ids(1, 1), past_key_values=c, labels=np.array([[99]])), ValueError),
    "labels of the wrong shape": (lambda m, c: m(ids(1, 1), past_key_values=c, labels=np.array([[1, 2]])), ValueError),
    "labels of floats": (lambda m, c: m(ids(1, 1), past_key_values=c, labels=np.array([[1.0]])), ValueError),
    "logits_to_keep negative": (lambda m, c: m(ids(1, 1), past_key_values=c, logits_to_keep=-1), ValueError),
    "logits_to_keep out of range": (lambda m, c: m(ids(1, 2), past_key_values=c, logits_to_keep=[0, 5]), ValueError),
    "logits_to_keep of floats": (lambda m, c: m(ids(1, 1), past_key_values=c, logits_to_keep=[0.5]), TypeError),
    "mask too short": (lambda m, c: m(ids(1, 1), past_key_values=c, attention_mask=np.ones((1, 2), int)), ValueError),
    "a 4D mask of the wrong shape": (lambda m, c: m(ids(1, 1), past_key_values=c,
                                                    attention_mask=np.zeros((1, 1, 1, 3), np.float32)), ValueError),
    "positions of the wrong shape": (lambda m, c: m(ids(1, 1), past_key_values=c, position_ids=[[4, 5]]), ValueError),
    "another batch size": (lambda m, c: m(ids(2, 1), past_key_values=c), qwen2np.errors.CacheError),
    "an edit that raises in layer 1": (lambda m, c: _edit_fails(m, c), RuntimeError),
}


def _edit_fails(model, cache):
    with qwen2np.trace(model, edits={"model.layers.1.mlp.act": _raising_edit}):
        model(ids(1, 1), past_key_values=cache)


@pytest.mark.parametrize("name", FAILING_STEPS)
def test_a_call_that_raises_leaves_the_cache_as_it_was(lm, name):
    """Checked before the cache is touched (labels, logits_to_keep, masks, shapes), or rolled back (a
    failure inside the layers): the next good step gives exactly what it gives without the failed call."""
    call, error = FAILING_STEPS[name]
    prompt, step = ids(1, 5)[:, :4], ids(1, 5)[:, 4:]
    cache = lm(prompt).past_key_values
    before = cache_contents(cache)
    with pytest.raises(error):
        call(lm, cache)
    assert same_contents(cache_contents(cache), before), name
    expected = lm(step, past_key_values=lm(prompt).past_key_values).logits
    assert np.array_equal(lm(step, past_key_values=cache).logits, expected)


def test_random_init_is_seeded_and_shaped_like_transformers():
    config = Qwen2Config(**TINY, initializer_range=0.05)
    a, b = Qwen2ForCausalLM(config, seed=3), Qwen2ForCausalLM(config, seed=3)
    c = Qwen2ForCausalLM(config, seed=4)
    w = "model.layers.0.mlp.up_proj.weight"
    assert np.array_equal(a.params[w], b.params[w]) and not np.array_equal(a.params[w], c.params[w])
    assert abs(a.params["model.embed_tokens.weight"][1:].std() - 0.05) < 0.005
    assert not a.params["model.layers.0.self_attn.q_proj.bias"].any()
    assert (a.params["model.norm.weight"] == 1).all()
    assert not a.params["model.embed_tokens.weight"][0].any()  # the padding row
    tied = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    assert tied.lm_head is tied.params["model.embed_tokens.weight"]
    assert tied.num_parameters() == a.num_parameters() - 40 * 24


def test_a_model_is_built_from_a_config_or_from_given_weights(lm):
    """One constructor: random weights from the seed, or the arrays given (as from_pretrained hands over
    what it holds); a head's base model shares its arrays, not copies; anything but a config is refused."""
    twin = Qwen2ForCausalLM(lm.config, params=dict(lm.params))
    assert all(twin.params[n] is a for n, a in lm.params.items())
    assert np.array_equal(twin(ids()).logits, lm(ids()).logits)
    assert twin.generation_config.to_dict() == lm.generation_config.to_dict() and twin.model.generation_config is None
    base = lm.model
    assert isinstance(base, Qwen2Model) and base.scope == "model" and base.config is lm.config
    assert all(base.params[n[len("model."):]] is a for n, a in lm.params.items() if n.startswith("model."))
    assert base.embed_tokens is lm.params["model.embed_tokens.weight"]
    assert Qwen2Model(lm.config, params=base.params).intermediate_names()[0] == "embed_tokens"
    with pytest.raises(TypeError, match="Qwen2ForCausalLM needs a Qwen2Config, got dict") as e:
        Qwen2ForCausalLM(TINY)
    assert isinstance(e.value, ConfigError)


def test_forward_is_the_call_and_return_dict_false_gives_tuples(lm):
    assert Qwen2ForCausalLM.forward is Qwen2ForCausalLM.__call__ and Qwen2Model.forward is Qwen2Model.__call__
    x = ids()
    out = lm.forward(x, use_cache=False)
    assert np.array_equal(out.logits, lm(x).logits)
    positional = lm(x, None, None, None, None, None, False, None, None, False)     # return_dict, 10th
    assert isinstance(positional, tuple) and np.array_equal(positional[0], out.logits)
    bare = lm.model(x, None, None, None, None, False, None, None, False)          # the base model's 9th
    assert isinstance(bare, tuple) and len(bare) == 1 and bare[0].shape == (2, 6, 24)


def test_sequence_classification_pools_the_rightmost_non_pad_token():
    config = Qwen2Config(**TINY, num_labels=3)
    model = Qwen2ForSequenceClassification(config, seed=0)
    x = np.array([[5, 6, 0, 9, 10, 0, 0], [0, 0, 5, 6, 7, 8, 9]])  # pad id 0 inside, right and left
    out = model(x, output_hidden_states=True)
    h = out.hidden_states[-1]
    scores = h @ model.params["score.weight"].T
    assert np.allclose(out.logits, scores[[0, 1], [4, 6]])
    with pytest.raises(ValueError, match="no padding token"):
        Qwen2ForSequenceClassification(Qwen2Config(**{**TINY, "pad_token_id": None}))(x)


def test_save_and_load_round_trip(tmp_path, lm):
    lm.save_pretrained(tmp_path)
    again = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert again.config.to_dict() == {**lm.config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    assert np.array_equal(again(ids()).logits, lm(ids()).logits)
    bare = Qwen2Model.from_pretrained(tmp_path)   # a head's checkpoint into the bare model
    assert np.array_equal(bare(ids()).last_hidden_state, lm.model(ids()).last_hidden_state)


def test_load_errors_name_the_tensor_and_file(tmp_path, lm):
    from qwen2np.io.hf_folder import save_hf_folder
    from qwen2np.weights.store import load_checkpoint

    tensors = {n: np.asarray(a) for n, a in lm.state_dict().items()}
    bad = dict(tensors)
    bad["model.norm.weight"] = np.ones(23, np.float32)
    save_hf_folder(tmp_path / "shape", lm.config.to_dict(), bad)
    with pytest.raises(CheckpointError, match=r"model.norm.weight: expected shape \(24,\), found \(23,\) in .*model.safetensors"):
        Qwen2ForCausalLM.from_pretrained(tmp_path / "shape")
    missing = {n: a for n, a in tensors.items() if n != "model.layers.1.mlp.up_proj.weight"}
    save_hf_folder(tmp_path / "missing", lm.config.to_dict(), missing)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight: missing"):
        Qwen2ForCausalLM.from_pretrained(tmp_path / "missing")
    extra = {**tensors, "model.layers.2.mlp.up_proj.weight": np.ones((2, 2), np.float32)}
    save_hf_folder(tmp_path / "extra", lm.config.to_dict(), extra)
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight: unexpected tensor"):
        Qwen2ForCausalLM.from_pretrained(tmp_path / "extra")
    assert load_checkpoint(tmp_path / "extra").tensors  # the file itself is fine


def test_perturbing_one_weight(lm):
    """load_state_dict replaces a weight by name (the read-only, memory-mapped original is untouched)."""
    model = Qwen2ForCausalLM._from_params(lm.config, dict(lm.params), "float32")
    name = "model.layers.1.mlp.down_proj.weight"
    w = model.params[name].copy()
    w[0, 0] += 1
    model.load_state_dict({name: w}, strict=False)
    assert model.params[name][0, 0] == lm.params[name][0, 0] + 1
    assert not np.array_equal(model(ids()).logits, lm(ids()).logits)


def test_long_prompts_are_attended_over_in_blocks(lm, monkeypatch):
    """Past a size budget the scores are computed a block of query rows at a time: the same numbers."""
    import qwen2np.model.attention

    x = ids(2, 30)
    mask = np.ones((2, 30), int)
    mask[1, :4] = 0
    whole = lm(x, attention_mask=mask).logits
    monkeypatch.setattr(qwen2np.model.attention, "SCORES_BUDGET_BYTES", 2 * 6 * 30 * 4 * 7)  # 7 rows per block
    blocked = lm(x, attention_mask=mask).logits
    keep = mask.astype(bool)
    assert np.abs(blocked - whole)[keep].max() <= 1e-5 * np.abs(whole).max()
    assert lm(x, attention_mask=mask, output_attentions=True).attentions[0].shape == (2, 6, 30, 30)


def test_to_float64_equals_building_in_float64():
    config = Qwen2Config(**TINY, initializer_range=0.3)
    converted = Qwen2ForCausalLM(config, seed=2).to("float64")
    direct = Qwen2ForCausalLM._from_params(config, {n: a.astype(np.float64) for n, a in
                                                    Qwen2ForCausalLM(config, seed=2).params.items()}, "float64")
    out = converted(ids(), output_hidden_states=True)
    assert out.logits.dtype == np.float64 and out.past_key_values.layers[0].keys.dtype == np.float64
    assert np.array_equal(out.logits, direct(ids()).logits)


@pytest.mark.parametrize("sliding_window", [None, 3, 5])
def test_causal_blocks_skip_only_hidden_keys(monkeypatch, sliding_window):
    """Without padding, long passes attend block by block over the keys each block may see (BLOCK_ROWS
    rows at a time); with the probabilities asked for, the whole matrix is computed. Both agree, for
    full and sliding layers, with and without a cache in front."""
    import qwen2np.model.attention

    extra = ({"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}
             if sliding_window else {"use_sliding_window": False})
    config = Qwen2Config(**{**TINY, **extra}, initializer_range=0.3)
    model = Qwen2ForCausalLM(config, seed=5)
    x = ids(2, 23)
    monkeypatch.setattr(qwen2np.model.attention, "BLOCK_ROWS", 4)
    whole = model(x, output_attentions=True).logits                  # probs asked: one piece
    blocked = model(x).logits
    assert np.abs(blocked - whole).max() <= 1e-5 * np.abs(whole).max()
    cache = model(x[:, :6]).past_key_values                           # a cache in front, then 17 at once
    continued = model(x[:, 6:], past_key_values=cache).logits
    assert np.abs(continued - whole[:, 6:]).max() <= 1e-5 * np.abs(whole).max()
