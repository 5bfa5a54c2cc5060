"""The memory budget: what a model may use, what its forward pass needs, and how its weights are held.

`from_pretrained(path, max_memory=...)` (bytes, or a string such as "6GB" or "5.5GiB"; by default what
the machine has available, as `available_memory` reads it, the cgroup's limit included, less a quarter
of its memory left to the system and its page cache: `default_budget`) plans every weight within the
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

from .errors import ModelTooLargeError

__all__ = ["parse_memory", "available_memory", "default_budget", "activation_bytes", "WeightPlan", "plan_weights",
           "format_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# the forward pass the budget sets room aside for when loading: a 512-token prompt with every logit,
# and a KV cache of 4,096 positions; a bigger call is checked when it comes (`check_forward`)
NOMINAL_TOKENS = 512
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
        raise ValueError(f"max_memory: expected a positive number of bytes or a size such as '6GB' or '5.5GiB', "
                         f"found {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def available_memory():
    """Bytes this process can still use: /proc/meminfo's MemAvailable, or less when a cgroup (v1 or v2)
    limits the process: its limit minus what it holds, not counting the inactive file cache, which the
    kernel reclaims first. None when nothing can be read (not Linux)."""
    available = _meminfo("MemAvailable")
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def default_budget():
    """The budget when none is given: what the machine has available, less a quarter of its memory (of
    the cgroup's limit when that is lower), which stays for the system and its page cache; at least half
    of what is available. None when nothing can be read.

    subtle: a budget that fills the machine is slower, not faster: the pages of the weights that stay
    mapped are then pushed out of the page cache and read again. Measured on the 24 GB test machine with
    a 7B bf16 checkpoint in float32: a budget of 24.6 GB (14 of 28 layers kept as float32, 20.8 GB
    resident) decoded a token in 1.40 s; 21 GB (17.1 GB resident) in 1.10 s (docs/weights.md).
    """
    available = available_memory()
    total = _meminfo("MemTotal")
    limit = _cgroup_limit()
    if limit is not None:
        total = limit if total is None else min(total, limit)
    if available is None or total is None:
        return available
    return max(available - total // 4, available // 2)


def _cgroup_limit():
    """The memory limit of this process's cgroup (v1 or v2), the tightest up the hierarchy; None if none."""
    limits = [room + used for room, used in _cgroup_rooms()]
    return min(limits) if limits else None


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom():
    """limit - (usage - inactive file cache) of the tightest memory cgroup of this process and its parents."""
    rooms = [room for room, _ in _cgroup_rooms()]
    return min(rooms) if rooms else None


def _cgroup_rooms():
    """(limit - held, held) for each memory cgroup of this process and its parents that sets a limit, where
    held is the usage less the inactive file cache (v1 and v2)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                  # v2: one unified hierarchy
            base, files = "/sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):               # v1: the memory controller's own hierarchy
            base, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                    "total_inactive_file")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):               # the cgroup, then its parents
            room = _headroom("/".join([base] + parts[:depth]), *files)
            if room is not None:
                rooms.append(room)
    return rooms


def _headroom(folder, limit_file, usage_file, inactive_key):
    """(limit - held, held) of one cgroup folder, or None when it sets no limit or cannot be read."""
    try:
        with open(f"{folder}/{limit_file}") as f:
            limit = f.read().strip()
        with open(f"{folder}/{usage_file}") as f:
            usage = int(f.read())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:    # no limit set
        return None
    inactive = 0
    try:
        with open(f"{folder}/memory.stat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
    except (OSError, ValueError):
        pass
    held = max(0, usage - inactive)
    return max(0, int(limit) - held), held


def activation_bytes(config, dtype, tokens, batch=1, cache_positions=0, all_logits=True):
    """An upper estimate of the memory a forward pass of `tokens` new positions needs besides the weights:
    the residual stream and its normalised copies, q/k/v, the attention scores (in blocks of at most
    attention.SCORES_BUDGET_BYTES for long inputs), the MLP's three [T, F] arrays, the logits, and the KV
    cache of `cache_positions` positions (with its spare room)."""
    from .attention import SCORES_BUDGET_BYTES

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
    from .weight_store import PLAIN_KINDS, block_rows

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
