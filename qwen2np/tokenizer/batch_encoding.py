"""What `tokenizer(...)` returns, and the truncation and padding that shape a batch.

`BatchEncoding` is a dict (``input_ids``, ``attention_mask``, ...) whose keys also read as attributes,
as in transformers. Truncation and padding follow transformers 5.24 with the `tokenizers` backend:
truncate each sequence (or pair) to ``max_length`` first, then pad every row to the longest row, to
``max_length``, or up to a multiple of ``pad_to_multiple_of``, on ``padding_side``.
"""

import numpy as np

from ..errors import TokenizerInputError


class BatchEncoding(dict):
    """A dict of model inputs with attribute access.

    >>> enc = BatchEncoding({"input_ids": [[9707, 1879]], "attention_mask": [[1, 1]]}, tensor_type="np")
    >>> enc.input_ids.dtype, enc.input_ids.shape
    (dtype('int64'), (1, 2))
    >>> enc.to("cpu") is enc
    True
    """

    def __init__(self, data=None, tensor_type=None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r}; keys: {list(self)}") from None

    def __getstate__(self):
        return {"data": dict(self)}

    def __setstate__(self, state):
        self.update(state["data"])

    def convert_to_tensors(self, tensor_type=None):
        """Turn the lists into int64 NumPy arrays (``tensor_type="np"``); other frameworks are refused."""
        if tensor_type is None:
            return self
        tensor_type = getattr(tensor_type, "value", tensor_type)  # accept an enum with .value == "np"
        if tensor_type != "np":
            raise TokenizerInputError(
                f"return_tensors={tensor_type!r}: qwen2np returns NumPy arrays only; expected 'np' or None")
        for key, value in self.items():
            if isinstance(value, np.ndarray):
                continue
            rows = value if value and isinstance(value[0], (list, tuple)) else None
            if rows is not None and len({len(r) for r in rows}) > 1:
                raise TokenizerInputError(
                    f"return_tensors='np': the rows of {key!r} have different lengths "
                    f"({sorted({len(r) for r in rows})}); pass padding=True (or truncation=True) to make them equal")
            self[key] = np.array(value, dtype=np.int64)
        return self

    def to(self, device):
        """Move to `device`: only ``"cpu"`` exists for NumPy arrays, and it returns the encoding itself."""
        if str(device) != "cpu":
            raise TokenizerInputError(f"BatchEncoding.to({device!r}): qwen2np holds NumPy arrays; expected 'cpu'")
        return self


def truncate_pair(ids, pair_ids, max_length, strategy, side):
    """Truncate one sequence (and its pair, if any) to `max_length` tokens in total, like `tokenizers`.

    strategy: ``"longest_first"``, ``"only_first"`` or ``"only_second"``; side: ``"right"`` or ``"left"``.

    >>> truncate_pair([1, 2, 3, 4, 5], None, 3, "longest_first", "right")
    ([1, 2, 3], None)
    >>> truncate_pair([1, 2, 3, 4, 5], [6, 7], 4, "longest_first", "left")
    ([4, 5], [6, 7])
    """
    n1, n2 = len(ids), len(pair_ids) if pair_ids is not None else 0
    if max_length == 0:  # the Rust library empties both, whatever the strategy
        return [], ([] if pair_ids is not None else None)
    if n1 + n2 <= max_length:
        return ids, pair_ids

    def cut(seq, keep):
        keep = max(keep, 0)
        return seq[:keep] if side == "right" else seq[len(seq) - keep :]

    if pair_ids is None:
        if strategy == "only_second":
            raise TokenizerInputError("truncation='only_second' needs a text pair; found a single sequence")
        return cut(ids, max_length), None
    if strategy == "longest_first":
        # the Rust library's rule: give the shorter one what it needs, split the rest
        short, long_ = (n2, n1) if n1 > n2 else (n1, n2)
        long_ = short if short > max_length else max(short, max_length - short)
        if short + long_ > max_length:
            short = max_length // 2
            long_ = short + max_length % 2
        keep1, keep2 = (long_, short) if n1 > n2 else (short, long_)
        return cut(ids, keep1), cut(pair_ids, keep2)
    over = n1 + n2 - max_length
    if strategy == "only_first":
        if over >= n1:
            raise TokenizerInputError(
                f"truncation='only_first': the first sequence ({n1} tokens) is too short to remove {over} tokens")
        return cut(ids, n1 - over), pair_ids
    if strategy == "only_second":
        if over >= n2:
            raise TokenizerInputError(
                f"truncation='only_second': the second sequence ({n2} tokens) is too short to remove {over} tokens")
        return ids, cut(pair_ids, n2 - over)
    raise TokenizerInputError(
        f"truncation={strategy!r}: expected True, False, 'longest_first', 'only_first' or 'only_second'")


def pad_rows(rows, length, pad_id, side, extra=None):
    """Pad each row of ids to `length` with `pad_id` on `side`; return (padded rows, attention masks,
    padded `extra` rows (e.g. token type ids, padded with 0)).

    >>> pad_rows([[5, 6, 7], [8]], 3, 0, "left")
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]], None)
    """
    out, masks, extra_out = [], [], [] if extra is not None else None
    for k, row in enumerate(rows):
        gap = max(length - len(row), 0)
        if side == "right":
            out.append(row + [pad_id] * gap)
            masks.append([1] * len(row) + [0] * gap)
            if extra is not None:
                extra_out.append(extra[k] + [0] * gap)
        else:
            out.append([pad_id] * gap + row)
            masks.append([0] * gap + [1] * len(row))
            if extra is not None:
                extra_out.append([0] * gap + extra[k])
    return out, masks, extra_out
