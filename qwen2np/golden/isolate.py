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
shares no code with the model it checks. This file is the driver: it reads each operation's inputs from
the dump, runs its recipe, and judges the difference with the policy; report.py prints the result.

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
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DumpError
from ..inspection.names import position_axes
from .compare import compare_tensor, valid_elements
from .fingerprint import architecture, config_fingerprint, weight_digest
from .metrics import ulp_shares, values
from .policies import default_policy, policy_named
from .recipes import LAYER_RECIPES, RECIPES, Context, NotIsolated
from .report import format_isolation, json_safe   # format_isolation also here, beside isolate_dump (the notebooks)
from .rounding import HALF, round_weight, rounding


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


@dataclass
class Isolation:
    """The isolation of every tensor of a dump: `root_causes` are the operations that are wrong themselves."""

    dump: object
    policy: object
    checks: list
    notes: list = field(default_factory=list)

    @property
    def root_causes(self):
        return [c for c in self.checks if c.ok is False]

    @property
    def not_isolated(self):
        return [c for c in self.checks if c.ok is None]

    @property
    def ok(self):
        return not self.root_causes

    def to_json(self):
        return json_safe({
            "ok": self.ok, "policy": self.policy.name, "notes": self.notes,
            "root_causes": [c.key for c in self.root_causes],
            "checks": [asdict(c) for c in self.checks],
        })


# -- the weights the port ran with --------------------------------------------------------------------


def port_weights(model, dump):
    """(weights {name: array}, rounding, note): the model's weights, and the dtype the port holds them in
    (None: as they are), checked by fingerprint.

    A half-precision port holds each weight rounded to its dtype, so the model's weights are tried as
    they are and rounded to the dump's dtype; the candidate whose per-weight sha256 digests equal the
    dump's `weights_fingerprint` is the one. DumpError when neither matches. The weights are returned as
    the model holds them (no rounded copy in memory): the recomputation rounds each block it reads.
    """
    weights = model.state_dict()
    fp = (dump.manifest.get("model") or {}).get("weights_fingerprint")
    candidates = [("as loaded", None)]
    if dump.dtype in HALF:
        candidates.insert(0, (f"rounded to {dump.dtype}", dump.dtype))
    if not fp or not fp.get("tensors"):
        label, dtype = candidates[0]
        return weights, dtype, (f"A records no weights fingerprint: the model's weights {label} are assumed to "
                                f"be the ones it ran with")
    method, digests = fp.get("method", "sha256-f32"), fp["tensors"]
    if set(digests) != set(weights):
        extra, lacking = sorted(set(digests) - set(weights)), sorted(set(weights) - set(digests))
        raise DumpError(f"A's weights fingerprint lists other weights than the model has (only in A: "
                        f"{extra[:3]}, only in the model: {lacking[:3]}): isolate with the port's own checkpoint")
    worst = None
    for label, dtype in candidates:
        differ = []
        for name in sorted(weights):   # one rounded weight at a time
            w = weights[name] if dtype is None else round_weight(weights[name], dtype)
            if weight_digest(w, method) != digests[name]:
                differ.append(name)
                break
        if not differ:
            return weights, dtype, (f"weights: the model's, {label}, equal to A's (fingerprint {method}, "
                                    f"{len(weights)} weights)")
        worst = worst or (label, differ)
    raise DumpError(f"the model's weights are not the ones A ran with: {worst[1][0]} differs from A's fingerprint "
                    f"({worst[0]}; also tried rounding to the dump's dtype); give --model the port's own checkpoint")


# -- each operation's inputs, read from the dump --------------------------------------------------------


class _Operations:
    """The recipes of recipes.py run on one dump: each reads the tensors the dump recorded as its inputs."""

    def __init__(self, dump, config, weights, weight_dtype=None):
        self.dump, self.config, self.weights = dump, config, weights
        self.r, self.held = rounding(dump.dtype), rounding(weight_dtype)
        self.cache = {}      # weights in float64, kept while one name is isolated pass by pass
        # intermediates and weights of a head's base model carry "model." (a bare Qwen2Model's do not)
        self.prefix = "model." if "model.embed_tokens.weight" in weights else ""
        self.used = []       # the inputs the last operation read, as dump keys

    def forget(self):
        self.cache.clear()

    def expected(self, name, k):
        """op(inputs) for tensor `name` of pass k, float64, in the dump's shape (NotIsolated when an input
        is not recorded)."""
        layer, op = self.operation(name)
        choices = (RECIPES if layer is None else LAYER_RECIPES)[op]
        recipe = next(c for c in (choices if isinstance(choices, tuple) else (choices,))
                      if all(self.has(self.input_name(n, layer), k) for n in c.when))
        start, length = self.dump.passes[k]["start"], self.dump.passes[k]["length"]
        ctx = Context(self.config, layer=layer, scope=f"{self.prefix}layers.{layer}", start=start, length=length,
                      shape=tuple(self.dump.tensor(name, k).shape),
                      input_ids=self.dump.input_ids[:, start:start + length], attention_mask=self.dump.attention_mask,
                      r=self.r, held=self.held, cache=self.cache)
        inputs = [self.read(symbol, layer, k) for symbol in recipe.inputs]
        return recipe.compute(ctx, *inputs, *(self.weight(w, layer) for w in recipe.weights))

    def operation(self, name):
        """(layer, or None for the model's own operations; the operation's name in recipes.py)"""
        for op in RECIPES:
            if name == self.model_name(op):
                return None, op
        layer, _, op = name[len(f"{self.prefix}layers."):].partition(".")
        if not name.startswith(f"{self.prefix}layers.") or not layer.isdigit() or op not in LAYER_RECIPES:
            raise NotIsolated("qwen2np does not know this tensor's operation")
        return int(layer), op

    def model_name(self, op):
        return op if op == "logits" else f"{self.prefix}{op}"

    def input_name(self, symbol, layer):
        """A recipe's input, in `layer` (None: the model's) -> the dump's name of that tensor."""
        if symbol == "residual":   # the stream entering the layer, or the final norm
            before = self.config.num_hidden_layers if layer is None else layer
            return f"{self.prefix}layers.{before - 1}" if before > 0 else f"{self.prefix}embed_tokens"
        if layer is None or symbol in RECIPES:
            return self.model_name(symbol)
        return f"{self.prefix}layers.{layer}.{symbol}"

    def weight(self, name, layer):
        if name.startswith("lm_head"):
            return self.weights[name]
        return self.weights[f"{self.prefix}{name}" if layer is None else f"{self.prefix}layers.{layer}.{name}"]

    def has(self, name, k):
        return name in self.dump.names(k)

    def read(self, symbol, layer, k):
        """A recipe's input at pass k; `…@*`: passes 0 … k joined along T, what the KV cache holds."""
        if not symbol.endswith("@*"):
            return self.get(self.input_name(symbol, layer), k)
        name = self.input_name(symbol[:-2], layer)
        passes = [self.get(name, i) for i in range(k + 1)]
        t_axis, _ = position_axes(name, passes[0].ndim)
        return np.concatenate(passes, axis=t_axis)

    def get(self, name, k):
        """The dump's tensor `name` of pass k, float64, noted as an input of the operation. A NaN or inf at
        a padding position is read as 0; a mask is read as recorded (its -inf, if any, means "hidden")."""
        if not self.has(name, k):
            raise NotIsolated(f"needs {name}{'@' + str(k) if k else ''}, which A does not record")
        p = self.dump.passes[k]
        x = np.asarray(self.dump.tensor(name, k), dtype=np.float64)
        if not name.endswith(".mask") and not np.isfinite(x).all():
            valid = valid_elements(name, x.shape, self.dump.attention_mask, p["start"], p["length"])
            if valid is not None:   # a NaN at padding must not reach a real position
                x = np.where(valid | np.isfinite(x), x, 0.0)
        self.used.append(f"{name}{'@' + str(k) if k else ''}")
        return x


# -- the isolation ------------------------------------------------------------------------------------


def isolate_dump(dump, model, policy=None, progress=None):
    """Recompute every tensor of `dump` from the dump's own inputs with `model`'s config and weights.

    `model` is a qwen2np model of the checkpoint the port ran (its weights are checked against the dump's
    fingerprint; a half-precision dump's against the weights rounded to its dtype). `policy` is a name
    of policies.py ("float32", "bfloat16", "q4_k_m", …) or None for the dump's dtype. Returns an
    Isolation; its `root_causes` are the tensors whose own operation is out of the policy.
    """
    policy = default_policy(dump.dtype) if policy is None else policy_named(policy)
    weights, weight_dtype, weights_note = port_weights(model, dump)
    notes = [weights_note]
    declared = (dump.manifest.get("model") or {}).get("config_fingerprint")
    if declared and declared != config_fingerprint(model.config):
        mine, theirs = architecture(model.config), (dump.manifest.get("model") or {}).get("config") or {}
        fields = [f for f in mine if mine.get(f) != theirs.get(f)]
        notes.append(f"A declares another config than the model's ({', '.join(fields) or 'fingerprints differ'}): "
                     f"recomputed with the model's")
    file_type = (dump.manifest.get("model") or {}).get("file_type")
    if file_type and file_type not in ("F32", "F16", "BF16") and policy.name in ("float32", "float64"):
        notes.append(f"A ran on {file_type} weights, whose products quantize their activations: --policy "
                     f"{'q8_0' if file_type.upper().startswith('Q8') else 'q4_k_m'} holds them to what that costs")
    recompute = _Operations(dump, model.config, weights, weight_dtype)
    checks = []
    # name by name, each through every pass (so that each weight is converted once), reported in dump order
    entries = dump.entries()
    first, order = {}, {}
    for i, (_, e) in enumerate(entries):
        first.setdefault(e["name"], i)
        order[e["key"]] = i
    previous = None
    for index, entry in sorted(entries, key=lambda ie: (first[ie[1]["name"]], ie[0])):
        name, key = entry["name"], entry["key"]
        if name != previous:
            recompute.forget()
            previous = name
        recompute.used = []
        p = dump.passes[index]
        check = OpCheck(name=name, key=key, pass_index=index, inputs=[], position=p["start"] + p["length"] - 1)
        try:
            expected = recompute.expected(name, index)
        except NotIsolated as e:
            check.missing, check.inputs = str(e), list(recompute.used)
            checks.append(check)
            continue
        check.inputs = list(dict.fromkeys(recompute.used))
        actual = dump[key]
        valid = valid_elements(name, actual.shape, dump.attention_mask, p["start"], p["length"])
        _measure(check, name, actual, np.broadcast_to(expected, actual.shape), valid, dump.dtype)
        policy.judge_isolation(check)
        checks.append(check)
        if progress is not None:
            progress(check)
    recompute.forget()
    checks.sort(key=lambda c: order[c.key])
    return Isolation(dump, policy, checks, notes)


def _measure(check, name, actual, expected, valid, dtype):
    """Fill `check`'s error figures: the comparison metrics, and the ulp figures in half precision."""
    t = compare_tensor(name, check.key, check.pass_index, actual, expected, valid, math.inf, logits_figures=False)
    check.compared, check.max_abs, check.rel, check.nmse_db = t.compared, t.max_abs, t.rel, t.nmse_db
    if dtype in HALF and name.rsplit(".", 1)[-1] != "mask":
        shares = ulp_shares(values(actual, valid), values(expected, valid), dtype)
        if shares is not None:
            check.off, check.beyond, check.max_ulps = shares
