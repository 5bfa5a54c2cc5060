"""Qwen2Config: fields and defaults as transformers 5.24, both config.json forms, errors that name the field."""

import json
import math

import pytest

from qwen2np import Qwen2Config
from qwen2np.errors import ConfigError

# the published forms of config.json (transformers 4.x and 5.x), as in hf-qwen2-behavior.md section 12
QWEN25_05B_INSTRUCT_V4 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

VARIANTS = [
    {},
    QWEN25_05B_INSTRUCT_V4,
    {**QWEN25_05B_INSTRUCT_V4, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}},
    {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 30, "num_hidden_layers": 32},
    {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"] * 16},
    {"head_dim": 64, "hidden_size": 1000, "num_attention_heads": 10, "num_key_value_heads": 5},
    {"num_key_value_heads": None},
    {"num_labels": 3, "pad_token_id": 0},
    {"id2label": {"0": "neg", "1": "pos"}},
]


def test_defaults_are_transformers_defaults():
    c = Qwen2Config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151936, 4096, 22016, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_window_layers) == (32, 32, 28)
    assert c.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert c.sliding_window is None and c.layer_types == ["full_attention"] * 32
    assert (c.use_cache, c.tie_word_embeddings, c.rms_norm_eps, c.hidden_act) == (True, False, 1e-6, "silu")


@pytest.mark.oracle
@pytest.mark.parametrize("variant", VARIANTS, ids=range(len(VARIANTS)))
def test_fields_equal_transformers(oracle, variant):
    theirs = oracle.Qwen2Config(**json.loads(json.dumps(variant))).to_dict()
    ours = Qwen2Config(**json.loads(json.dumps(variant)))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                  "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "use_sliding_window",
                  "sliding_window", "max_window_layers", "layer_types", "attention_dropout", "pad_token_id",
                  "bos_token_id", "eos_token_id"):
        mine = getattr(ours, field)
        theirs_value = dict(theirs[field]) if field == "rope_parameters" else theirs[field]
        if field == "rope_parameters":
            theirs_value.pop("type", None)  # transformers keeps the legacy key beside rope_type
        assert mine == theirs_value, field
    assert ours.num_labels == len(theirs["id2label"])
    expected_head_dim = variant.get("head_dim", ours.hidden_size // ours.num_attention_heads)
    assert ours.head_dim == expected_head_dim


@pytest.mark.parametrize("variant", VARIANTS, ids=range(len(VARIANTS)))
def test_round_trip(tmp_path, variant):
    c = Qwen2Config(**variant)
    c.save_pretrained(tmp_path)
    assert Qwen2Config.from_pretrained(tmp_path) == c


@pytest.mark.oracle
def test_transformers_reads_what_we_write(oracle, tmp_path):
    c = Qwen2Config(**QWEN25_05B_INSTRUCT_V4)
    c.save_pretrained(tmp_path)
    theirs = oracle.Qwen2Config.from_pretrained(tmp_path)
    assert theirs.rope_parameters["rope_theta"] == 1e6 and theirs.max_window_layers == 21
    assert theirs.layer_types == c.layer_types and theirs.tie_word_embeddings


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size 100 is not divisible by num_attention_heads 3"),
    ({"num_attention_heads": 32, "num_key_value_heads": 5}, "num_attention_heads 32 is not divisible by num_key_value_heads 5"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unknown rope_type 'longrope'"),
    ({"rope_scaling": {"type": "linear"}}, "rope_type 'linear' needs factor"),
    ({"hidden_act": "gelu_fancy"}, "unknown activation 'gelu_fancy'"),
    ({"num_hidden_layers": 2, "layer_types": ["full_attention"]}, "expected a list of num_hidden_layers=2 entries, found 1 entries"),
    ({"num_hidden_layers": 1, "layer_types": ["local"]}, "layer_types[0]: expected one of"),
    ({"num_hidden_layers": 1, "layer_types": ["sliding_attention"]}, "sliding_window is None"),
    ({"hidden_size": "896"}, "hidden_size: expected a positive int, found '896'"),
    ({"num_labels": 3, "id2label": {"0": "a"}}, "num_labels=3 contradicts id2label"),
    ({"head_dim": 7, "hidden_size": 28, "num_attention_heads": 4}, "head_dim 7 is odd"),
])
def test_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as e:
        Qwen2Config(**kwargs)
    assert message in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8,\n "oops"}')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 2"):
        Qwen2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Qwen2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"num_key_value_heads": 3}')
    with pytest.raises(ConfigError, match=r"config.json: Qwen2Config: num_attention_heads 32 is not divisible"):
        Qwen2Config.from_pretrained(tmp_path)


def test_unknown_keys_survive():
    c = Qwen2Config(my_extra_key=[1, 2])
    assert c.my_extra_key == [1, 2] and c.to_dict()["my_extra_key"] == [1, 2]


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", float("nan")), ("rms_norm_eps", float("inf")), ("rms_norm_eps", True),
    ("initializer_range", float("nan")), ("attention_dropout", float("inf")),
    ("rope_theta", float("nan")), ("rope_theta", float("inf")), ("rope_theta", -1.0),
])
def test_nan_and_inf_are_refused_naming_the_field(field, value):
    """A NaN eps or theta would give NaN outputs everywhere: refused, naming the field, in both config
    forms (a 4.x top-level rope_theta and a 5.x rope_parameters)."""
    with pytest.raises(ConfigError, match=field):
        Qwen2Config(**{field: value})
    if field == "rope_theta":
        with pytest.raises(ConfigError, match="rope_parameters.rope_theta"):
            Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": value})


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": float("nan")},
    {"rope_type": "dynamic", "factor": float("inf")},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": float("nan")},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": float("inf")},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": float("nan")},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": "1"},
])
def test_nan_and_inf_rope_factors_are_refused(rope):
    bad = next(k for k, v in rope.items() if k != "rope_type" and not (isinstance(v, (int, float)) and math.isfinite(v)))
    with pytest.raises(ConfigError, match=f"rope_parameters.{bad}"):
        Qwen2Config(max_position_embeddings=32, rope_parameters=rope)


def test_yarn_truncate_flag_is_accepted():
    c = Qwen2Config(max_position_embeddings=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "truncate": False})
    assert c.rope_parameters["truncate"] is False


def test_a_contradicting_top_level_rope_theta_is_reported():
    """transformers 5.24 keeps rope_parameters' theta without a word; qwen2np keeps it too, and warns."""
    with pytest.warns(UserWarning, match="rope_theta 10000.0 contradicts rope_parameters.rope_theta 1000000.0"):
        c = Qwen2Config(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert c.rope_parameters["rope_theta"] == 1e6
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # agreeing values: no warning
        Qwen2Config(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
