"""`GenerationMixin.generate`: the decoding loop of transformers 5.24 (`GenerationMixin._sample`), greedy
or sampled, for one prompt or a left-padded batch.

One step of the loop, for a batch of B rows:

    logits = model(new ids, full mask, positions, cache, logits_to_keep=1)  # [B, 1, V]
    scores = processors(ids so far, logits[:, -1] as float32)                 # [B, V]
    next   = argmax(scores) or a seeded draw (sampling.py)                    # [B]
    next   = where(row unfinished, next, pad)                                 # finished rows pad
    ids    = concat(ids, next)                                                # [B, S+1]
    unfinished &= next not in eos;  stop when no row is unfinished or S+1 == max_length

The model class inherits this mixin; it needs `self.config` (vocab_size, max_position_embeddings),
optionally `self.generation_config`, and `self(input_ids=, attention_mask=, position_ids=,
past_key_values=, use_cache=, logits_to_keep=)` returning `.logits` [B, T, V] and `.past_key_values`.
"""

import numpy as np

from ..errors import GenerationError
from ..weights.backend import to_numpy
from . import sampling
from .config import FIELDS, GenerationConfig
from .logits_process import LogitsProcessorList, build_logits_processors
from .streamers import tells_streamer_on_error

MAX_SEED = 1 << 64


class GenerationMixin:
    """Adds `generate` to a causal language model."""

    @tells_streamer_on_error  # a TextIteratorStreamer's consumer learns that generate failed
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        generation_config=None,
        max_new_tokens=None,
        max_length=None,
        do_sample=None,
        temperature=None,
        top_k=None,
        top_p=None,
        min_p=None,
        repetition_penalty=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=None,
        streamer=None,
        **kwargs,
    ):
        """Continue each prompt row; return the prompt plus the new ids, int64 [B, T + new].

        Arguments mean what they mean in transformers (`max_new_tokens`, `do_sample`, `top_p`, ...);
        unset ones come from `generation_config`, then `self.generation_config`, then the library
        defaults (greedy, at most 20 tokens in total). `seed` (0 <= seed < 2**64) makes sampling
        reproducible everywhere (docs/sampling.md); without it, sampling draws a fresh seed.
        `streamer` gets `put(ids)` / `end()` calls (see streamers.py).

        >>> from qwen2np.generation.testing import TinyCountingLM
        >>> lm = TinyCountingLM()          # a stub model whose next token is (last + 1) % 10
        >>> lm.generate([[3, 4]], max_new_tokens=4).tolist()
        [[3, 4, 5, 6, 7, 8]]
        >>> lm.generate([[3, 4]], max_new_tokens=9, eos_token_id=7, pad_token_id=0).tolist()
        [[3, 4, 5, 6, 7]]
        """
        if "inputs" in kwargs:  # transformers' name of the first argument
            if input_ids is not None:
                raise TypeError("generate() got both `inputs` and `input_ids`; pass one")
            input_ids = kwargs.pop("inputs")
        unknown = sorted(k for k in kwargs if k not in FIELDS)
        if unknown:
            raise TypeError(
                f"generate() got unexpected keyword arguments {unknown}: they are neither arguments of "
                f"generate nor GenerationConfig fields (a typo?)"
            )
        named = dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id)
        explicit = {k: v for k, v in {**named, **kwargs}.items() if v is not None}

        # 1. the configuration: arguments > generation_config > model's generation_config > defaults
        gc, has_default_max_length = self.prepare_generation_config(generation_config, **explicit)
        validate_generation_config(gc)
        if seed is not None and not (_is_int(seed) and 0 <= seed < MAX_SEED):
            raise GenerationError(f"seed must be an integer in [0, 2**64), found {seed!r}")

        # 2. the inputs
        vocab_size = self.config.vocab_size
        if input_ids is None:
            if gc.bos_token_id is None:
                raise GenerationError("generate() needs input_ids (there is no bos_token_id to start from)")
            input_ids = [[gc.bos_token_id]]
        ids = as_token_matrix(input_ids, "input_ids", vocab_size)  # [B, T]
        B, T = ids.shape
        eos = _eos_list(gc.eos_token_id)
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
        if pad is not None and pad >= vocab_size:  # finished rows are fed pad: it must be a token
            raise GenerationError(f"pad_token_id {pad} is not a token id of this model (vocab_size {vocab_size})")
        if attention_mask is None:
            mask = infer_attention_mask(ids, pad, eos)
        else:
            mask = as_attention_mask(attention_mask, ids.shape)  # [B, T]

        # 3. lengths (transformers' _prepare_generated_length), then the position limit
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if gc.max_new_tokens is not None:
            total = gc.max_new_tokens + T
        elif has_default_max_length:
            total = gc.max_length + T  # by default, 20 new tokens
            if max_pos is not None:
                total = min(total, max_pos)
        else:
            total = gc.max_length
        if max_pos is not None and T >= max_pos:
            raise GenerationError(
                f"the prompt is {T} tokens long; this model handles at most max_position_embeddings="
                f"{max_pos} positions, prompt and new tokens together"
            )
        if max_pos is not None and total > max_pos:
            raise GenerationError(
                f"prompt ({T} tokens) + max_new_tokens ({total - T}) = {total} exceeds the model's "
                f"max_position_embeddings={max_pos}; shorten the prompt or lower max_new_tokens"
            )
        if T >= total:
            raise GenerationError(
                f"the prompt is {T} tokens long but max_length is {total}: nothing to generate; "
                f"set max_new_tokens instead"
            )
        min_length = gc.min_length
        if gc.min_new_tokens is not None:
            min_length = gc.min_new_tokens + T
        gc.min_length = min_length

        processors = LogitsProcessorList(build_logits_processors(gc, T, mask))
        if gc.do_sample and seed is None:
            seed = sampling.fresh_seed()
        return self._decode_loop(ids, mask, gc, processors, total, eos, pad, seed, streamer)

    def prepare_generation_config(self, generation_config=None, **kwargs):
        """The GenerationConfig a call uses, and whether max_length is the library default (transformers'
        `_prepare_generation_config`): `kwargs` > `generation_config` > `self.generation_config` > defaults.
        """
        model_gc = getattr(self, "generation_config", None)
        if model_gc is None:
            model_gc = GenerationConfig.from_model_config(self.config)
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and model_gc.max_length is None
        )
        gc = (generation_config or GenerationConfig()).with_defaults(model_gc)
        gc.update(**{k: v for k, v in kwargs.items() if v is not None})
        return gc, has_default_max_length

    def _decode_loop(self, ids, mask, gc, processors, max_length, eos, pad, seed, streamer):
        B, T = ids.shape
        # subtle: positions come from the mask (cumsum - 1, pads 0: transformers 5.24's
        # _prepare_position_ids_for_generation), so a left-padded row starts at position 0 like an
        # unpadded one. A plain forward call would start it at the pad count (docs/generation.md).
        position_ids = np.cumsum(mask, axis=1, dtype=np.int64) - 1  # [B, T]
        position_ids[mask == 0] = 0
        # like transformers, an all-ones mask is dropped: the model then needs no padding mask at all
        full_mask = None if mask.all() else mask
        eos_arr = np.array(eos, dtype=np.int64)
        unfinished = np.ones(B, dtype=bool)
        if streamer is not None:
            streamer.put(ids.copy())

        out = self(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                   past_key_values=None, use_cache=bool(gc.use_cache), logits_to_keep=1)
        step = 0
        while True:
            logits = np.asarray(to_numpy(out.logits[:, -1, :]), dtype=np.float32)  # [B, V]
            check_finite(logits, unfinished, step, getattr(self, "dtype", None))   # never a token drawn from NaN
            scores = processors(ids, logits)
            if gc.do_sample:
                next_tokens = sampling.sample_tokens(scores, seed, step)  # [B]
            else:
                next_tokens = np.argmax(scores, axis=-1).astype(np.int64)  # [B]
            if len(eos_arr):  # finished rows get pad; only then can a row finish
                next_tokens = np.where(unfinished, next_tokens, pad).astype(np.int64)
            ids = np.concatenate([ids, next_tokens[:, None]], axis=1)  # [B, S+1]
            if len(eos_arr):
                unfinished &= ~np.isin(next_tokens, eos_arr)
            if streamer is not None:
                streamer.put(next_tokens.copy())
            step += 1
            if not unfinished.any() or ids.shape[1] >= max_length:
                break

            # the next forward pass: one new position per row, the whole mask (past + new)
            position_ids = np.concatenate([position_ids, position_ids[:, -1:] + 1], axis=1)
            if full_mask is not None:
                full_mask = np.concatenate([full_mask, np.ones((B, 1), dtype=full_mask.dtype)], axis=1)
            if gc.use_cache:
                out = self(input_ids=ids[:, -1:], attention_mask=full_mask,
                           position_ids=position_ids[:, -1:], past_key_values=out.past_key_values,
                           use_cache=True, logits_to_keep=1)
            else:  # no cache: run the whole sequence again
                out = self(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                           past_key_values=None, use_cache=False, logits_to_keep=1)
        if streamer is not None:
            streamer.end()
        return ids


def check_finite(logits, rows, step, dtype=None):
    """Refuse to pick a token from logits [B, V] that are NaN or infinite in one of the `rows` [B] still
    generating: argmax of NaN is token 0 and a draw from it is noise, so a broken forward pass (a float16
    overflow, a NaN weight) would otherwise come out as plausible-looking text. `dtype` is the model's.

    >>> check_finite(np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), np.array([True, True]), 3, np.float16)
    Traceback (most recent call last):
    ...
    qwen2np.errors.GenerationError: the model's logits are not finite in row 1 at step 3 (the 4th new token): 1 NaN and 0 infinite of 2 values; refusing to pick a token from them (in float16 a value beyond 65504 overflows: try dtype="bfloat16" or "float32")
    """
    bad = ~np.isfinite(logits).all(axis=-1) & rows
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        values = logits[row]
        raise GenerationError(
            f"the model's logits are not finite in row {row} at step {step} (the {_ordinal(step + 1)} new token): "
            f"{int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} infinite of {values.size} "
            f"values; refusing to pick a token from them" + (
                ' (in float16 a value beyond 65504 overflows: try dtype="bfloat16" or "float32")'
                if dtype is not None and np.dtype(dtype) == np.float16 else ""))


def _ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# -- checks of the arguments --------------------------------------------------------------------------


def validate_generation_config(gc):
    """Raise GenerationError, naming the argument and its value, for settings generate cannot honour."""
    def bad(name, want):
        raise GenerationError(f"{name} must be {want}, found {getattr(gc, name)!r}")

    if gc.max_new_tokens is not None and not (_is_int(gc.max_new_tokens) and gc.max_new_tokens >= 1):
        bad("max_new_tokens", "an integer >= 1")
    if gc.max_length is not None and not (_is_int(gc.max_length) and gc.max_length >= 1):
        bad("max_length", "an integer >= 1")
    if gc.do_sample not in (True, False):
        bad("do_sample", "True or False")
    if gc.do_sample and not (_is_number(gc.temperature) and gc.temperature > 0):
        bad("temperature", "a number > 0 when sampling (use do_sample=False for greedy decoding)")
    if not (_is_int(gc.top_k) and gc.top_k >= 0):
        bad("top_k", "an integer >= 0 (0 disables top-k)")
    if not (_is_number(gc.top_p) and 0 < gc.top_p <= 1):
        bad("top_p", "a number in (0, 1]")
    if gc.min_p is not None and not (_is_number(gc.min_p) and 0 <= gc.min_p <= 1):
        bad("min_p", "a number in [0, 1]")
    if not (_is_number(gc.repetition_penalty) and gc.repetition_penalty > 0):
        bad("repetition_penalty", "a number > 0 (1.0 means no penalty)")
    for name in ("min_length", "min_new_tokens"):
        value = getattr(gc, name)
        if value is not None and not (_is_int(value) and value >= 0):
            bad(name, "an integer >= 0")
    for name in ("pad_token_id", "bos_token_id"):
        value = getattr(gc, name)
        if value is not None and not (_is_int(value) and value >= 0):
            bad(name, "a token id (an integer >= 0)")
    eos = gc.eos_token_id
    eos_list = eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if not all(_is_int(e) and e >= 0 for e in eos_list):
        bad("eos_token_id", "a token id or a list of token ids")
    unsupported = gc.unsupported()
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise GenerationError(f"not implemented in qwen2np generate: {listed} (greedy and sampling only)")


def as_token_matrix(x, name, vocab_size):
    """`x` as an int64 [B, T] array of token ids in [0, vocab_size), or a GenerationError saying why not."""
    try:
        arr = np.asarray(to_numpy(x) if not isinstance(x, list) else x)
    except ValueError:
        raise GenerationError(
            f"{name}: rows of different lengths; pad them on the left "
            f"(tokenizer(texts, padding=True, padding_side='left'))"
        ) from None
    if arr.dtype == object:
        raise GenerationError(f"{name}: rows of different lengths; pad them on the left "
                              f"(tokenizer(texts, padding=True, padding_side='left'))")
    if arr.ndim != 2:
        raise GenerationError(f"{name}: expected a [batch, length] array of token ids, found shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise GenerationError(f"{name}: expected at least one row and one token, found shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise GenerationError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise GenerationError(
            f"{name}[{b}, {t}] = {arr[b, t]} is not a token id of this model (vocab_size {vocab_size})"
        )
    return arr


def as_attention_mask(x, shape):
    arr = np.asarray(to_numpy(x) if not isinstance(x, list) else x)
    if arr.shape != shape:
        raise GenerationError(f"attention_mask: expected shape {shape} (that of input_ids), found {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise GenerationError("attention_mask: expected only 0 (padding) and 1 (token) values")
    return arr.astype(np.int64)


def infer_attention_mask(ids, pad, eos):
    """transformers' `_prepare_attention_mask_for_generation`: mask out pad ids, unless pad is also an
    eos id (then padding cannot be told from text) or does not occur."""
    if pad is None or not (ids == pad).any() or pad in eos:
        return np.ones(ids.shape, dtype=np.int64)
    return (ids != pad).astype(np.int64)


def _eos_list(eos):
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
