"""Every root cause in one run: recompute each operation of a dump from the dump's own inputs.

`compare` names the first tensor out of tolerance; after it, every later tensor inherits the error, so a
second, independent bug stays hidden. Isolation looks at each operation alone. For every tensor of dump
A it takes the tensors A recorded as that operation's inputs (and the weights A ran with), recomputes the
operation in float64, and compares A's output with the result:

    A's input(s) ──(A's operation)──> A's output        ?=        op(A's input(s)) in float64

An operation that passes is right whatever its inputs were; one that fails is wrong itself: a root
cause. So a port with two independent bugs gets both named in one run, each with its own error, and
every tensor downstream of them passes (it did the right thing with what it was given).

In reduced precision (a bfloat16 or float16 dump) the float64 result is rounded where a correct
half-precision implementation rounds (after each operation, as transformers does: recipes.py says where),
so a correct operation agrees with it to the last bit almost everywhere, and a
systematic error of 1e-3, a quarter of bfloat16's 2⁻⁸ rounding step, shows as a flood of one-ulp
differences. docs/porting.md and docs/tolerances.md explain the policies; policies.py holds them.

What each operation is recomputed from is recipes.py, a second implementation of the forward pass that
shares no code with the model it checks. This file is the driver: it checks that the model is the port's
(matching.py), reads the dump in qwen2np's layouts (layouts.py), runs each operation's recipe on its inputs
(operations.py) in the port's rounding orders (orders.py), and judges the difference with the policy; then
diagnosis.py names the porting mistake behind each root cause (catalogue.py) and tells a layout mistake in
the dump from a bug in the port; report.py prints the result.

Only real positions are compared (padding is left out as `compare` does), and a non-finite input at a
padding position is read as 0, so that a NaN there (stock float64 transformers) cannot reach a real
position through a probability of exactly 0; every other input is used exactly as recorded.

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> from qwen2np.golden.record import record_dump
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), seed=0)
>>> dump = record_dump(model, [[1, 2, 3, 4]], decode_steps=1)
>>> isolation = isolate_dump(dump, model)
>>> isolation.ok, isolation.root_causes, isolation.not_isolated      # every operation recomputed, all right
(True, [], [])
"""

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DumpError
from . import attention
from .compare import compare_tensor, valid_elements
from .diagnosis import diagnose
from .dump import Dump
from .fingerprint import architecture, config_fingerprint
from .layouts import masked_scores, normalised
from .matching import check_input_ids, check_layers, port_weights
from .metrics import ulp_shares, values
from .operations import Operations
from .orders import combinations, describe
from .policies import default_policy, policy_named
from .recipes import NotIsolated
from .report import format_isolation, json_safe   # format_isolation also here, beside isolate_dump (the notebooks)
from .rounding import HALF
from .tolerances import kind_of

__all__ = ["OpCheck", "Isolation", "isolate_dump", "port_weights", "format_isolation"]


@dataclass
class OpCheck:
    """One tensor of the dump against its own operation recomputed from the dump's inputs."""

    name: str
    key: str
    pass_index: int
    inputs: list            # the keys of the dump's tensors the recomputation read
    position: int = 0       # the last position of the pass (RoPE's float32 error grows with it)
    compared: int = 0       # elements compared (real positions)
    max_abs: float = 0.0
    rel: float = 0.0        # max |A - op(inputs)| / max(max |A|, max |op(inputs)|)
    nmse_db: float | None = None
    off: float | None = None        # half precision: share of elements not equal to the rounded recomputation
    beyond: float | None = None     # half precision: share more than one ulp away
    max_ulps: float | None = None
    limit: str = ""         # the policy's limit, as text
    ok: bool | None = None  # None: not isolated (an input is not in the dump)
    missing: str = ""       # why not isolated
    orders: dict = field(default_factory=dict)   # half precision: the port's rounding orders that fit ({family: order})
    notes: list = field(default_factory=list)    # what else a reader should know (masked scores, weights that differ)
    mistake: str = ""       # a root cause: the known porting mistake that reproduces it (catalogue.py)
    layout: str = ""        # a tensor stored in another layout than the port computed with (diagnosis.py)
    weights: list = field(default_factory=list)  # the weights the recomputation read
    via: str = ""           # "fused": a context recomputed from q, k and v (no probs recorded)


@dataclass
class Isolation:
    """The isolation of every tensor of a dump: `root_causes` are the operations that are wrong themselves."""

    dump: object
    policy: object
    checks: list
    notes: list = field(default_factory=list)
    layouts: dict = field(default_factory=dict)      # kind -> the layout A stores it in ("stored [B, T, H, HD]")
    seconds: dict = field(default_factory=dict)      # where the time went: checks, recomputation, catalogue

    @property
    def root_causes(self):
        return [c for c in self.checks if c.ok is False]

    @property
    def not_isolated(self):
        return [c for c in self.checks if c.ok is None]

    @property
    def dump_layouts(self):
        """Tensors whose values are right but stored in another layout than the port computed with."""
        return [c for c in self.checks if c.layout]

    @property
    def ok(self):
        return not self.root_causes

    def orders(self):
        """{family: {order: tensors}}: the rounding orders the port was found to use (half precision)."""
        found = {}
        for c in self.checks:
            for family, order in c.orders.items():
                found.setdefault(family, {}).setdefault(order, 0)
                found[family][order] += 1
        return found

    def to_json(self):
        return json_safe({
            "ok": self.ok, "policy": self.policy.name, "notes": self.notes, "layouts": self.layouts,
            "orders": {f: {describe({f: o}) or "as transformers": n for o, n in found.items()}
                       for f, found in self.orders().items()},
            "root_causes": [{"key": c.key, "mistake": c.mistake or None, "rel": c.rel, "off": c.off}
                            for c in self.root_causes],
            "dump_layouts": [{"key": c.key, "layout": c.layout} for c in self.dump_layouts],
            "not_isolated": [{"key": c.key, "missing": c.missing} for c in self.not_isolated],
            "seconds": self.seconds, "checks": [asdict(c) for c in self.checks],
        })


# -- the isolation ------------------------------------------------------------------------------------


def isolate_dump(dump, model, policy=None, progress=None, catalogue=True):
    """Recompute every tensor of `dump` from the dump's own inputs with `model`'s config and weights.

    `model` is a qwen2np model of the checkpoint the port ran (its weights are checked against the dump's
    fingerprint; a half-precision dump's against the weights rounded to its dtype). `policy` is a name
    of policies.py ("float32", "bfloat16", "q4_k_m", …) or None for the dump's dtype. With `catalogue`,
    each root cause is replayed through catalogue.py's known porting mistakes. Returns an Isolation; its
    `root_causes` are the tensors whose own operation is out of the policy.
    """
    policy = default_policy(dump.dtype) if policy is None else policy_named(policy)
    config = model.config
    started = time.perf_counter()
    check_input_ids(dump, config)
    check_layers(dump, config)
    try:
        dump, layouts = normalised(dump, config, Dump)
    except ValueError as e:
        raise DumpError(f"{e}: A ran another architecture; give --model the port's own checkpoint") from None
    held = port_weights(model, dump)
    ops = Operations(dump, config, held.weights)
    checked = time.perf_counter()
    judge = Judge(dump, policy)
    checks, learned = [], {}
    # name by name, each through every pass (so that each weight is converted once), reported in dump order
    entries = dump.entries()
    first, order = {}, {}
    for i, (_, e) in enumerate(entries):
        first.setdefault(e["name"], i)
        order[e["key"]] = i
    passes = {}
    for index, entry in entries:
        passes.setdefault(entry["name"], []).append(index)
    for name in sorted(passes, key=first.get):
        ops.forget()
        joined = _joined(ops, name, passes[name], learned)
        for index in passes[name]:
            check = isolate_one(ops, name, index, judge, learned, joined.get(index))
            checks.append(check)
            if progress is not None and check.ok is not None:
                progress(check)
    ops.forget()
    held.settle()       # the weights checked as they were read: those that differ, and what read them
    for c in checks:
        wrong = [w for w in c.weights if w in held.differ]
        if wrong:
            c.notes.append(f"reads {', '.join(wrong)}, which {held.differ[wrong[0]]}")
    notes = held.notes + [f"{kind} {layout}: read as qwen2np lays it out" for kind, layout in layouts.items()]
    checks.sort(key=lambda c: order[c.key])
    isolation = Isolation(dump, policy, checks, notes + _declared(dump, config, policy), layouts)
    recomputed = time.perf_counter()
    diagnose(isolation, ops, learned, judge, catalogue=catalogue)
    ops.forget()
    isolation.seconds = {"checks": checked - started, "recomputation": recomputed - checked,
                         "catalogue": time.perf_counter() - recomputed}
    return isolation


class Judge:
    """Measures a recomputation against the dump's tensor and applies the policy: judge(check, expected) -> a
    new OpCheck with the figures and the verdict (the elements compared: those of `check`)."""

    def __init__(self, dump, policy):
        self.dump, self.policy = dump, policy
        self.valid = {}      # key -> the elements compared, when not all (padding, masked scores)

    def __call__(self, check, expected):
        trial = OpCheck(name=check.name, key=check.key, pass_index=check.pass_index, inputs=check.inputs,
                        position=check.position, via=check.via)
        measure(trial, self.dump[check.key], expected, self.valid.get(check.key), self.dump.dtype)
        self.policy.judge_isolation(trial)
        return trial


def _declared(dump, config, policy):
    """Notes on what A's manifest declares: another config, quantized weights."""
    notes = []
    declared = (dump.manifest.get("model") or {}).get("config_fingerprint")
    if declared and declared != config_fingerprint(config):
        mine, theirs = architecture(config), (dump.manifest.get("model") or {}).get("config") or {}
        fields = [f for f in mine if mine.get(f) != theirs.get(f)]
        notes.append(f"A declares another config than the model's ({', '.join(fields) or 'fingerprints differ'}): "
                     f"recomputed with the model's")
    file_type = (dump.manifest.get("model") or {}).get("file_type")
    if file_type and file_type not in ("F32", "F16", "BF16") and policy.name in ("float32", "float64"):
        notes.append(f"A ran on {file_type} weights, whose products quantize their activations: --policy "
                     f"{'q8_0' if file_type.upper().startswith('Q8') else 'q4_k_m'} holds them to what that costs")
    return notes


def _joined(ops, name, passes, learned):
    """The passes of a position-wise operation computed as one, in the first rounding orders isolate_one
    tries: {pass: (orders, expected, inputs)}; {} when they cannot be."""
    try:
        layer, recipe = ops.recipe(name, passes[0])
        orders = combinations(recipe.families, learned)[0] if ops.dump.dtype in HALF else {}
        return {k: (orders, *computed) for k, computed in ops.expected_passes(name, passes, orders).items()}
    except NotIsolated:
        return {}


def isolate_one(ops, name, index, judge, learned, joined=None):
    """The OpCheck of tensor `name` of pass `index`: recomputed in the port's rounding orders (half
    precision: the orders learned so far first, then transformers', then the others, until one fits).
    `joined`: (orders, expected, inputs) already computed with the other passes."""
    dump = ops.dump
    p = dump.passes[index]
    key = name if index == 0 else f"{name}@{index}"
    check = OpCheck(name=name, key=key, pass_index=index, inputs=[], position=_last_position(p))
    ops.used = []
    try:
        layer, recipe = ops.recipe(name, index)
        check.weights = [ops.weight_name(w, layer) for w in recipe.weights]
        check.via = "fused" if "attention" in recipe.families else ""
        combos = combinations(recipe.families, learned) if dump.dtype in HALF else [{}]
        actual = dump[key]
        # a fused attention in half precision picks, at each rounding tie of its scores, the port's side
        observed = np.asarray(actual, np.float64) if check.via and dump.dtype in HALF else None
        if joined is not None and joined[0] == combos[0]:
            expected, ops.used = joined[1], list(joined[2])
        else:
            expected = ops.expected(name, index, combos[0], observed=observed)
    except NotIsolated as e:
        check.missing, check.inputs = str(e), list(dict.fromkeys(ops.used))
        return check
    check.inputs = list(dict.fromkeys(ops.used))
    valid = valid_elements(name, actual.shape, dump.attention_mask, p["start"], p["length"], p.get("positions"))
    if name.endswith(".mask") and valid is not None:   # a padding key must be hidden from a real query: compared
        valid = np.broadcast_to(valid.any(axis=-1, keepdims=True), actual.shape)
    valid = _masked_scores(ops, check, name, index, layer, actual, valid)
    if valid is not None:
        judge.valid[key] = valid
    _adopt(check, judge(check, expected), combos[0])
    for combo in combos[1:] if not check.ok else ():   # another legitimate rounding order may be the port's
        trial = judge(check, ops.expected(name, index, combo, observed=observed))
        if trial.ok and (not check.ok or (trial.off, trial.beyond) < (check.off, check.beyond)):
            _adopt(check, trial, combo)
    if check.ok and check.orders:
        learned.update(check.orders)
    _cache_not_read(ops, check, name, index, layer, actual.shape)
    return check


def _adopt(check, trial, combo=None):
    for f in ("compared", "max_abs", "rel", "nmse_db", "off", "beyond", "max_ulps", "limit", "ok"):
        setattr(check, f, getattr(trial, f))
    if combo is not None:
        check.orders = {f: o for f, o in combo.items() if o}


def _cache_not_read(ops, check, name, index, layer, shape):
    """Attention over fewer keys than the pass has seen (scores, mask, probs: S) is a port that does not read
    its KV cache; the recomputation, which takes the port's S, cannot see it by itself."""
    kind = kind_of(name)
    if kind not in ("self_attn.scores", "self_attn.mask", "self_attn.probs") or len(shape) != 4:
        return
    ctx = ops.context(name, index, layer)
    seen, T = int(ctx.positions.max()) + 1, shape[2]
    sliding = ops.config.layer_types[layer] == "sliding_attention"
    least = min(seen, ops.config.sliding_window - 1 + T) if sliding else seen
    if shape[3] < least:
        check.ok, check.limit = False, f"S ≥ {least}"
        check.mistake = f"the KV cache not read: attends over {shape[3]} keys, the pass has seen {seen}"


def _last_position(p):
    return int(max(p["positions"])) if p.get("positions") is not None else p["start"] + p["length"] - 1


def _masked_scores(ops, check, name, index, layer, actual, valid):
    """Scores recorded after the mask (−inf or finfo.min where a key is hidden, TransformerLens' hook): only
    the keys not hidden are compared."""
    if not name.endswith("self_attn.scores") or np.isfinite(actual).all() and actual.min() > -3e4:
        return valid
    B, _, T, S = actual.shape
    ctx = ops.context(name, index, layer)
    recorded = ops.dump.tensor(ops.input_name("self_attn.mask", layer), index) \
        if ops.has(ops.input_name("self_attn.mask", layer), index) else None
    hidden = ~attention.allowed_keys(ctx, B, T, S, None if recorded is None else np.asarray(recorded, np.float64))
    shown = masked_scores(actual, hidden, ops.dump.dtype)
    if shown is None:
        return valid
    check.notes.append("scores recorded after the mask (−inf or finfo.min where a key is hidden): compared where "
                       "keys are allowed")
    return shown if valid is None else valid & shown


def measure(check, actual, expected, valid, dtype):
    """Fill `check`'s error figures: the comparison metrics, and the ulp figures in half precision."""
    expected = np.broadcast_to(expected, actual.shape)
    t = compare_tensor(check.name, check.key, check.pass_index, actual, expected, valid, math.inf,
                       logits_figures=False)
    check.compared, check.max_abs, check.rel, check.nmse_db = t.compared, t.max_abs, t.rel, t.nmse_db
    check.off = check.beyond = check.max_ulps = None
    if dtype in HALF and check.name.rsplit(".", 1)[-1] != "mask":
        shares = ulp_shares(values(actual, valid), values(expected, valid), dtype)
        if shares is not None:
            check.off, check.beyond, check.max_ulps = shares
