"""GenerationConfig: transformers' defaults, fields and precedence (arguments > generation_config >
model.generation_config > library defaults)."""

import json

import numpy as np
import pytest

from qwen2np import Qwen2Config
from qwen2np.errors import ConfigError, GenerationError
from qwen2np.generation import GenerationConfig
from qwen2np.generation.config import FIELDS
from qwen2np.generation.testing import TinyCountingLM

QWEN25_INSTRUCT = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                   "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20,
                   "top_p": 0.8, "transformers_version": "4.37.0"}


@pytest.mark.oracle
def test_defaults_and_fields_are_transformers(oracle):
    theirs = oracle.GenerationConfig
    assert GenerationConfig.default_generation_params() == theirs._get_default_generation_params()
    assert set(FIELDS) == {k for k in vars(theirs()) if not k.startswith("_") and k != "transformers_version"}


@pytest.mark.oracle
def test_from_model_config_matches(oracle):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=151643, eos_token_id=151645)
    ours = GenerationConfig.from_model_config(config).to_diff_dict()
    theirs = oracle.GenerationConfig.from_model_config(oracle.Qwen2Config(**config.to_dict())).to_diff_dict()
    theirs.pop("transformers_version", None)
    theirs.pop("_from_model_config", None)
    assert ours == theirs


@pytest.mark.oracle
@pytest.mark.parametrize("passed, kwargs", [
    (None, {}),
    (None, {"max_new_tokens": 5, "top_k": 3}),
    ({"temperature": 0.2, "max_length": 9}, {}),
    ({"temperature": 0.2}, {"temperature": 0.9, "do_sample": False}),
])
def test_precedence_matches_transformers(oracle, passed, kwargs):
    import torch

    hf_config = oracle.Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    hf = oracle.Qwen2ForCausalLM(hf_config)
    hf.generation_config = oracle.GenerationConfig(**QWEN25_INSTRUCT)
    theirs, _ = hf._prepare_generation_config(
        None if passed is None else oracle.GenerationConfig(**passed), **kwargs)
    lm = TinyCountingLM(generation_config=GenerationConfig.from_dict(QWEN25_INSTRUCT))
    ours, _ = lm.prepare_generation_config(None if passed is None else GenerationConfig(**passed), **kwargs)
    for name in FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    del torch


def test_generation_config_json_round_trip(tmp_path):
    gc = GenerationConfig.from_dict(QWEN25_INSTRUCT)
    gc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["top_k"] == 20
    again = GenerationConfig.from_pretrained(tmp_path)
    assert again == gc and again.eos_token_id == [151645, 151643]
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GenerationConfig.from_pretrained(tmp_path / "bad")
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_qwen25_defaults_drive_generate():
    # the instruct generation_config samples: with a seed, generate is reproducible; greedy on request
    lm = TinyCountingLM(generation_config=GenerationConfig.from_dict({**QWEN25_INSTRUCT, "eos_token_id": 9,
                                                                     "pad_token_id": 0}))
    a = lm.generate([[1, 2]], max_new_tokens=4, seed=5)
    assert np.array_equal(a, lm.generate([[1, 2]], max_new_tokens=4, seed=5))
    assert lm.generate([[1, 2]], max_new_tokens=4, do_sample=False).tolist() == [[1, 2, 3, 4, 5, 6]]
