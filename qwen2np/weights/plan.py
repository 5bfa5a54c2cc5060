"""The memory budget: what a model may use, what its forward pass needs, and how its weights are held.

`from_pretrained(path, max_memory=...)` (bytes, or a string such as "6GB" or "5.5GiB"; by default what
the machine has available, the cgroup's limit included, less a quarter of its memory left to the system
and its page cache: system.py's `default_budget`) plans every weight within the
budget (docs/weights.md):

1. what every forward pass needs is set aside first: the small vectors (norms, biases) converted, the
   conversion buffers, and the temporaries of a nominal forward pass (`activation_bytes`);
2. every matrix is held as stored and converted per use, memory-mapped while the budget holds the stored
   bytes, else *streamed* (its pages let go after each use: slower, since they are read again);
3. while the budget allows, whole layers are converted ahead of time and kept (a file that already
   stores the compute dtype is kept as its memory map: no conversion, no copy).

A budget below step 1 is refused before anything is allocated, with the figures.

>>> parse_memory("6GB"), parse_memory("1.5 GiB"), parse_memory(2**20)
(6000000000, 1610612736, 1048576)
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, ModelTooLargeError
from .store import PLAIN_KINDS, block_rows
from .system import format_bytes

__all__ = ["parse_memory", "activation_bytes", "WeightPlan", "plan_weights", "check_forward"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# the forward pass the budget sets room aside for when loading: a 512-token prompt with every logit,
# and a KV cache of 4,096 positions; a bigger call is checked when it comes (`check_forward`)
NOMINAL_TOKENS = 512
# the attention scores of a long forward pass are computed in blocks of query rows of at most this many
# bytes (qwen2np/model/attention.py): a 32k-token prompt would otherwise need 57 GB of them at once
SCORES_BUDGET_BYTES = 1 << 28
NOMINAL_CACHE_POSITIONS = 4096


def parse_memory(value):
    """Bytes from an int, or a string "6GB" / "6 GiB" / "500MB" / "1e9" (GB = 10^9 bytes, GiB = 2^30)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number, unit = int(value), ""
    elif isinstance(value, float) and math.isfinite(value):
        number, unit = value, ""
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)) \
            and m.group(2).upper() in _UNITS:
        try:
            number, unit = float(m.group(1)), m.group(2).upper()
        except ValueError:
            number, unit = None, None
    else:
        number = unit = None
    if number is None or number <= 0:
        raise ConfigError(f"max_memory: expected a positive number of bytes or a size such as '6GB' or '5.5GiB', "
                         f"found {value!r}")
    return int(number * _UNITS[unit])


def activation_bytes(config, dtype, tokens, batch=1, cache_positions=0, all_logits=True):
    """An upper estimate of the memory a forward pass of `tokens` new positions needs besides the weights:
    the residual stream and its normalised copies, q/k/v, the attention scores (in blocks of at most
    SCORES_BUDGET_BYTES for long inputs), the MLP's three [T, F] arrays, the logits, and the KV
    cache of `cache_positions` positions (with its spare room)."""
    item = np.dtype(dtype).itemsize if np.dtype(dtype).itemsize >= 4 else 4   # half precision computes in float32
    B, T, D, F = batch, tokens, config.hidden_size, config.intermediate_size
    H, KV, HD, V = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size
    S = T + cache_positions
    stream = 8 * B * T * D
    attention = 3 * B * T * (H + 2 * KV) * HD + min(2 * B * (H + 1) * T * S, 2 * SCORES_BUDGET_BYTES // item)
    mlp = 4 * B * T * F
    logits = 2 * B * (T if all_logits else 1) * V
    cache = 2 * 2 * config.num_hidden_layers * B * KV * S * HD
    return (stream + attention + mlp + logits + cache) * item


@dataclass
class WeightPlan:
    """How each weight is held: `kept` (an array in the compute dtype), `mapped` (as stored, converted per
    use), `streamed` (as `mapped`, its pages let go after each use). `figures` are the bytes behind it."""

    dtype: np.dtype
    budget: int | None
    kept: list = field(default_factory=list)
    mapped: list = field(default_factory=list)
    streamed: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    description: str = ""

    def how(self, name):
        return "kept" if name in self._kept else "streamed" if name in self._streamed else "mapped"

    def __post_init__(self):
        self._kept, self._streamed = set(self.kept), set(self.streamed)


def plan_weights(stored, dtype, config, budget, what="the model"):
    """A WeightPlan for the StoredTensors `stored` ({name: StoredTensor}) in compute `dtype` within
    `budget` bytes (None: no limit known). Refuses, with the figures, a budget below what any forward
    pass needs."""
    dtype = np.dtype(dtype)
    vectors = {n: s for n, s in stored.items() if len(s.shape) < 2}
    matrices = {n: s for n, s in stored.items() if len(s.shape) >= 2}
    widest = max((s.num_columns for s in matrices.values()), default=1)
    scratch = 2 * block_rows(64, widest, dtype.itemsize) * widest * max(dtype.itemsize, 4)
    activations = activation_bytes(config, dtype, NOMINAL_TOKENS, cache_positions=NOMINAL_CACHE_POSITIONS)
    fixed = sum(s.size for s in vectors.values()) * dtype.itemsize + scratch + activations
    stored_bytes = sum(s.nbytes for s in matrices.values())
    compute_bytes = sum(s.size for s in matrices.values()) * dtype.itemsize
    figures = {"budget": budget, "needed_always": fixed, "activations": activations, "stored": stored_bytes,
               "converted": compute_bytes}
    if budget is not None and fixed > budget:
        raise ModelTooLargeError(
            f"{what} cannot run within {format_bytes(budget)} of memory: even with every weight streamed from "
            f"its file, a forward pass needs {format_bytes(fixed)} (conversion buffers, and the temporaries of a "
            f"{NOMINAL_TOKENS}-token prompt: {format_bytes(activations)}). Allow more memory (max_memory=...)")
    room = math.inf if budget is None else budget - fixed

    def same_as_stored(s):         # kept for free: the memory map already holds the compute dtype
        return s.kind in PLAIN_KINDS and PLAIN_KINDS[s.kind] == dtype

    # 2. as stored, mapped while the stored bytes fit (else streamed)
    mapped, streamed = [], []
    for name, s in matrices.items():
        if s.nbytes <= room:
            mapped.append(name)
            room -= s.nbytes
        else:
            streamed.append(name)
    # 3. converted ahead of time, whole layers in order while they fit (and the rest of the matrices)
    kept = [n for n in mapped if same_as_stored(matrices[n])]
    for group in _groups([n for n in mapped if n not in kept]):
        extra = sum(matrices[n].size * dtype.itemsize - matrices[n].nbytes for n in group)
        if extra <= room:
            kept += group
            room -= extra
    mapped = [n for n in mapped if n not in set(kept)]
    figures["room_left"] = room
    plan = WeightPlan(dtype, budget, kept + list(vectors), mapped, streamed, figures)
    plan.description = describe(plan, stored, config)
    return plan


def check_forward(plan, config, batch, tokens, cache_positions, all_logits=True):
    """Refuse, before anything is computed, a forward pass whose temporaries would not fit in what the
    budget left for them (the nominal room set aside when loading, plus what the weights did not take)."""
    if plan is None or plan.budget is None:
        return
    needed = activation_bytes(config, plan.dtype, tokens, batch, cache_positions, all_logits)
    room = plan.figures["activations"] + plan.figures["room_left"]
    if needed > room:
        raise ModelTooLargeError(
            f"a forward pass of {batch} x {tokens} new positions after {cache_positions} cached ones needs about "
            f"{format_bytes(needed)} of temporaries, but the memory budget of {format_bytes(plan.budget)} leaves "
            f"{format_bytes(room)} beside the weights; pass fewer positions at once, or load with a larger "
            f"max_memory")


def _groups(names):
    """Matrices grouped by layer (`…layers.N.`), in layer order, then the others one by one."""
    layers, others = {}, []
    for name in names:
        m = re.search(r"layers\.(\d+)\.", name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(name)
        else:
            others.append([name])
    return [layers[i] for i in sorted(layers)] + others


def describe(plan, stored, config):
    """One line, e.g. "7.6 B parameters, bf16 on disk; 9 of 28 layers kept as float32, the rest converted per
    use" or "…; kept as float32: 24 of 24 layers; converted per use: lm_head, model.embed_tokens"."""
    count = sum(s.size for s in stored.values())
    kinds = sorted({s.kind for s in stored.values() if len(s.shape) >= 2}, key=lambda k: -sum(
        s.nbytes for s in stored.values() if s.kind == k))
    on_disk = "/".join(k.lower() for k in kinds)
    L = config.num_hidden_layers
    matrices = [n for n, s in stored.items() if len(s.shape) >= 2]
    kept_layers = sum(all(n in plan._kept for n in matrices if f"layers.{i}." in n) for i in range(L))
    others = [n for n in matrices if not re.search(r"layers\.\d+\.", n)]
    streamed = [n for n in plan.streamed if n in set(matrices)]
    dtype = plan.dtype.name
    if all(n in plan._kept for n in matrices):
        how = f"every weight kept as {dtype}"
    elif not any(n in plan._kept for n in matrices):
        how = f"every matrix converted to {dtype} per use"
    elif all(n not in plan._kept for n in others) and kept_layers == L:
        how = f"all {L} layers kept as {dtype}; {', '.join(others)} converted per use"
    elif all(n not in plan._kept for n in others):
        how = f"{kept_layers} of {L} layers kept as {dtype}, the rest converted per use"
    else:
        kept_others = [n for n in others if n in plan._kept]
        per_use = [n for n in others if n not in plan._kept]
        how = (f"kept as {dtype}: {kept_layers} of {L} layers, {', '.join(kept_others)}; converted per use: "
               f"{', '.join(per_use) or f'{L - kept_layers} layers'}")
    if streamed:
        how += f"; {len(streamed)} of {len(matrices)} matrices streamed from the file (re-read at each use)"
    size = f"{count / 1e9:.1f} B" if count >= 1e8 else f"{count / 1e6:.0f} M" if count >= 1e6 else f"{count:,}"
    budget = "" if plan.budget is None else f" (budget {format_bytes(plan.budget)})"
    return f"{size} parameters, {on_disk} on disk; {how}{budget}"
