"""Checks on what a caller passes to a forward pass, with errors that say what and where.

Bad input never reaches the math as a bare IndexError or a broadcasting error, and is refused before the
forward pass writes anything (a KV cache): `forward_arguments` checks a call of Qwen2Model, the rest the
arguments of the heads.

>>> as_token_ids([[1, 2, 3]], vocab_size=10).shape
(1, 3)
>>> as_token_ids([[1, 12]], vocab_size=10)
Traceback (most recent call last):
...
qwen2np.errors.ModelInputError: input_ids: id 12 at [0, 1] is outside the vocabulary [0, 10)
"""

from dataclasses import dataclass
from itertools import repeat

import numpy as np

from ..errors import ModelInputError, ModelInputTypeError
from ..weights.backend import to_numpy
from .cache import DynamicCache
from .losses import check_labels


@dataclass(frozen=True)
class ForwardArguments:
    """The arguments of one forward pass of Qwen2Model, checked, with the config's defaults filled in."""

    ids: object                  # int64 [B, T] on the model's backend, or None when embeddings were given
    embeds: object               # [B, T, D] in the model's dtype, or None when ids were given
    cache: object                # the DynamicCache the pass reads and extends, or None
    attention_mask: object       # None, a padding mask [B, past + T], or a custom additive mask [B or 1, 1, T, S]
    positions: object            # [B or 1, T]: the caller's, or past + arange(T)
    position_ids: object         # the caller's positions [B or 1, T], checked; None when not given
    use_cache: bool
    output_attentions: bool
    output_hidden_states: bool

    @property
    def batch(self):
        return (self.ids if self.embeds is None else self.embeds).shape[0]

    @property
    def length(self):
        return (self.ids if self.embeds is None else self.embeds).shape[1]

    @property
    def cache_layers(self):
        """The cache's layer for each decoder layer, in order (None for each when there is no cache)."""
        return self.cache.layers if self.cache is not None else repeat(None)


def forward_arguments(config, dtype, xp, input_ids=None, inputs_embeds=None, attention_mask=None,
                      position_ids=None, past_key_values=None, cache=None, use_cache=None,
                      output_attentions=None, output_hidden_states=None):
    """Qwen2Model's arguments, checked: exactly one of input_ids [B, T] and inputs_embeds [B, T, D], the
    cache a DynamicCache (a new one when use_cache and none is given), the mask and positions of the right
    shapes for the positions the cache already holds.  -> ForwardArguments

    >>> from qwen2np import Qwen2Config
    >>> config = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> args = forward_arguments(config, np.dtype(np.float32), np, input_ids=[[1, 2, 3]])
    >>> args.batch, args.length, args.positions.tolist(), args.cache.get_seq_length()
    (1, 3, [[0, 1, 2]], 0)
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ModelInputError("You must specify exactly one of input_ids or inputs_embeds")
    cache = one_of(past_key_values, cache)
    use_cache = config.use_cache if use_cache is None else use_cache
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    if inputs_embeds is None:
        ids, embeds = xp.asarray(as_token_ids(input_ids, config.vocab_size)), None
    else:
        ids, embeds = None, as_embeddings(inputs_embeds, config.hidden_size, dtype, xp)
    B, T = (ids if embeds is None else embeds).shape[:2]
    if cache is None and use_cache:
        cache = DynamicCache.from_config(config)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ModelInputTypeError(f"past_key_values: expected a qwen2np DynamicCache, found {type(cache).__name__}")
    past = cache.get_seq_length() if cache is not None else 0
    attention_mask = as_attention_mask(attention_mask, B, past + T)
    positions = as_position_ids(position_ids, B, T, past)
    return ForwardArguments(ids, embeds, cache, attention_mask, positions,
                            positions if position_ids is not None else None, use_cache, output_attentions,
                            output_hidden_states)


def _as_int_array(x, what):
    a = to_numpy(x)   # ids, masks and positions are checked on the host, wherever they were given
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        if a.dtype.kind == "f" and a.size and np.all(a == np.round(a)):
            raise ModelInputTypeError(f"{what}: expected integers, found dtype {a.dtype} (cast with .astype(np.int64))")
        raise ModelInputTypeError(f"{what}: expected an integer array, found {type(x).__name__} of dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def as_token_ids(input_ids, vocab_size):
    """input_ids as int64 [B, T], every id in [0, vocab_size)."""
    ids = _as_int_array(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ModelInputError(
            f"input_ids: expected shape [B, T] with B, T >= 1, found shape {ids.shape} "
            f"(wrap a single sequence as [ids])"
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ModelInputError(f"input_ids: id {ids[b, t]} at [{b}, {t}] is outside the vocabulary [0, {vocab_size})")
    return ids


def as_embeddings(inputs_embeds, hidden_size, dtype, xp):
    """inputs_embeds as [B, T, D] in the model's dtype."""
    e = xp.asarray(inputs_embeds)
    if e.ndim != 3 or e.shape[2] != hidden_size or e.shape[0] == 0 or e.shape[1] == 0:
        raise ModelInputError(f"inputs_embeds: expected shape [B, T, {hidden_size}], found {tuple(e.shape)}")
    if e.dtype.kind != "f":
        raise ModelInputTypeError(f"inputs_embeds: expected floats, found dtype {e.dtype}")
    return e.astype(dtype, copy=False)


def as_attention_mask(attention_mask, batch, total):
    """A 2D padding mask [B, past + T] of 0/1, or a custom additive 4D mask [B, 1, T, S] (used as is)."""
    if attention_mask is None:
        return None
    a = to_numpy(attention_mask)
    if a.ndim == 4:
        return a
    mask = _as_int_array(attention_mask, "attention_mask")
    if mask.shape != (batch, total):
        raise ModelInputError(
            f"attention_mask: expected shape [B, past + T] = ({batch}, {total}), found {mask.shape}"
        )
    return mask


def as_position_ids(position_ids, batch, q_len, past):
    """Positions [B or 1, T]; by default past + arange(T), ignoring padding (as transformers' forward)."""
    if position_ids is None:
        return (np.arange(q_len, dtype=np.int64) + past)[None]
    pos = _as_int_array(position_ids, "position_ids")
    given = pos.shape
    if pos.ndim == 1:
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[1] != q_len or pos.shape[0] not in (1, batch):
        raise ModelInputError(f"position_ids: expected shape [{batch} or 1, {q_len}], found {given}")
    if (pos < 0).any():
        raise ModelInputError(f"position_ids: positions must be >= 0, found {int(pos.min())}")
    return pos


def one_of(past_key_values, cache):
    """transformers 5.24 renamed `past_key_values` to `cache`; accept either, not both."""
    if past_key_values is not None and cache is not None:
        raise ModelInputTypeError("pass the cache as past_key_values or as cache, not both")
    return past_key_values if past_key_values is not None else cache


def batch_and_length(input_ids, inputs_embeds):
    """(B, T) of a call, from whichever input it was given (checked in full by the base model)."""
    given = input_ids if input_ids is not None else inputs_embeds
    shape = tuple(getattr(given, "shape", None) or np.shape(given)) if given is not None else ()
    if len(shape) < 2:
        return (1, 1) if not shape else (shape[0], 0)   # the base model explains the bad shape
    return shape[0], shape[1]


def as_logits_to_keep(logits_to_keep, T):
    """None (every position), a slice of the last k positions, or a checked list of position indices.

    >>> as_logits_to_keep(0, 5), as_logits_to_keep(2, 5), as_logits_to_keep([0, -1], 5)
    (None, slice(-2, None, None), [0, -1])
    """
    if isinstance(logits_to_keep, (bool, np.bool_)):
        raise ModelInputTypeError(f"logits_to_keep: expected an int or a list of positions, found {logits_to_keep!r}")
    if isinstance(logits_to_keep, (int, np.integer)):
        if logits_to_keep < 0:
            raise ModelInputError(f"logits_to_keep: expected an int >= 0 (0 keeps every position), found {logits_to_keep}")
        return slice(-int(logits_to_keep), None) if logits_to_keep > 0 else None
    positions = to_numpy(logits_to_keep)
    if positions.ndim != 1 or not (np.issubdtype(positions.dtype, np.integer) or positions.size == 0):
        raise ModelInputTypeError(f"logits_to_keep: expected an int or a 1D list of integer positions, found "
                        f"{type(logits_to_keep).__name__} of shape {positions.shape} and dtype {positions.dtype}")
    bad = (positions < -T) | (positions >= T)
    if bad.any():
        raise ModelInputError(f"logits_to_keep: position {int(positions[bad][0])} is outside [-{T}, {T}) for T = {T}")
    return positions.astype(np.int64).tolist()


def as_labels(labels, num_classes, shape):
    """Class labels of `shape` (B, T) on the host, each in [0, num_classes) or the ignore index -100."""
    labels = check_labels(labels, num_classes, "labels")
    if labels.shape != shape:
        raise ModelInputError(f"labels: expected shape (B, T) = {shape}, found {labels.shape}")
    return labels
