"""GenerationConfig: the knobs of `generate`, with transformers 5.24's names, defaults and precedence.

Every field starts as None, meaning "not set here". `generate` resolves a field in this order, as
transformers does (`GenerationMixin._prepare_generation_config`):

1. an argument of `generate(...)` that is not None;
2. the `generation_config=` passed to `generate`;
3. `model.generation_config` (read from the checkpoint's generation_config.json, else built from the
   model config with `from_model_config`);
4. the library defaults of `GenerationConfig.default_generation_params()` (top_k=50!, max_length=20).

>>> gc = GenerationConfig(do_sample=True, temperature=0.7)
>>> gc.temperature, gc.top_k
(0.7, None)
>>> resolved = gc.with_defaults()
>>> resolved.temperature, resolved.top_k, resolved.max_length
(0.7, 50, 20)
"""

import copy
import json
from pathlib import Path

from ..errors import ConfigError, GenerationError

# The fields of transformers 5.24's GenerationConfig, all defaulting to None.
FIELDS = (
    # length
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time",
    "stop_strings",
    # strategy
    "do_sample", "num_beams", "use_mtp",
    # cache
    "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    # logits manipulation
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sequence_bias", "token_healing", "guidance_scale", "watermarking_config",
    # outputs
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate",
    # special tokens
    "pad_token_id", "bos_token_id", "eos_token_id",
    # encoder-decoder and assisted generation
    "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "speculation_type",
    # performance and deprecated
    "compile_config", "disable_compile", "low_memory", "penalty_alpha", "dola_layers",
    "diversity_penalty", "num_beam_groups", "constraints", "force_words_ids", "prefill_chunk_size",
    "continuous_batching_config",
)

# What qwen2np's generate implements; any other field must stay at a neutral value (see `unsupported`).
SUPPORTED = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "use_cache",
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "pad_token_id", "bos_token_id",
    "eos_token_id",
)

# Fields that are accepted when they hold one of these values (the ones that change nothing).
_NEUTRAL = {
    "num_beams": (1,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "encoder_repetition_penalty": (1.0,), "length_penalty": (1.0,), "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,), "num_return_sequences": (1,), "early_stopping": (False,),
    "renormalize_logits": (False,), "remove_invalid_values": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,), "output_scores": (False,), "output_logits": (False,),
    "return_dict_in_generate": (False,), "guidance_scale": (1.0,), "token_healing": (False,),
    "num_beam_groups": (1,), "diversity_penalty": (0.0,), "is_assistant": (False,),
    "num_assistant_tokens": (20,), "num_assistant_tokens_schedule": ("constant",),
    "assistant_confidence_threshold": (0.4,), "assistant_lookbehind": (10,), "target_lookbehind": (10,),
    "disable_compile": (False, True), "low_memory": (False,), "cache_implementation": ("dynamic",),
}

# Fields that only describe the environment (where the file came from, compilation) and never matter here.
_IGNORED = ("compile_config", "cache_config", "max_cache_len", "transformers_version", "continuous_batching_config")


class GenerationConfig:
    """The parameters of one `generate` call. Keyword arguments are generation_config.json keys."""

    def __init__(self, **kwargs):
        kwargs = copy.deepcopy(kwargs)
        from_model_config = kwargs.pop("_from_model_config", None)
        self.transformers_version = kwargs.pop("transformers_version", None)
        kwargs.pop("_commit_hash", None)
        for name in FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        if not from_model_config:
            for name, value in kwargs.items():  # custom entries are kept, as transformers does
                setattr(self, name, value)
        if self.max_new_tokens is not None and _is_int(self.max_new_tokens) and self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, found {self.max_new_tokens}")

    # -- construction ---------------------------------------------------------------------------------

    @staticmethod
    def default_generation_params():
        """transformers 5.24's `_get_default_generation_params`: used for any field nobody set."""
        return {
            "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True,
            "early_stopping": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
            "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
            "exponential_decay_length_penalty": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20,
            "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
            "assistant_lookbehind": 10, "target_lookbehind": 10, "num_beam_groups": 1,
            "diversity_penalty": 0.0,
        }

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A config from a generation_config.json dict (plus overrides in `kwargs`).

        >>> GenerationConfig.from_dict({"do_sample": True, "top_k": 20}).top_k
        20
        """
        if not isinstance(config_dict, dict):
            raise ConfigError(f"GenerationConfig.from_dict: expected a dict, found {type(config_dict).__name__}")
        return cls(**{**config_dict, **kwargs})

    @classmethod
    def from_model_config(cls, model_config):
        """The generation fields found in a model config (a Qwen2Config or a config.json dict).

        For Qwen2 that is bos/eos/pad_token_id; everything else stays unset, so the library defaults apply.

        >>> gc = GenerationConfig.from_model_config({"bos_token_id": 151643, "eos_token_id": 151645})
        >>> gc.bos_token_id, gc.eos_token_id, gc.pad_token_id
        (151643, 151645, None)
        """
        d = model_config if isinstance(model_config, dict) else model_config.to_dict()
        found = {k: v for k, v in d.items() if k in FIELDS and v is not None}
        # subtle: PreTrainedConfig carries output_attentions/output_hidden_states=False, which are also
        # generation fields; they are neutral either way.
        return cls(**found, _from_model_config=True)

    @classmethod
    def from_pretrained(cls, path, config_file_name="generation_config.json"):
        """Read `generation_config.json` from a folder (or the file itself)."""
        path = Path(path)
        file = path / config_file_name if path.is_dir() else path
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no {config_file_name} in {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)

    # -- use ------------------------------------------------------------------------------------------

    def update(self, defaults_only=False, **kwargs):
        """Set the given fields (only those still None when `defaults_only`); return the unknown keys."""
        unused = {}
        for key, value in kwargs.items():
            if not hasattr(self, key):
                unused[key] = value
            elif not defaults_only or getattr(self, key) is None:
                setattr(self, key, value)
        return unused

    def with_defaults(self, *fallbacks):
        """A copy where every field still None takes its value from `fallbacks` (GenerationConfigs, in
        order), then from the library defaults."""
        out = copy.deepcopy(self)
        for fb in fallbacks:
            if fb is not None:
                out.update(defaults_only=True, **{k: v for k, v in fb.to_dict().items() if hasattr(out, k)})
        out.update(defaults_only=True, **self.default_generation_params())
        return out

    def unsupported(self):
        """The fields set to something qwen2np's generate does not implement, as `{name: value}`."""
        out = {}
        for name, value in self.to_dict().items():
            if value is None or name in SUPPORTED or name in _IGNORED:
                continue
            if name in _NEUTRAL and value in _NEUTRAL[name]:
                continue
            if name in FIELDS:
                out[name] = value
        return out

    def to_dict(self):
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}

    def to_diff_dict(self):
        """Only the fields that are set (what a generation_config.json would hold)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def to_json_string(self):
        return json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder, config_file_name="generation_config.json"):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / config_file_name).write_text(self.to_json_string(), encoding="utf-8")

    def __eq__(self, other):
        return isinstance(other, GenerationConfig) and self.to_diff_dict() == other.to_diff_dict()

    def __repr__(self):
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), sort_keys=True)}"


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)
