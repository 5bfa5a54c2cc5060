"""Qwen2Config: every field of transformers 5.24's Qwen2Config, its defaults, and checks that name the field.

A config is a plain record of hyperparameters. It reads the config.json files written by transformers
4.x (top-level `rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`, `layer_types`), and writes the
5.x form.

>>> c = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2)
>>> c.head_dim, c.num_key_value_groups, c.rope_parameters
(64, 7, {'rope_theta': 10000.0, 'rope_type': 'default'})
>>> Qwen2Config(hidden_size=100, num_attention_heads=3)
Traceback (most recent call last):
...
qwen2np.errors.ConfigError: Qwen2Config: hidden_size 100 is not divisible by num_attention_heads 3 (set head_dim explicitly if that is intended)
"""

import copy
import json
import math
import warnings
from pathlib import Path

from .errors import ConfigError

# name -> default, in transformers 5.24's order
QWEN2_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_parameters": None,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": None,
    "attention_dropout": 0.0,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}

# fields every transformers config has (PreTrainedConfig); kept so a config round-trips
GENERIC_DEFAULTS = {
    "head_dim": None,  # not a Qwen2 field, but honoured when present (transformers >= 4.48)
    "id2label": None,
    "problem_type": None,
    "classifier_dropout": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict": True,
    "architectures": None,
    "dtype": None,
}

ROPE_TYPES = {  # rope_type -> the keys it requires besides rope_type and rope_theta
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings"},
}
# rope_parameters keys that scale or divide, so must be > 0 (the others, e.g. beta_fast, only be finite)
_POSITIVE_ROPE_KEYS = {"rope_theta", "factor", "original_max_position_embeddings", "attention_factor"}
ACTIVATIONS = ("silu", "swish", "relu", "gelu_pytorch_tanh", "gelu_new")
LAYER_TYPES = ("full_attention", "sliding_attention")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    """A finite int or float (not a bool, not NaN or ±inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Qwen2Config:
    """The hyperparameters of a Qwen2 model. Keyword arguments are the config.json keys."""

    model_type = "qwen2"

    def __init__(self, **kwargs):
        kwargs = copy.deepcopy(kwargs)
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        if "torch_dtype" in kwargs:  # the 4.x name of `dtype`
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        for name, default in {**QWEN2_DEFAULTS, **GENERIC_DEFAULTS}.items():
            setattr(self, name, kwargs.pop(name, default))

        # transformers 4.x wrote rope_theta (and rope_scaling) at the top level; 5.x folds them in
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        self.rope_parameters = self._standard_rope_parameters(rope_scaling or self.rope_parameters, rope_theta)

        num_labels = kwargs.pop("num_labels", None)
        label2id = kwargs.pop("label2id", None)
        self._set_labels(num_labels, label2id)

        # subtle: transformers nulls sliding_window whenever use_sliding_window is False, *before*
        # deriving layer_types, so published configs (use_sliding_window=false) slide nowhere.
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            # subtle: layers at index >= max_window_layers slide: the *top* layers, although the
            # max_window_layers docstring says the bottom ones (docs/sliding-window.md).
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.extra = kwargs  # unknown keys survive a round trip, as in transformers
        for name, value in kwargs.items():
            if not hasattr(type(self), name):
                setattr(self, name, value)
        self.validate()

    # -- derived values (the dimension legend of docs/dimensions.md) ------------------------------

    @property
    def num_key_value_groups(self):
        """G: the query heads served by each key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_labels(self):
        return len(self.id2label)

    @property
    def head_dim(self):
        """HD: an explicit head_dim wins (transformers >= 4.48 honours it), else hidden_size // heads."""
        if self._explicit_head_dim is not None:
            return self._explicit_head_dim
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value):
        self._explicit_head_dim = value

    # -- construction helpers -----------------------------------------------------------------------

    def _standard_rope_parameters(self, rope, rope_theta):
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"Qwen2Config.rope_parameters: expected a dict, found {rope!r}")
        rope = dict(rope or {})
        if "type" in rope:  # legacy key of rope_scaling
            rope.setdefault("rope_type", rope.pop("type"))
        if rope_theta is not None and "rope_theta" in rope and rope["rope_theta"] != rope_theta:
            # subtle: transformers 5.24 keeps rope_parameters' value without a word (setdefault); the same
            # here, but said aloud, since one of the two numbers in the file is wrong (docs/model.md)
            warnings.warn(f"Qwen2Config: the top-level rope_theta {rope_theta!r} contradicts "
                          f"rope_parameters.rope_theta {rope['rope_theta']!r}; rope_parameters wins, as in "
                          "transformers", stacklevel=4)
        rope.setdefault("rope_theta", float(rope_theta) if _is_number(rope_theta) else
                        10000.0 if rope_theta is None else rope_theta)
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] == "yarn":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return rope

    def _set_labels(self, num_labels, label2id):
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if num_labels is not None and num_labels != len(self.id2label):
                raise ConfigError(
                    f"Qwen2Config: num_labels={num_labels} contradicts id2label, which has "
                    f"{len(self.id2label)} entries"
                )
        else:
            n = 2 if num_labels is None else num_labels
            if not _is_int(n) or n < 1:
                raise ConfigError(f"Qwen2Config.num_labels: expected a positive int, found {n!r}")
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = label2id if label2id is not None else {v: k for k, v in self.id2label.items()}

    # -- validation ----------------------------------------------------------------------------------

    def validate(self):
        """Raise ConfigError naming the field when the config cannot describe a working Qwen2 model."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"Qwen2Config.{name}: expected a positive int, found {value!r}")
        explicit_head_dim = self._explicit_head_dim
        if explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"Qwen2Config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} (set head_dim explicitly if that is intended)"
            )
        if explicit_head_dim is not None and (not _is_int(explicit_head_dim) or explicit_head_dim < 1):
            raise ConfigError(f"Qwen2Config.head_dim: expected a positive int, found {explicit_head_dim!r}")
        if self.head_dim % 2:
            raise ConfigError(f"Qwen2Config: head_dim {self.head_dim} is odd; RoPE rotates pairs of dimensions")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"Qwen2Config: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"Qwen2Config.hidden_act: unknown activation {self.hidden_act!r}; "
                f"qwen2np knows {', '.join(ACTIVATIONS)}"
            )
        if not _is_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ConfigError(f"Qwen2Config.rms_norm_eps: expected a finite positive float, found {self.rms_norm_eps!r}")
        for name in ("initializer_range", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ConfigError(f"Qwen2Config.{name}: expected a finite number >= 0, found {value!r}")
        self._validate_rope()
        self._validate_layer_types()
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"Qwen2Config.problem_type: expected one of {PROBLEM_TYPES[1:]} or None, found {self.problem_type!r}"
            )
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ConfigError(f"Qwen2Config.{name}: expected an int or null, found {value!r}")

    def _validate_rope(self):
        rope = self.rope_parameters
        kind = rope["rope_type"]
        if kind not in ROPE_TYPES:
            raise ConfigError(
                f"Qwen2Config.rope_parameters: unknown rope_type {kind!r}; "
                f"qwen2np knows {', '.join(ROPE_TYPES)}"
            )
        missing = ROPE_TYPES[kind] - set(rope)
        if missing:
            raise ConfigError(
                f"Qwen2Config.rope_parameters: rope_type {kind!r} needs {', '.join(sorted(missing))}; "
                f"found keys {sorted(rope)}"
            )
        for key, value in rope.items():   # every number a RoPE type reads: finite, and positive where it scales
            if key in ("rope_type", "type") or (key == "truncate" and isinstance(value, bool)):
                continue
            if value is not None and not _is_number(value):
                raise ConfigError(f"Qwen2Config.rope_parameters.{key}: expected a finite number, found {value!r}")
            if key in _POSITIVE_ROPE_KEYS and value is not None and value <= 0:
                raise ConfigError(f"Qwen2Config.rope_parameters.{key}: expected a positive number, found {value!r}")

    def _validate_layer_types(self):
        types = self.layer_types
        if not isinstance(types, list) or len(types) != self.num_hidden_layers:
            found = f"{len(types)} entries" if isinstance(types, list) else repr(types)
            raise ConfigError(
                f"Qwen2Config.layer_types: expected a list of num_hidden_layers={self.num_hidden_layers} "
                f"entries, found {found}"
            )
        for i, t in enumerate(types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"Qwen2Config.layer_types[{i}]: expected one of {LAYER_TYPES}, found {t!r}")
        if "sliding_attention" in types and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ConfigError(
                "Qwen2Config.layer_types has sliding_attention layers but sliding_window is "
                f"{self.sliding_window!r} (use_sliding_window={self.use_sliding_window}); "
                "set use_sliding_window=true and a positive sliding_window"
            )

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self):
        """The config.json dict, in transformers 5.x form.

        >>> Qwen2Config.from_dict(Qwen2Config(num_hidden_layers=2).to_dict()).num_hidden_layers
        2
        """
        d = {"model_type": self.model_type}
        for name in list(QWEN2_DEFAULTS) + list(GENERIC_DEFAULTS):
            d[name] = copy.deepcopy(getattr(self, name))
        if self._explicit_head_dim is None:
            del d["head_dim"]
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = dict(self.label2id)
        d.update(copy.deepcopy(self.extra))
        return d

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ConfigError(f"Qwen2Config.from_dict: expected a dict, found {type(d).__name__}")
        model_type = d.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"Qwen2Config: model_type is {model_type!r}, not 'qwen2'")
        return cls(**d)

    @classmethod
    def from_pretrained(cls, path):
        """Read `config.json` from a folder (or the path of a json file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(self.to_json_string(), encoding="utf-8")

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other):
        return isinstance(other, Qwen2Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Qwen2Config {self.to_json_string()}"
