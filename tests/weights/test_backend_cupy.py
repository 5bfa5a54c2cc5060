"""The CuPy backend, against a strict NumPy-backed stand-in for CuPy (tests/support/cupy_standin.py).

No GPU here, so `model.to("cupy")` runs on the stand-in: device arrays that NumPy cannot read implicitly,
that refuse to mix with NumPy arrays, and whose reductions stay on the device. Every model class, on
configs that cover grouped queries (G = 1, 2, 4), a sliding-window layer with a sequence longer than the
window, a left-padded batch, packed sequences, a custom 4D mask, four RoPE types and three activations,
must give what the same model gives on NumPy.

Bitwise, not within a tolerance: the stand-in runs the same NumPy kernels on the same memory layouts as
the NumPy backend, so any difference at all is a backend code path that computes something else (on a
real GPU, cuBLAS and CUDA's exp would differ by rounding; that is not what these tests can see).
"""

import sys

from support import cupy_standin
import numpy as np
import pytest

import qwen2np
from qwen2np import (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2ForTokenClassification,
                     Qwen2Model)
from qwen2np.weights.backend import array_module, to_numpy
from qwen2np.errors import TraceError
from qwen2np.model.layers import ACT2FN
from qwen2np.inspection.edits import patch_from, zero_head

BASE = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, num_labels=3, initializer_range=0.3)
CONFIGS = {
    # G = 2; layer 1 slides with a window of 3, shorter than every sequence below
    "gqa2-sliding": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    # G = 1 (one KV head per query head), linear RoPE scaling, tied embeddings
    "mha-linear": dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                       tie_word_embeddings=True),
    # G = 4 (one KV head for all), YaRN, the tanh GELU
    "mqa-yarn": dict(num_key_value_heads=1, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 16},
                     hidden_act="gelu_pytorch_tanh"),
    # dynamic NTK: positions past max_position_embeddings grow the base on the fly; ReLU
    "gqa2-dynamic": dict(num_key_value_heads=2, max_position_embeddings=12, hidden_act="relu",
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}
CLASSES = [Qwen2Model, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2ForTokenClassification]

B, T = 2, 7
IDS = np.random.default_rng(0).integers(1, BASE["vocab_size"], (B, T))
MASK = np.ones((B, T), dtype=np.int64)
MASK[1, :3] = 0                          # row 1 is left-padded by 3
PADDED_IDS = np.where(MASK == 1, IDS, BASE["pad_token_id"])


@pytest.fixture
def cupy(monkeypatch):
    """The stand-in as `cupy` for one test (removed afterwards)."""
    monkeypatch.setitem(sys.modules, "cupy", cupy_standin)
    return cupy_standin


def config(name, **overrides):
    return Qwen2Config(**{**BASE, **CONFIGS[name], **overrides})


def pair(cls, name, **overrides):
    """The same random model twice: on NumPy, and moved to the device (each with its own config)."""
    return cls(config(name, **overrides), seed=1), cls(config(name, **overrides), seed=1).to("cupy")


def same(device_value, host_value, what=""):
    """`device_value` lives on the device and holds bitwise the values (and dtype) of `host_value`."""
    assert type(device_value) is cupy_standin.ndarray, f"{what}: {type(device_value).__name__} is not on the device"
    got = to_numpy(device_value)
    assert got.dtype == host_value.dtype and got.shape == host_value.shape, (what, got.dtype, got.shape)
    assert np.array_equal(got, host_value, equal_nan=True), f"{what}: max |diff| {np.abs(got - host_value).max()}"


def same_output(device_out, host_out):
    for key in host_out.keys():
        a, b = host_out[key], device_out[key]
        if key == "past_key_values":
            for i, (layer_a, layer_b) in enumerate(zip(a.layers, b.layers)):
                same(layer_b.keys, layer_a.keys, f"cache layer {i} keys")
                same(layer_b.values, layer_a.values, f"cache layer {i} values")
        elif isinstance(a, tuple):
            assert len(a) == len(b)
            for i, (x, y) in enumerate(zip(a, b)):
                same(y, x, f"{key}[{i}]")
        else:
            same(b, a, key)


# -- the stand-in is strict, so these tests cannot pass by letting NumPy quietly do the work ------------------


def test_the_standin_is_strict(cupy):
    a = cupy.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones((2, 3), dtype=np.float32)
    assert array_module(a) is cupy and qwen2np.weights.backend.backend("cupy") is cupy
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError):
        np.exp(a)
    with pytest.raises(TypeError):
        np.concatenate([a, a])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        a + host
    with pytest.raises(TypeError):
        host + a
    with pytest.raises(TypeError):
        host @ a.T
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cupy.exp(host)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cupy.maximum(a, host)
    with pytest.raises(TypeError, match="NumPy array"):
        a[np.array([0, 1])]
    with pytest.raises(TypeError, match="numpy.ndarray"):
        a[:] = host
    # scalars mix freely, and what comes out stays on the device, reductions included
    for value in (a * np.float32(2), np.float32(2) * a, 2.0 * a, a.sum(), a.max(axis=0), a[1, 2], a[0]):
        assert array_module(value) is cupy
    assert float(a.sum()) == 15.0 and int(a.argmax()) == 5 and a.sum().ndim == 0
    assert isinstance(a.get(), np.ndarray) and np.array_equal(cupy.asnumpy(a), np.arange(6).reshape(2, 3))


def test_a_host_side_leak_is_caught(cupy, monkeypatch):
    """A model function that slips a NumPy call onto device arrays fails loudly (the suite is not vacuous)."""
    host, device = pair(Qwen2ForCausalLM, "gqa2-sliding")
    monkeypatch.setitem(ACT2FN, "silu", lambda x: x / (1 + np.exp(-x)))
    host(IDS)
    with pytest.raises(TypeError):
        device(IDS)


# -- the forward pass ---------------------------------------------------------------------------------------

POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])   # row 0 packs two sequences
CAUSAL_4D = np.where(np.tri(T, dtype=bool), np.float32(0), np.finfo(np.float32).min)[None, None]   # [1, 1, T, T]

INPUTS = {
    "plain": dict(input_ids=IDS),
    "left-padded": dict(input_ids=PADDED_IDS, attention_mask=MASK),
    "packed": dict(input_ids=IDS, position_ids=POSITIONS),
    "4d-mask": dict(input_ids=IDS, attention_mask=CAUSAL_4D),
}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_numpy(cupy, name, cls):
    """Logits (or the last hidden state), every hidden state, every attention map and the cache."""
    host, device = pair(cls, name)
    for inputs in INPUTS.values():
        want = host(**inputs, output_hidden_states=True, output_attentions=True)
        got = device(**inputs, output_hidden_states=True, output_attentions=True)
        same_output(got, want)


@pytest.mark.parametrize("name", CONFIGS)
def test_positions_past_the_rope_table_and_long_prompts(cupy, name):
    """A prompt longer than max_position_embeddings (the dynamic type grows its frequencies) and longer
    than a block of query rows (attention then runs block by block into a device buffer)."""
    host, device = pair(Qwen2ForCausalLM, name)
    ids = np.random.default_rng(1).integers(1, BASE["vocab_size"], (1, 70))
    same(device(ids).logits, host(ids).logits, "logits")
    same(device(ids[:, :5]).logits, host(ids[:, :5]).logits, "logits after the dynamic reset")


def test_device_inputs_equal_host_inputs(cupy):
    """ids, masks, positions, embeddings and logits_to_keep may already live on the device."""
    for cls in CLASSES:
        host, device = pair(cls, "gqa2-sliding")
        want = host(PADDED_IDS, attention_mask=MASK, position_ids=POSITIONS)
        got = device(cupy.asarray(PADDED_IDS), attention_mask=cupy.asarray(MASK),
                     position_ids=cupy.asarray(POSITIONS))
        same_output(got, want)
    host, device = pair(Qwen2ForCausalLM, "gqa2-sliding")
    embeds = host.params["model.embed_tokens.weight"][IDS]
    same(device(inputs_embeds=cupy.asarray(embeds)).logits, host(inputs_embeds=embeds).logits, "from embeddings")
    same(device(inputs_embeds=embeds).logits, host(inputs_embeds=embeds).logits, "from host embeddings")
    keep = np.array([0, 4])
    same(device(IDS, logits_to_keep=cupy.asarray(keep)).logits, host(IDS, logits_to_keep=keep).logits, "kept")
    same(device(IDS, logits_to_keep=keep).logits, host(IDS, logits_to_keep=keep).logits, "kept (host indices)")
    same(device(IDS, logits_to_keep=2).logits, host(IDS, logits_to_keep=2).logits, "last 2")


# -- losses ----------------------------------------------------------------------------------------------------


def test_losses_equal_numpy(cupy):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, BASE["vocab_size"], (B, T))
    labels[1, :3] = -100
    cases = [  # class, config overrides, labels
        (Qwen2ForCausalLM, {}, labels),
        (Qwen2ForTokenClassification, {}, np.where(labels >= 0, labels % 3, -100)),
        (Qwen2ForSequenceClassification, {}, np.array([2, 0])),                                   # single label
        (Qwen2ForSequenceClassification, {"num_labels": 1}, np.array([0.5, -1.0], np.float32)),  # regression
        (Qwen2ForSequenceClassification, {}, np.array([[1, 0, 1], [0, 0, 1]], np.float32)),      # multi-label
    ]
    for cls, overrides, y in cases:
        for as_device in (False, True):
            host, device = pair(cls, "gqa2-sliding", **overrides)
            want = host(PADDED_IDS, attention_mask=MASK, labels=y)
            got = device(PADDED_IDS, attention_mask=MASK, labels=cupy.asarray(y) if as_device else y)
            same(got.loss, np.asarray(want.loss), f"{cls.__name__} loss")
            same(got.logits, want.logits, f"{cls.__name__} logits")
            assert device.config.problem_type == host.config.problem_type


# -- incremental decoding and generate ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_equals_numpy(cupy, name):
    """A left-padded prefill, then one token at a time through the cache (past the sliding window)."""
    host, device = pair(Qwen2ForCausalLM, name)
    new = np.random.default_rng(3).integers(1, BASE["vocab_size"], (B, 4))
    outs = []
    for model in (host, device):
        mask, logits = MASK, []
        out = model(PADDED_IDS, attention_mask=mask, use_cache=True)
        logits.append(out.logits)
        for t in range(new.shape[1]):
            mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
            out = model(new[:, t:t + 1], attention_mask=mask, past_key_values=out.past_key_values)
            logits.append(out.logits)
        outs.append((logits, out.past_key_values))
    (want, want_cache), (got, got_cache) = outs
    for step, (x, y) in enumerate(zip(want, got)):
        same(y, x, f"logits at step {step}")
    same_output({"past_key_values": got_cache}, {"past_key_values": want_cache})
    assert got_cache.get_seq_length() == T + new.shape[1]


def test_only_the_chosen_tokens_wait_for_the_device(cupy, monkeypatch):
    """A forward pass copies nothing back to the host (on a GPU each copy waits for the queued kernels);
    generate copies back one row of logits per new token, and nothing else."""
    monkeypatch.setattr(cupy, "transfers", {"to_host": 0, "to_device": 0})
    labels = {Qwen2ForCausalLM: np.ones((B, T), np.int64), Qwen2ForTokenClassification: np.ones((B, T), np.int64),
              Qwen2ForSequenceClassification: np.array([1, 2])}
    for cls, y in labels.items():
        device = pair(cls, "gqa2-sliding")[1]
        device(PADDED_IDS, attention_mask=MASK, labels=y, output_attentions=True, output_hidden_states=True)
        assert cupy.transfers["to_host"] == 0, cls.__name__
    device = pair(Qwen2ForCausalLM, "gqa2-sliding")[1]
    ids = device.generate(PADDED_IDS[:, 2:], attention_mask=MASK[:, 2:], max_new_tokens=4, do_sample=True, seed=3)
    assert ids.shape[1] == T - 2 + 4 and cupy.transfers["to_host"] == 4


class RecordingStreamer:
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value)

    def end(self):
        self.values.append("end")


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_equals_numpy(cupy, name):
    """Greedy and seeded sampling pick the same tokens; the tokens come back to the host, for the streamer."""
    host, device = pair(Qwen2ForCausalLM, name)
    prompt, mask = PADDED_IDS[:, 2:], MASK[:, 2:]   # 5 tokens, row 1 still padded: fits max_position_embeddings
    settings = [dict(), dict(do_sample=True, seed=7, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)]
    for kwargs in settings:
        want = host.generate(prompt, attention_mask=mask, max_new_tokens=6, **kwargs)
        streamer = RecordingStreamer()
        got = device.generate(prompt, attention_mask=mask, max_new_tokens=6, streamer=streamer, **kwargs)
        assert type(got) is np.ndarray and got.dtype == np.int64
        assert got.tolist() == want.tolist(), kwargs
        assert streamer.values[-1] == "end" and len(streamer.values) == 1 + (got.shape[1] - prompt.shape[1]) + 1
        assert all(type(v) is np.ndarray for v in streamer.values[:-1])
        on_device = device.generate(cupy.asarray(prompt), attention_mask=cupy.asarray(mask), max_new_tokens=6,
                                    **kwargs)
        assert on_device.tolist() == want.tolist()
    without_cache = device.generate(prompt, attention_mask=mask, max_new_tokens=3, use_cache=False)
    assert without_cache.tolist() == host.generate(prompt, attention_mask=mask, max_new_tokens=3).tolist()


# -- tracing and edits -----------------------------------------------------------------------------------------


def test_trace_records_device_arrays_and_edits_them(cupy):
    host, device = pair(Qwen2ForCausalLM, "gqa2-sliding")
    records = []
    for model in (host, device):
        with qwen2np.trace(model) as t:
            model(PADDED_IDS, attention_mask=MASK)
        records.append(t)
    want, got = records
    assert got.names() == want.names() == device.intermediate_names()
    for name in want.names():
        same(got[name], want[name], name)

    edits = {"model.layers.1.self_attn.probs": zero_head(1),
             "model.layers.0.self_attn.context": zero_head(2, head_dim=device.config.head_dim),
             "model.layers.0.mlp.act": lambda x: x * 0.5}
    with qwen2np.trace(host, edits=edits):
        edited_want = host(PADDED_IDS, attention_mask=MASK).logits
    with qwen2np.trace(device, "model.layers.1.self_attn.probs", edits=edits) as t:
        edited = device(PADDED_IDS, attention_mask=MASK).logits
    same(edited, edited_want, "edited logits")
    assert not np.array_equal(edited_want, host(PADDED_IDS, attention_mask=MASK).logits)
    assert float(abs(t["model.layers.1.self_attn.probs"][:, 1]).max()) == 0.0

    # activation patching: the recorded device tensors of one prompt into another
    other = (IDS + 1) % BASE["vocab_size"]
    patch = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_rope"]
    with qwen2np.trace(host, edits=patch_from(want, patch, positions=[2, 5])):
        patched_want = host(other, attention_mask=MASK).logits
    with qwen2np.trace(device, edits=patch_from(got, patch, positions=[2, 5])):
        patched = device(other, attention_mask=MASK).logits
    same(patched, patched_want, "patched logits")


def test_a_golden_dump_recorded_on_the_device_equals_one_recorded_on_numpy(cupy):
    from qwen2np.golden.record import record_dump

    host, device = pair(Qwen2ForCausalLM, "gqa2-sliding")
    want = record_dump(host, PADDED_IDS, MASK, include=["model.layers.1.*", "logits"], decode_steps=2)
    got = record_dump(device, PADDED_IDS, MASK, include=["model.layers.1.*", "logits"], decode_steps=2)
    assert got.manifest["model"] == want.manifest["model"]   # the weights' fingerprint included
    assert got.entries() == want.entries() and got.tensors.keys() == want.tensors.keys()
    for key, array in want.tensors.items():
        assert type(got.tensors[key]) is np.ndarray and np.array_equal(got.tensors[key], array), key


def test_an_edit_that_returns_a_host_array_is_refused(cupy):
    _, device = pair(Qwen2ForCausalLM, "gqa2-sliding")
    with pytest.raises(TraceError, match="numpy"):
        with qwen2np.trace(device, edits={"model.layers.0.mlp.act": lambda x: np.zeros(x.shape, x.dtype)}):
            device(IDS)


# -- moving and converting ------------------------------------------------------------------------------------


def test_to_numpy_comes_back_and_dtypes_convert_on_the_device(cupy, tmp_path):
    host, device = pair(Qwen2ForCausalLM, "mha-linear")
    assert all(type(a) is cupy.ndarray for a in device.state_dict().values())
    device.save_pretrained(tmp_path)                     # writes host copies
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert np.array_equal(loaded(IDS).logits, host(IDS).logits)

    device.to("float64")
    same(device(IDS).logits, Qwen2ForCausalLM(config("mha-linear"), seed=1).to("float64")(IDS).logits, "float64")
    device.to("float32").to("numpy")
    assert device.xp is np and all(type(a) is np.ndarray for a in device.state_dict().values())
    assert np.array_equal(device(IDS).logits, host(IDS).logits)

    device.to("cupy")
    device.load_state_dict({"lm_head.weight": host.lm_head * np.float32(2)}, strict=False)   # host -> device
    same(device.lm_head, host.lm_head * np.float32(2), "loaded weight")
