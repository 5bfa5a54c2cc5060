"""`tokenizer(text)` and `tokenizer.encode(text)`: one string, a batch, or text pairs, with truncation,
padding and attention masks as transformers 5.24 makes them (its `tokenizers`-backed path).

The order of the work: encode each text -> add BOS/EOS if configured (Qwen2 adds none) -> truncate ->
warn once if a sequence is longer than ``model_max_length`` -> pad -> convert to NumPy if asked.
"""

from ..errors import TokenizerInputError, TokenizerTypeError
from .batch_encoding import BatchEncoding, pad_rows, truncate_pair
from .decoding import logger

LARGE_INTEGER = int(1e20)  # above this, model_max_length means "unknown" (transformers' rule)
_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")


def _padding_strategy(padding):
    padding = getattr(padding, "value", padding)
    if padding is False or padding is None or padding == "do_not_pad":
        return None
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        return "max_length"
    raise TokenizerInputError(f"padding={padding!r}: expected True, False, 'longest', 'max_length' or 'do_not_pad'")


def _truncation_strategy(truncation):
    truncation = getattr(truncation, "value", truncation)
    if truncation is None or truncation is False or truncation == "do_not_truncate":
        return None
    if truncation is True:
        return "longest_first"
    if truncation in _STRATEGIES:
        return truncation
    raise TokenizerInputError(
        f"truncation={truncation!r}: expected True, False, 'longest_first', 'only_first' or 'only_second'")


def _check_texts(text, name):
    """(is_batch, list of texts), with a TokenizerTypeError naming anything that is not a str."""
    if isinstance(text, str):
        return False, [text]
    if isinstance(text, (list, tuple)):
        for k, t in enumerate(text):
            if not isinstance(t, str):
                raise TokenizerTypeError(f"{name}[{k}]: expected a str, found {type(t).__name__}")
        return True, list(text)
    raise TokenizerTypeError(f"{name}: expected a str or a list of str, found {type(text).__name__}")


def _check_count(value, name, smallest):
    """`value` if it is None or an int >= `smallest` (NumPy integers too); else a one-line error."""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TokenizerTypeError(f"{name}: expected an int or None, found {type(value).__name__} {value!r:.40}")
    value = value.__index__()
    if value < smallest:
        raise TokenizerInputError(f"{name}: expected an int >= {smallest} or None, found {value}")
    return value


class BatchMethods:
    """The batch-shaping methods of Qwen2Tokenizer (mixed into the class)."""

    def __call__(self, text=None, text_pair=None, add_special_tokens=True, padding=False, truncation=None,
                 max_length=None, stride=0, is_split_into_words=False, pad_to_multiple_of=None,
                 padding_side=None, return_tensors=None, return_token_type_ids=None,
                 return_attention_mask=None, return_overflowing_tokens=False,
                 return_special_tokens_mask=False, return_offsets_mapping=False, return_length=False,
                 verbose=True, split_special_tokens=None, **kwargs):
        """Encode a string, a list of strings, or text pairs into a `BatchEncoding`.

        >>> from qwen2np import Qwen2Tokenizer
        >>> tok = Qwen2Tokenizer.from_pretrained()
        >>> enc = tok(["Hello world", "Hi"], padding=True, return_tensors="np")
        >>> enc.input_ids.tolist(), enc.attention_mask.tolist()
        ([[9707, 1879], [13048, 151643]], [[1, 1], [1, 0]])
        """
        unsupported = {"is_split_into_words": is_split_into_words, "return_overflowing_tokens":
                       return_overflowing_tokens, "return_offsets_mapping": return_offsets_mapping,
                       "stride": stride}
        for key, value in unsupported.items():
            if value:
                raise TokenizerInputError(f"{key}={value!r}: not supported by qwen2np's tokenizer")
        for key in ("text_target", "text_pair_target"):
            if kwargs.pop(key, None) is not None:
                raise TokenizerInputError(f"{key}: not supported by qwen2np's tokenizer (it has no target mode)")
        if kwargs:
            raise TokenizerTypeError(f"tokenizer call: unexpected keyword argument(s) {sorted(kwargs)}")
        if text is None:
            raise TokenizerTypeError("tokenizer call: expected `text` (a str or a list of str), found None")
        max_length = _check_count(max_length, "max_length", 0)
        pad_to_multiple_of = _check_count(pad_to_multiple_of, "pad_to_multiple_of", 0)  # 0: none, as transformers
        is_batch, texts = _check_texts(text, "text")
        pairs = None
        if text_pair is not None:
            pair_batch, pairs = _check_texts(text_pair, "text_pair")
            if pair_batch != is_batch or len(pairs) != len(texts):
                raise TokenizerInputError(
                    f"text_pair: expected {'a list of ' + str(len(texts)) + ' str' if is_batch else 'a str'} "
                    f"to match text, found {len(pairs) if pair_batch else 'a str'}")
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens

        # -- strategies, resolved as transformers' _get_padding_truncation_strategies does
        pad = _padding_strategy(padding)
        trunc = _truncation_strategy(truncation)
        if max_length is not None and padding is False and truncation is None:
            trunc = "longest_first"  # max_length alone turns truncation on
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = None
                else:
                    max_length = self.model_max_length
            if trunc is not None:
                if self.model_max_length > LARGE_INTEGER:
                    trunc = None
                else:
                    max_length = self.model_max_length
        if pad is not None and self.pad_token_id is None:
            raise TokenizerInputError(
                "padding: asked to pad but the tokenizer has no pad token; set tokenizer.pad_token first")
        if trunc is not None and pad is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise TokenizerInputError(
                f"truncation length {max_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}")
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise TokenizerInputError(f"padding_side={side!r}: expected 'left' or 'right'")

        # -- encode, add special tokens, truncate
        rows, type_rows, special_rows = [], [], []
        for k, t in enumerate(texts):
            ids = self._with_special(self._encode_text(t, split_special_tokens), add_special_tokens)
            pair_ids = None
            if pairs is not None:
                pair_ids = self._with_special(self._encode_text(pairs[k], split_special_tokens), add_special_tokens)
            if trunc is not None:
                ids, pair_ids = truncate_pair(ids, pair_ids, max_length, trunc, self.truncation_side)
            row = ids + (pair_ids or [])
            rows.append(row)
            type_rows.append([0] * len(ids) + [1] * len(pair_ids or []))
            special_rows.append(self._special_mask(row, add_special_tokens))
            if max_length is None and verbose and len(row) > self.model_max_length:
                self._warn_too_long(len(row))

        # -- pad
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        masks = [[1] * len(r) for r in rows]
        if pad is not None:
            length = max(map(len, rows), default=0) if pad == "longest" else max_length
            if pad_to_multiple_of and length % pad_to_multiple_of:
                length += pad_to_multiple_of - length % pad_to_multiple_of
            rows, masks, type_rows = pad_rows(rows, length, self.pad_token_id, side, type_rows)
            special_rows = pad_rows(special_rows, length, 1, side)[0]
        data = {"input_ids": rows}
        if return_token_type_ids:
            data["token_type_ids"] = type_rows
        if return_attention_mask:
            data["attention_mask"] = masks
        if return_special_tokens_mask:
            data["special_tokens_mask"] = special_rows
        if return_length:
            data["length"] = [len(r) for r in rows]
        if not is_batch and return_tensors is None:
            data = {k: (v[0] if v and isinstance(v[0], list) else v) for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def encode(self, text, text_pair=None, add_special_tokens=True, padding=False, truncation=None,
               max_length=None, stride=0, padding_side=None, return_tensors=None, **kwargs):
        """The ids of `text` (``tokenizer(text)["input_ids"]``).

        >>> from qwen2np import Qwen2Tokenizer
        >>> Qwen2Tokenizer.from_pretrained().encode(" Hello world")
        [21927, 1879]
        """
        if (type(text) is str and text_pair is None and padding is False and truncation is None
                and max_length is None and return_tensors is None and not kwargs and not self.add_bos_token
                and not self.add_eos_token):  # the common case, without the batch machinery
            ids = self._encode_text(text, self.split_special_tokens)
            if len(ids) > self.model_max_length:
                self._warn_too_long(len(ids))
            return ids
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding,
                    truncation=truncation, max_length=max_length, stride=stride, padding_side=padding_side,
                    return_tensors=return_tensors, **kwargs)["input_ids"]

    def _with_special(self, ids, add_special_tokens):
        """Add BOS/EOS when the tokenizer is configured to (Qwen2's files say no: nothing is added)."""
        if not add_special_tokens:
            return ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def _special_mask(self, row, add_special_tokens):
        mask = [0] * len(row)
        if add_special_tokens and row:
            if self.add_bos_token and self.bos_token_id is not None:
                mask[0] = 1
            if self.add_eos_token and self.eos_token_id is not None:
                mask[-1] = 1
        return mask

    def _warn_too_long(self, n):
        if not self.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum"):
            logger.warning(
                "Token indices sequence length is longer than the specified maximum sequence length for this "
                f"model ({n} > {self.model_max_length}). Running this sequence through the model will result "
                "in indexing errors")
        self.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
