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
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, ModelTooLargeError
from .store import PLAIN_KINDS, block_rows
from .system import format_bytes

__all__ = ["parse_memory", "activation_bytes", "WeightPlan", "plan_weights", "replan", "check_forward"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# the forward pass the budget sets room aside for when loading: a 512-token prompt with every logit,
# and a KV cache of 4,096 positions; a bigger call is checked when it comes (`check_forward`)
NOMINAL_TOKENS = 512
# the attention scores of a long forward pass are computed in blocks of query rows of at most this many
# bytes (qwen2np/model/attention.py): a 32k-token prompt would otherwise need 57 GB of them at once; and
# of at most BLOCK_ROWS rows when the mask is causal with no padding (each block then skips the keys its
# rows cannot see)
SCORES_BUDGET_BYTES = 1 << 28
BLOCK_ROWS = 64
NOMINAL_CACHE_POSITIONS = 4096
MAX_MEMORY = 2**63      # bytes: a budget beyond this is a typo, not a machine


def parse_memory(value):
    """Bytes from an int, or a string "6GB" / "6 GiB" / "500MB" / "1e9" / "1.5E9" (GB = 10^9 bytes, GiB = 2^30),
    at least one byte and at most MAX_MEMORY; anything else is refused with one ConfigError.

    >>> parse_memory("1E9"), parse_memory("0.5KiB")
    (1000000000, 512)
    >>> parse_memory("0.5")
    Traceback (most recent call last):
    ...
    qwen2np.errors.ConfigError: max_memory: '0.5' is less than one byte (a size needs a unit, e.g. '0.5GB')
    """
    number = unit = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number, unit = int(value), ""
    elif isinstance(value, (float, np.floating)) and math.isfinite(value):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).upper() in _UNITS:
            number, unit = float(m.group(1)), m.group(2).upper()
    if number is None or not number > 0:
        raise ConfigError(f"max_memory: expected a positive number of bytes or a size such as '6GB' or '5.5GiB', "
                          f"found {value!r}")
    # subtle: a float times its unit can overflow to inf ("1e308GB"), and int(inf) is an OverflowError
    size = number * _UNITS[unit]
    if not size <= MAX_MEMORY:
        raise ConfigError(f"max_memory: {value!r} is more than any machine has (at most {MAX_MEMORY:.3g} bytes)")
    if size < 1:
        raise ConfigError(f"max_memory: {value!r} is less than one byte (a size needs a unit, e.g. '{value}GB')")
    return int(size)


def activation_bytes(config, dtype, tokens, batch=1, cache_positions=0, logits=None, padded=False,
                     output_attentions=False, output_hidden_states=False, whole_scores=False):
    """The memory a forward pass of `tokens` new positions (after `cache_positions` cached ones) adds to
    the process at its peak, besides the weights, in bytes: what it keeps for the whole pass, plus the
    largest of its three phases. Within 25 % of the peak resident memory measured in a fresh process
    (VmHWM, 512 to 8k positions, every position's logits or the last one's:
    tests/weights/test_forward_memory.py; the 0.5B checkpoint up to 32k positions: docs/weights.md).

    * kept all along: the KV cache of S = cache_positions + tokens positions (sliding layers keep at most
      W - 1 + tokens; a prefill's cache twice over: model/cache.py makes its buffers with as much room
      again to grow into, and with freed memory kept (the command line) that room lands on pages the
      heap has touched already, measured), the RoPE tables, the [T, S] mask when attention is computed
      whole, and the hidden states or attention probabilities of every layer when asked for
      (`output_hidden_states`, `output_attentions`);
    * a layer's attention half: its input and normalised copy, q/k/v, RoPE's three temporaries, the
      context and its copy in [T, D] order. subtle: glibc's malloc serves these (each under its 32 MB
      mmap threshold at most prompt lengths) from its heap, and the heap keeps the space they took: the
      bigger arrays that follow come on top of it (measured), so this part counts in every phase;
    * the scores: [B, H, T, S] whole when the probabilities are asked for (or `whole_scores`, e.g. a trace
      that records them whole), else a block of query rows (model/attention.py's blocks: BLOCK_ROWS rows
      when no key is `padded`);
    * the MLP's three [T, F] arrays (gate, up, their product);
    * the head: the logits of `logits` rows in all (None: every position of every row, [B, T, V]; 0 for a
      model without the language-model head) and the hidden rows they are made from.

    Half precision counts 4 bytes a value: its products and softmax run in float32.
    """
    item = max(np.dtype(dtype).itemsize, 4)
    B, T, D, F = batch, tokens, config.hidden_size, config.intermediate_size
    H, KV, HD, V, L = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size,
                       config.num_hidden_layers)
    S = T + cache_positions
    window = getattr(config, "sliding_window", None)
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * L)
    keys = [min(S, min(cache_positions, window - 1) + T) if kind == "sliding_attention" and window else S
            for kind in kinds]
    if logits is None:
        logits = B * T
    N = B * T                                                     # rows of every [N, …] activation
    # attention whole, or in blocks (as model/attention.py decides)
    rows = max(1, SCORES_BUDGET_BYTES // (B * H * S * item))
    if not padded:
        rows = min(rows, BLOCK_ROWS)
    whole = output_attentions or bool(whole_scores) or T <= rows
    scores = B * H * T * S if whole else B * H * min(T, rows) * S
    room = 2 if cache_positions == 0 else 1                       # a prefill makes the cache's buffers
    kept = (2 * room * sum(keys) * B * KV * HD                   # the KV cache
            + 2 * N * HD                                          # cos, sin
            + (B * T * S * len(set(kinds)) if whole else 0)       # the mask, made whole once per layer type
            + (L + 1) * N * D * output_hidden_states
            + L * B * H * T * S * output_attentions)
    attention_half = N * (2 * D + 6 * H * HD + 2 * KV * HD)
    largest = max(2 * scores, 3 * N * F, logits * (D + V))       # attention's scores, the MLP, the head
    return (kept + attention_half + largest) * item


class Stored(NamedTuple):
    """What the plan remembers of a stored tensor: its format, size (values), dimensions, columns (the
    last dimension) and stored bytes."""

    kind: str
    size: int
    ndim: int
    columns: int
    nbytes: int


@dataclass
class WeightPlan:
    """How each weight is held: `kept` (an array in the compute dtype), `mapped` (as stored, converted per
    use), `streamed` (as `mapped`, its pages let go after each use). `figures` are the bytes behind it;
    `layout` what the checkpoint stores ({name: Stored})."""

    dtype: np.dtype
    budget: int | None
    kept: list = field(default_factory=list)
    mapped: list = field(default_factory=list)
    streamed: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    description: str = ""
    layout: dict = field(default_factory=dict)

    def how(self, name):
        return "kept" if name in self._kept else "streamed" if name in self._streamed else "mapped"

    def __post_init__(self):
        self._kept, self._streamed = set(self.kept), set(self.streamed)


def plan_weights(stored, dtype, config, budget, what="the model"):
    """A WeightPlan for the StoredTensors `stored` ({name: StoredTensor}) in compute `dtype` within
    `budget` bytes (None: no limit known). Refuses, with the figures, a budget below what any forward
    pass needs."""
    dtype = np.dtype(dtype)
    layout = {n: Stored(s.kind, s.size, len(s.shape), s.num_columns, s.nbytes) for n, s in stored.items()}
    matrices = {n: s for n, s in stored.items() if len(s.shape) >= 2}
    fixed, figures = _needed_always(layout, dtype, config, budget)
    if budget is not None and fixed > budget:
        raise ModelTooLargeError(
            f"{what} cannot run within {format_bytes(budget)} of memory: even with every weight streamed from "
            f"its file, a forward pass needs {format_bytes(fixed)} (conversion buffers, and the temporaries of a "
            f"{NOMINAL_TOKENS}-token prompt: {format_bytes(figures['activations'])}). Allow more memory "
            f"(max_memory=...)")
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
    vectors = [n for n, s in layout.items() if s.ndim < 2]
    plan = WeightPlan(dtype, budget, kept + vectors, mapped, streamed, figures, layout=layout)
    plan.description = describe(plan, config)
    return plan


def replan(plan, holding, dtype, config, what="the model"):
    """The plan of weights held otherwise than `plan` chose (after `model.to(dtype)`, or `load_state_dict`
    of arrays in place of mapped weights): `holding` is {name: (how, size, ndim)}, how being "kept",
    "mapped" or "streamed", in compute `dtype`. Refuses, with the figures, weights that no longer fit the
    budget."""
    dtype = np.dtype(dtype)
    layout = plan.layout
    fixed, figures = _needed_always(layout, dtype, config, plan.budget)
    held = 0
    for name, (how, size, ndim) in holding.items():
        if ndim >= 2:   # vectors are counted in `fixed`
            held += size * dtype.itemsize if how == "kept" else layout[name].nbytes if how == "mapped" else 0
    room = math.inf if plan.budget is None else plan.budget - fixed - held
    if room < 0:
        raise ModelTooLargeError(
            f"{what} cannot run within {format_bytes(plan.budget)} of memory: its weights held as they are in "
            f"{dtype.name} take {format_bytes(held)}, and a forward pass needs {format_bytes(fixed)} beside them; "
            f"load it with from_pretrained(..., dtype={dtype.name!r}, max_memory=...) to plan it again")
    figures["room_left"] = room
    names = {how: [n for n, (h, _, _) in holding.items() if h == how] for how in ("kept", "mapped", "streamed")}
    new = WeightPlan(dtype, plan.budget, names["kept"], names["mapped"], names["streamed"], figures, layout=layout)
    new.description = describe(new, config)
    return new


def _needed_always(layout, dtype, config, budget):
    """What every forward pass needs besides the matrices: the vectors (norms, biases) converted, the
    conversion buffers and the nominal pass's temporaries; and the plan's figures."""
    matrices = [s for s in layout.values() if s.ndim >= 2]
    widest = max((s.columns for s in matrices), default=1)
    scratch = 2 * block_rows(64, widest, dtype.itemsize) * widest * max(dtype.itemsize, 4)
    activations = activation_bytes(config, dtype, NOMINAL_TOKENS, cache_positions=NOMINAL_CACHE_POSITIONS)
    fixed = sum(s.size for s in layout.values() if s.ndim < 2) * dtype.itemsize + scratch + activations
    figures = {"budget": budget, "needed_always": fixed, "activations": activations,
               "stored": sum(s.nbytes for s in matrices), "converted": sum(s.size for s in matrices) * dtype.itemsize}
    return fixed, figures


def check_forward(plan, config, batch, tokens, cache_positions, **pass_kind):
    """Refuse, before anything is computed, a forward pass whose temporaries would not fit in what the
    budget left for them (the nominal room set aside when loading, plus what the weights did not take).
    `pass_kind` are activation_bytes' keywords (`logits`, `padded`, `output_attentions`, …)."""
    if plan is None or plan.budget is None:
        return
    needed = activation_bytes(config, plan.dtype, tokens, batch, cache_positions, **pass_kind)
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


def describe(plan, config):
    """One line, e.g. "7.6 B parameters, bf16 on disk; 9 of 28 layers kept as float32, the rest converted per
    use" or "…; kept as float32: 24 of 24 layers; converted per use: lm_head, model.embed_tokens"."""
    layout = plan.layout
    count = sum(s.size for s in layout.values())
    kinds = sorted({s.kind for s in layout.values() if s.ndim >= 2}, key=lambda k: -sum(
        s.nbytes for s in layout.values() if s.kind == k))
    on_disk = "/".join(k.lower() for k in kinds)
    L = config.num_hidden_layers
    matrices = [n for n, s in layout.items() if s.ndim >= 2]
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
