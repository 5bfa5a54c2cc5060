"""Checks on what a caller passes to a forward pass, with errors that say what and where.

Bad input never reaches the math as a bare IndexError or a broadcasting error.

>>> as_token_ids([[1, 2, 3]], vocab_size=10).shape
(1, 3)
>>> as_token_ids([[1, 12]], vocab_size=10)
Traceback (most recent call last):
...
qwen2np.errors.ModelInputError: input_ids: id 12 at [0, 1] is outside the vocabulary [0, 10)
"""

import numpy as np

from ..errors import ModelInputError, ModelInputTypeError
from ..weights.backend import to_numpy


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
