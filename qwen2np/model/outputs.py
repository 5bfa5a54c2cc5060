"""Model outputs with transformers' field names: attribute, key and index access.

>>> out = CausalLMOutputWithPast(logits=1, past_key_values=None)
>>> out.logits, out["logits"], out[0], out.to_tuple()
(1, 1, 1, (1,))

transformers 5.24 renamed `past_key_values` to `cache` (the old name is deprecated until 5.40); both names
work here.
"""

from dataclasses import dataclass, fields
from typing import Any


class ModelOutput:
    """Base of the output records. Fields left at None are absent from the tuple and key views."""

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no field {key!r} set; it has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    @property
    def cache(self):
        """transformers 5.24's name for past_key_values."""
        return getattr(self, "past_key_values", None)


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Any = None       # [B, T, D], after the final norm
    past_key_values: Any = None         # DynamicCache when use_cache
    hidden_states: Any = None           # L + 1 arrays [B, T, D]: embeddings, layer outputs, final norm
    attentions: Any = None              # L arrays [B, H, T, S]


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Any = None                    # scalar
    logits: Any = None                  # [B, T, V] (or the kept positions)
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None                  # [B, num_labels], pooled at the last non-pad token
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Any = None
    logits: Any = None                  # [B, T, num_labels]
    hidden_states: Any = None
    attentions: Any = None
