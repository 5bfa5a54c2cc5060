"""Logits processors: what happens to the next-token scores before a token is chosen.

Each is a plain function of arrays: `scores` [B, V] float32 (the last position's logits) and, where
needed, `input_ids` [B, S] int64 (the prompt plus the tokens generated so far). Each returns new
scores and leaves its inputs untouched. They follow transformers 5.24's `generation/logits_process.py`
rule for rule; `generate` applies them in transformers' order (`build_logits_processors`):

    repetition penalty -> min length -> min new tokens        (always)
    temperature -> top-k -> top-p -> min-p                    (only when sampling)

Filtered tokens get -inf, so they have probability 0 afterwards.

>>> import numpy as np
>>> scores = np.array([[1.0, 3.0, 2.0, 3.0]], dtype=np.float32)
>>> top_k_filter(scores, 1)          # ties with the k-th best survive
array([[-inf,   3., -inf,   3.]], dtype=float32)
>>> repetition_penalty(scores, np.array([[0, 1, 1]]), 2.0)   # each seen token once
array([[0.5, 1.5, 2. , 3. ]], dtype=float32)

The transformers-named classes at the end wrap these functions with the `__call__(input_ids, scores)`
protocol, so code written against transformers' processors reads the same.
"""

import numpy as np

FILTER_VALUE = np.float32(-np.inf)


def repetition_penalty(scores, input_ids, penalty, prompt_ignore_length=None):
    """Penalise every token id present in `input_ids`, counted once: s -> s*p if s < 0 else s/p.

    `prompt_ignore_length` [B] (or an int) skips that many leading positions of each row: transformers
    5.24 passes the left-padding length (the index of the first 1 in the attention mask), so pad ids in
    the padding are not penalised (4.x penalised them).

    >>> import numpy as np
    >>> s = np.array([[-1.0, 1.0, 4.0]], dtype=np.float32)
    >>> repetition_penalty(s, np.array([[7, 0, 2]]), 2.0, prompt_ignore_length=np.array([1])).tolist()
    [[-2.0, 1.0, 2.0]]
    """
    B, V = scores.shape
    ids = np.asarray(input_ids, dtype=np.int64)
    # subtle: ids >= V (a vocab row the lm_head lacks) cannot be generated; like transformers, send them
    # to an extra column V that is dropped afterwards. Ignored prefix positions go there too.
    ids = np.minimum(ids, V)
    if prompt_ignore_length is not None:
        ignore = np.broadcast_to(np.asarray(prompt_ignore_length, dtype=np.int64), (B,))
        positions = np.arange(ids.shape[1], dtype=np.int64)
        ids = np.where(positions[None, :] < ignore[:, None], V, ids)  # [B, S]
    seen = np.zeros((B, V + 1), dtype=bool)
    seen[np.arange(B)[:, None], ids] = True  # [B, V+1]
    seen = seen[:, :V]
    p = np.float32(penalty)  # a float32 product, as torch computes with a python-float scalar
    penalised = np.where(scores < 0, scores * p, scores / p)
    return np.where(seen, penalised, scores)


def suppress_eos_before(scores, cur_len, min_len, eos_token_ids):
    """MinLength / MinNewTokens: while `cur_len < min_len`, no eos id can be chosen (its score is -inf).

    >>> import numpy as np
    >>> suppress_eos_before(np.zeros((1, 3), np.float32), cur_len=2, min_len=5, eos_token_ids=[1])
    array([[  0., -inf,   0.]], dtype=float32)
    """
    if cur_len >= min_len or not len(eos_token_ids):
        return scores
    out = scores.copy()
    eos = [e for e in eos_token_ids if 0 <= e < scores.shape[1]]
    out[:, eos] = FILTER_VALUE
    return out


def temperature(scores, t):
    """scores / t: t < 1 sharpens the distribution, t > 1 flattens it."""
    return scores / np.float32(t)


def top_k_filter(scores, k, min_tokens_to_keep=1):
    """Keep the scores >= the k-th largest of each row: ties at the threshold all survive."""
    V = scores.shape[-1]
    k = min(max(k, min_tokens_to_keep), V)
    kth_largest = np.partition(scores, V - k, axis=-1)[:, V - k : V - k + 1]  # [B, 1]
    return np.where(scores < kth_largest, FILTER_VALUE, scores)


def softmax_f32(scores):
    """Softmax along the last axis, in float32, as transformers computes the probabilities it filters."""
    e = np.exp(scores - scores.max(axis=-1, keepdims=True), dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def top_p_filter(scores, p, min_tokens_to_keep=1):
    """Nucleus filter: keep the smallest set of best tokens whose probability reaches p.

    transformers' rule, literally: sort ascending, cumulative softmax, remove where cum <= 1 - p, but
    always keep the last `min_tokens_to_keep`. So the token whose probability crosses p is kept.

    >>> import numpy as np
    >>> s = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32))
    >>> np.isfinite(top_p_filter(s, 0.5))      # 0.4 < 0.5, so 0.3 is needed too
    array([[False, False,  True,  True]])
    """
    out = np.empty_like(scores)
    for b in range(scores.shape[0]):
        row = scores[b]
        # Filtered tokens (-inf) sort first and add exactly 0 to the cumulative sum, so working on the
        # finite ones only gives the same sums; it spares sorting all V scores after a top-k.
        candidates = np.flatnonzero(row > FILTER_VALUE)
        if candidates.size == 0:
            candidates = np.arange(row.size)
        # subtle: ties. transformers uses torch.sort, which is not stable for more than 16 elements, so
        # which of several equal scores straddling the boundary it drops is arbitrary; a stable sort
        # makes ours reproducible: among equal scores, the lower token ids are dropped first.
        order = candidates[np.argsort(row[candidates], kind="stable")]  # ascending
        probs = softmax_f32(row[order][None, :])[0]
        # subtle: torch's cumsum accumulates float32 in float64 on the CPU, then rounds each sum.
        cum = np.cumsum(probs, dtype=np.float64).astype(np.float32)
        remove = cum <= np.float32(1 - float(p))  # 1 - p in double, then rounded to float32, as torch does
        remove[max(remove.size - min_tokens_to_keep, 0) :] = False
        out[b] = FILTER_VALUE
        out[b, order[~remove]] = row[order[~remove]]
    return out


def min_p_filter(scores, min_p, min_tokens_to_keep=1):
    """Remove tokens whose probability is below min_p times the best token's probability.

    >>> import numpy as np
    >>> s = np.log(np.array([[0.05, 0.15, 0.8]], dtype=np.float32))
    >>> np.isfinite(min_p_filter(s, 0.1))      # 0.05 < 0.1 * 0.8
    array([[False,  True,  True]])
    """
    probs = softmax_f32(scores)
    remove = probs < np.float32(min_p) * probs.max(axis=-1, keepdims=True)
    k = min(min_tokens_to_keep, scores.shape[-1])
    best = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # the k most likely (any of them, for ties)
    remove[np.arange(scores.shape[0])[:, None], best] = False
    return np.where(remove, FILTER_VALUE, scores)


def build_logits_processors(generation_config, prompt_length, attention_mask=None):
    """The processors `generate` applies, in transformers' order, for a resolved GenerationConfig.

    Returns a list of functions f(input_ids [B, S], scores [B, V]) -> scores.
    """
    gc = generation_config
    eos = _as_list(gc.eos_token_id)
    processors = []
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        ignore = None
        if attention_mask is not None:
            ignore = np.argmax(np.asarray(attention_mask) != 0, axis=1)  # left-padding length per row
        processors.append(RepetitionPenaltyLogitsProcessor(gc.repetition_penalty, ignore))
    if gc.min_length is not None and gc.min_length > 0 and eos:
        processors.append(MinLengthLogitsProcessor(gc.min_length, eos))
    if gc.min_new_tokens is not None and gc.min_new_tokens > 0 and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, gc.min_new_tokens, eos))
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            processors.append(TopKLogitsWarper(gc.top_k))
        if gc.top_p is not None and gc.top_p < 1.0:
            processors.append(TopPLogitsWarper(gc.top_p))
        if gc.min_p is not None:
            processors.append(MinPLogitsWarper(gc.min_p))
    return processors


def _as_list(token_ids):
    if token_ids is None:
        return []
    if isinstance(token_ids, (list, tuple, np.ndarray)):
        return [int(t) for t in token_ids]
    return [int(token_ids)]


# -- transformers-named wrappers: __call__(input_ids, scores) -> scores ---------------------------------


class LogitsProcessorList(list):
    """Apply processors one after the other, as transformers' list does."""

    def __call__(self, input_ids, scores):
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class RepetitionPenaltyLogitsProcessor:
    def __init__(self, penalty, prompt_ignore_length=None):
        self.penalty = penalty
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids, scores):
        return repetition_penalty(scores, input_ids, self.penalty, self.prompt_ignore_length)


class MinLengthLogitsProcessor:
    def __init__(self, min_length, eos_token_id):
        self.min_length, self.eos_token_id = min_length, _as_list(eos_token_id)

    def __call__(self, input_ids, scores):
        return suppress_eos_before(scores, input_ids.shape[-1], self.min_length, self.eos_token_id)


class MinNewTokensLengthLogitsProcessor:
    def __init__(self, prompt_length_to_skip, min_new_tokens, eos_token_id):
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens, self.eos_token_id = min_new_tokens, _as_list(eos_token_id)

    def __call__(self, input_ids, scores):
        new_tokens = input_ids.shape[-1] - self.prompt_length_to_skip
        return suppress_eos_before(scores, new_tokens, self.min_new_tokens, self.eos_token_id)


class TemperatureLogitsWarper:
    def __init__(self, temperature):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return temperature(scores, self.temperature)


class TopKLogitsWarper:
    def __init__(self, top_k, min_tokens_to_keep=1):
        self.top_k, self.min_tokens_to_keep = top_k, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        return top_k_filter(scores, self.top_k, self.min_tokens_to_keep)


class TopPLogitsWarper:
    def __init__(self, top_p, min_tokens_to_keep=1):
        self.top_p, self.min_tokens_to_keep = float(top_p), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        return top_p_filter(scores, self.top_p, self.min_tokens_to_keep)


class MinPLogitsWarper:
    def __init__(self, min_p, min_tokens_to_keep=1):
        self.min_p, self.min_tokens_to_keep = min_p, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        return min_p_filter(scores, self.min_p, self.min_tokens_to_keep)
