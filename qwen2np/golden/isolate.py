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
half-precision implementation rounds (after each operation, as transformers does: the recipe of each
operation is below), so a correct operation agrees with it to the last bit almost everywhere, and a
systematic error of 1e-3, a quarter of bfloat16's 2⁻⁸ rounding step, shows as a flood of one-ulp
differences. docs/porting.md and docs/tolerances.md explain the policies; policies.py holds them.

The operations, in the legend of docs/dimensions.md (r = round to the dump's dtype; identity in float32,
float64 and for quantized-weight ports, which compute in float32):

    embed_tokens              r(W_embed[input_ids])                              exact
    rotary_emb.cos / .sin     r(cos / sin(position · inv_freq)), positions of the pass
    input_layernorm           r(w · r(x / sqrt(mean(x²) + eps))), x = the residual stream before
    q_proj, k_proj, v_proj    r(x W_ᵀ + b)
    q_rope, k_rope            r(r(q · cos) + r(rotate_half(q) · sin))            (tables from the dump if
                                                                                  recorded, else computed)
    scores                    r(r(q_rope k_ropeᵀ) · HD^-0.5), keys of this and every earlier pass
    mask                      the pattern of allowed keys (causal, padding, sliding window): exact
    probs                     r(softmax(scores + mask))
    context                   r(probs v), values of this and every earlier pass, heads merged
    head_out                  r(context_h W_o[:, h]ᵀ) per head h
    o_proj                    r(context W_oᵀ)
    resid_mid                 r(x + o_proj)
    post_attention_layernorm  as input_layernorm, of resid_mid (or of r(x + o_proj))
    gate_proj, up_proj        r(x W_ᵀ)
    act                       r(silu(gate_proj))
    act_up                    r(act(gate_proj) · up_proj)        (a port's fused SwiGLU product, optional)
    down_proj                 r(act_up W_downᵀ), act_up = r(act · up_proj) unless recorded
    layers.{l}                r(resid_mid + down_proj)
    norm, logits              as input_layernorm; r(norm W_lm_headᵀ)

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

import ml_dtypes
import numpy as np

from ..errors import DumpError
from ..model.masks import build_attention_bias
from ..model.rope import RotaryEmbedding
from .compare import json_safe, compare_tensor, valid_elements
from .fingerprint import architecture, config_fingerprint, weight_digest
from .policies import default_policy, policy_named

_HALF = {"bfloat16", "float16"}


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


class _Missing(Exception):
    """An input of the operation is not in the dump."""


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
    if dump.dtype in _HALF:
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
            w = weights[name] if dtype is None else _round_weight(weights[name], dtype)
            if weight_digest(w, method) != digests[name]:
                differ.append(name)
                break
        if not differ:
            return weights, dtype, (f"weights: the model's, {label}, equal to A's (fingerprint {method}, "
                                    f"{len(weights)} weights)")
        worst = worst or (label, differ)
    raise DumpError(f"the model's weights are not the ones A ran with: {worst[1][0]} differs from A's fingerprint "
                    f"({worst[0]}; also tried rounding to the dump's dtype); give --model the port's own checkpoint")


def _round_weight(w, dtype):
    """A weight rounded to a half-precision dtype (stored so: half the memory of float32)."""
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    return np.asarray(w).astype(np.float32, copy=False).astype(target)


# -- rounding to the dump's dtype ---------------------------------------------------------------------


def rounding(dtype):
    """r(x): float64 -> the nearest value of `dtype`, as float64; the identity for float32 and float64.

    subtle: ml_dtypes rounds float64 to bfloat16 through float32 (two roundings), as a port that computes
    in float32 and stores bfloat16 does.
    """
    if dtype not in _HALF:
        return lambda x: x
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    return lambda x: np.asarray(x).astype(target).astype(np.float64)


def ulps(x, expected, dtype):
    """|x - expected| in units in the last place of `dtype` at `expected` (both float64 arrays)."""
    info = ml_dtypes.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    exponent = np.floor(np.log2(np.maximum(np.abs(expected), float(info.smallest_normal))))   # subnormals: one step
    return np.abs(x - expected) / np.exp2(exponent - info.nmant)


# -- recomputing each operation -----------------------------------------------------------------------


class _Recompute:
    """The operations of docs/intermediates.md, recomputed in float64 from one dump's own tensors."""

    def __init__(self, dump, config, weights, weight_dtype=None):
        self.dump, self.config, self.weights = dump, config, weights
        self.r = rounding(dump.dtype)
        self.wr = rounding(weight_dtype)   # the weights as the port holds them: rounded block by block
        self._float64 = {}                 # weights in float64, kept while one name is isolated pass by pass
        self.mask = dump.attention_mask                                      # [B, N] or None
        # intermediates and weights of a head's base model carry "model." (a bare Qwen2Model's do not)
        self.prefix = "model." if "model.embed_tokens.weight" in weights else ""
        self.used = []
        self._rotary = RotaryEmbedding(config, np.float64)

    # inputs: the dump's tensors, float64, as recorded (a NaN or inf at a padding position read as 0)

    def has(self, name, k):
        return name in self.dump.names(k)

    def get(self, name, k, zero_padding=True):
        """The dump's tensor `name` of pass k, float64, noted as an input of the operation."""
        if not self.has(name, k):
            raise _Missing(f"needs {name}{'@' + str(k) if k else ''}, which A does not record")
        p = self.dump.passes[k]
        x = np.asarray(self.dump.tensor(name, k), dtype=np.float64)
        valid = valid_elements(name, x.shape, self.mask, p["start"], p["length"]) if zero_padding else None
        if valid is not None and not np.isfinite(x).all():
            x = np.where(valid | np.isfinite(x), x, 0.0)   # a NaN at padding must not reach a real position
        self.used.append(f"{name}{'@' + str(k) if k else ''}")
        return x

    def along_passes(self, name, k):
        """`name` of passes 0 … k joined along T: the keys or values the cache holds at pass k.  -> [B, past+T, F]"""
        return np.concatenate([self.get(name, i) for i in range(k + 1)], axis=1)

    def w(self, name):
        return self.weights[f"{self.prefix}{name}" if not name.startswith("lm_head") else name]

    # the operations

    def float64(self, weight, r0=0, r1=None):
        """Rows r0:r1 of a weight as the port holds it, in float64 (whole weights up to 64 MB are kept
        until `forget`, so that the passes of one name convert each weight once)."""
        whole = r0 == 0 and (r1 is None or r1 >= weight.shape[0]) and weight.size * 8 <= 64 << 20
        if whole and id(weight) in self._float64:
            return self._float64[id(weight)]
        w = self.wr(np.asarray(weight[r0:r1], dtype=np.float64))
        if whole:
            self._float64[id(weight)] = w
        return w

    def forget(self):
        self._float64.clear()

    def linear(self, x, weight, bias=None, rows=8192):
        """r(x Wᵀ + b) in float64, W converted a block of rows at a time.  [..., in] -> [..., out]"""
        flat = x.reshape(-1, x.shape[-1])                                  # [N, in]
        out = np.empty((flat.shape[0], weight.shape[0]))                   # [N, out]
        for r0 in range(0, weight.shape[0], rows):
            out[:, r0:r0 + rows] = flat @ self.float64(weight, r0, r0 + rows).T
        if bias is not None:
            out += self.float64(bias)
        return self.r(out).reshape(*x.shape[:-1], weight.shape[0])

    def rms_norm(self, x, weight):
        """r(w · r(x / sqrt(mean(x²) + eps))): statistics unrounded, the normalised x rounded before the
        weight, as transformers' Qwen2RMSNorm does in half precision.  [..., D] -> [..., D]"""
        variance = (x * x).mean(axis=-1, keepdims=True)                    # [..., 1]
        h = self.r(x / np.sqrt(variance + self.config.rms_norm_eps))
        return self.r(self.float64(weight) * h)

    def tables(self, k):
        """cos, sin [B or 1, T, HD] of pass k: the dump's own if it records them, else computed."""
        cos_name, sin_name = f"{self.prefix}rotary_emb.cos", f"{self.prefix}rotary_emb.sin"
        if self.has(cos_name, k) and self.has(sin_name, k):
            return self.get(cos_name, k), self.get(sin_name, k)
        return self.rotary(k)

    def rotary(self, k):
        """cos, sin [1, T, HD] of pass k's positions, from the config, in float64 rounded to the dump's dtype."""
        p = self.dump.passes[k]
        positions = np.arange(p["start"], p["start"] + p["length"], dtype=np.int64)[None]   # [1, T]
        cos, sin = self._rotary(positions)                                  # [1, T, HD] float64
        return self.r(cos), self.r(sin)

    def rope(self, x, heads, k):
        """[B, T, heads·HD] -> heads split, rotated: [B, heads, T, HD]"""
        B, T, _ = x.shape
        HD = self.config.head_dim
        x = x.reshape(B, T, heads, HD).transpose(0, 2, 1, 3)                 # -> [B, heads, T, HD]
        cos, sin = (t[:, None] for t in self.tables(k))                     # [B or 1, 1, T, HD]
        half = HD // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half: (-x2, x1)
        return self.r(self.r(x * cos) + self.r(rotated * sin))

    def keys_values(self, name, k, S):
        """The last S cached keys (k_rope [B, KV, T, HD] per pass) or values (v_proj [B, T, KV·HD] per pass)
        at pass k.  -> [B, KV, S, HD]"""
        KV, HD = self.config.num_key_value_heads, self.config.head_dim
        if name.endswith("k_rope"):
            x = np.concatenate([self.get(name, i) for i in range(k + 1)], axis=2)     # [B, KV, past+T, HD]
        else:
            x = self.along_passes(name, k)                                            # [B, past+T, KV*HD]
            x = x.reshape(x.shape[0], x.shape[1], KV, HD).transpose(0, 2, 1, 3)       # -> [B, KV, past+T, HD]
        if x.shape[2] < S:
            raise _Missing(f"needs {S} cached positions of {name}, A records {x.shape[2]}")
        return x[:, :, x.shape[2] - S:]

    def expected_mask(self, layer, k, shape):
        """The additive mask of layer `layer` at pass k, float64: 0 where a key is allowed.  -> [B, 1, T, S]"""
        p = self.dump.passes[k]
        B, _, T, S = shape
        past = p["start"]
        window = self.config.sliding_window if self.config.layer_types[layer] == "sliding_attention" else None
        kv_start = past + T - S
        mask = None if self.mask is None else self.mask[:, :past + T]
        return build_attention_bias(B, past, T, kv_start, S, mask, None, window, np.float64)

    def expected(self, name, k):
        """op(inputs) for tensor `name` of pass k, float64, in the dump's shape."""
        p, pre, cfg = self.dump.passes[k], self.prefix, self.config
        H, KV, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        shape = tuple(self.dump.tensor(name, k).shape)
        if name == f"{pre}embed_tokens":
            ids = self.dump.input_ids[:, p["start"]:p["start"] + p["length"]]      # [B, T]
            return self.r(self.wr(np.asarray(self.w("embed_tokens.weight")[ids], dtype=np.float64)))   # -> [B, T, D]
        if name in (f"{pre}rotary_emb.cos", f"{pre}rotary_emb.sin"):
            cos, sin = self.rotary(k)
            return np.broadcast_to(cos if name.endswith("cos") else sin, shape)
        if name == f"{pre}norm":
            return self.rms_norm(self.get(f"{pre}layers.{cfg.num_hidden_layers - 1}", k), self.w("norm.weight"))
        if name == "logits":
            return self.linear(self.get(f"{pre}norm", k), self.weights["lm_head.weight"])
        layer, _, rest = name[len(f"{pre}layers."):].partition(".")
        if not name.startswith(f"{pre}layers.") or not layer.isdigit():
            raise _Missing("qwen2np does not know this tensor's operation")
        l = int(layer)
        scope, w = f"{pre}layers.{l}", lambda n: self.w(f"layers.{l}.{n}")
        before = f"{pre}layers.{l - 1}" if l > 0 else f"{pre}embed_tokens"     # the residual stream before

        if rest == "input_layernorm":
            return self.rms_norm(self.get(before, k), w("input_layernorm.weight"))
        if rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            proj = rest.split(".")[1]
            return self.linear(self.get(f"{scope}.input_layernorm", k), w(f"self_attn.{proj}.weight"),
                               w(f"self_attn.{proj}.bias"))
        if rest == "self_attn.q_rope":
            return self.rope(self.get(f"{scope}.self_attn.q_proj", k), H, k)
        if rest == "self_attn.k_rope":
            return self.rope(self.get(f"{scope}.self_attn.k_proj", k), KV, k)
        if rest == "self_attn.scores":
            B, _, T, S = shape
            q = self.get(f"{scope}.self_attn.q_rope", k)                             # [B, H, T, HD]
            keys = self.keys_values(f"{scope}.self_attn.k_rope", k, S)               # [B, KV, S, HD]
            # subtle: query head h reads KV head h // G (repeat-interleave), as in attention.py
            qg = q.reshape(B, KV, (H // KV) * T, HD)                                 # -> [B, KV, G*T, HD]
            scores = self.r(qg @ keys.swapaxes(-1, -2)).reshape(B, H, T, S)          # -> [B, H, T, S]
            return self.r(scores * HD ** -0.5)
        if rest == "self_attn.mask":
            return self.expected_mask(l, k, shape)
        if rest == "self_attn.probs":
            scores = self.get(f"{scope}.self_attn.scores", k)                        # [B, H, T, S]
            if self.has(f"{scope}.self_attn.mask", k):   # the port's own mask, as a pattern
                allowed = self.get(f"{scope}.self_attn.mask", k, zero_padding=False) == 0
            else:
                allowed = self.expected_mask(l, k, (shape[0], 1, shape[2], shape[3])) == 0
            # finfo.min, not -inf: a row with no allowed key is uniform, as in the model (masks.py)
            x = scores + np.where(allowed, 0.0, np.finfo(np.float64).min)
            x = np.exp(x - x.max(axis=-1, keepdims=True))
            return self.r(x / x.sum(axis=-1, keepdims=True))
        if rest == "self_attn.context":
            probs = self.get(f"{scope}.self_attn.probs", k)                          # [B, H, T, S]
            B, _, T, S = probs.shape
            values = self.keys_values(f"{scope}.self_attn.v_proj", k, S)             # [B, KV, S, HD]
            context = probs.reshape(B, KV, (H // KV) * T, S) @ values                # -> [B, KV, G*T, HD]
            return self.r(context.reshape(B, H, T, HD).transpose(0, 2, 1, 3).reshape(B, T, H * HD))
        if rest == "self_attn.head_out":
            context = self.get(f"{scope}.self_attn.context", k)                      # [B, T, H*HD]
            B, T, _ = context.shape
            wo = self.float64(w("self_attn.o_proj.weight")).reshape(-1, H, HD)                   # [D, H, HD]
            heads = context.reshape(B, T, H, HD)
            return self.r(np.einsum("bthk,dhk->bhtd", heads, wo))                    # -> [B, H, T, D]
        if rest == "self_attn.o_proj":
            return self.linear(self.get(f"{scope}.self_attn.context", k), w("self_attn.o_proj.weight"))
        if rest == "resid_mid":
            return self.r(self.get(before, k) + self.get(f"{scope}.self_attn.o_proj", k))
        if rest == "post_attention_layernorm":
            return self.rms_norm(self.resid_mid(scope, before, k), w("post_attention_layernorm.weight"))
        if rest in ("mlp.gate_proj", "mlp.up_proj"):
            return self.linear(self.get(f"{scope}.post_attention_layernorm", k), w(f"{rest}.weight"))
        if rest == "mlp.act":
            return self.r(self.activation(self.get(f"{scope}.mlp.gate_proj", k)))
        if rest == "mlp.act_up":
            return self.r(self.activation(self.get(f"{scope}.mlp.gate_proj", k)) * self.get(f"{scope}.mlp.up_proj", k))
        if rest == "mlp.down_proj":
            if self.has(f"{scope}.mlp.act_up", k):
                product = self.get(f"{scope}.mlp.act_up", k)
            else:
                product = self.r(self.get(f"{scope}.mlp.act", k) * self.get(f"{scope}.mlp.up_proj", k))
            return self.linear(product, w("mlp.down_proj.weight"))
        if rest == "":
            return self.r(self.resid_mid(scope, before, k) + self.get(f"{scope}.mlp.down_proj", k))
        raise _Missing("qwen2np does not know this tensor's operation")

    def resid_mid(self, scope, before, k):
        """The residual stream after attention: the dump's own if recorded, else r(x + o_proj)."""
        if self.has(f"{scope}.resid_mid", k):
            return self.get(f"{scope}.resid_mid", k)
        return self.r(self.get(before, k) + self.get(f"{scope}.self_attn.o_proj", k))

    def activation(self, x):
        act = self.config.hidden_act
        if act in ("silu", "swish"):
            return x / (1 + np.exp(-x))
        if act in ("gelu_pytorch_tanh", "gelu_new"):
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        if act == "relu":
            return np.maximum(x, 0)
        raise _Missing(f"hidden_act {act!r} is not one qwen2np recomputes")


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
    recompute = _Recompute(dump, model.config, weights, weight_dtype)
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
        except _Missing as e:
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
    if dtype in _HALF and name.rsplit(".", 1)[-1] != "mask":
        x = np.asarray(actual if valid is None else actual[valid], dtype=np.float64).reshape(-1)
        e = np.asarray(expected if valid is None else expected[valid], dtype=np.float64).reshape(-1)
        finite = np.isfinite(x) & np.isfinite(e)
        d = ulps(x[finite], e[finite], dtype)
        if d.size:
            check.off, check.beyond, check.max_ulps = float((d > 0.5).mean()), float((d > 1.5).mean()), float(d.max())
        if not finite.all() and not np.array_equal(x[~finite], e[~finite], equal_nan=True):
            check.off = check.beyond = check.max_ulps = math.inf


def format_isolation(isolation, brief=False, comparison=None):
    """The text report: one line per tensor (only root causes and the tensors not isolated when `brief`),
    then the verdict naming every root cause; with `comparison` (of the same dump against a reference),
    which of its failures are root causes and which inherit an error."""
    lines = [f"isolation of {isolation.dump.describe()}, policy {isolation.policy.name}"]
    lines += [f"note: {n}" for n in isolation.notes]
    half = any(c.off is not None for c in isolation.checks)
    width = max(len(c.key) for c in isolation.checks)
    header = f"{'tensor':<{width}}  {'max abs':>9}  {'rel':>9}  {'NMSE dB':>8}"
    header += f"  {'≠ 1 ulp':>8}  {'> 1 ulp':>8}" if half else ""
    lines.append(header + "  limit")
    for c in isolation.checks:
        if brief and c.ok is not False:
            continue
        if c.ok is None:
            lines.append(f"{c.key:<{width}}  not isolated: {c.missing}")
            continue
        nmse = "exact" if c.nmse_db is None else f"{c.nmse_db:8.1f}"
        line = f"{c.key:<{width}}  {c.max_abs:9.2e}  {c.rel:9.2e}  {nmse:>8}"
        if half:
            line += "          " * 2 if c.off is None else f"  {100 * c.off:7.2f}%  {100 * c.beyond:7.3f}%"
        lines.append(f"{line}  {c.limit}  {'ok' if c.ok else 'ROOT CAUSE'}")
    missing = isolation.not_isolated
    if missing and brief:
        lines.append(f"not isolated: {len(missing)} tensors whose inputs A does not record (e.g. {missing[0].key}: "
                     f"{missing[0].missing})")
    roots = isolation.root_causes
    isolated = len(isolation.checks) - len(missing)
    if roots:
        lines.append(f"ROOT CAUSES: {len(roots)} of {isolated} operations are wrong on their own inputs: "
                     + ", ".join(f"{c.key} ({_figure(c)})" for c in roots))
    else:
        lines.append(f"ok: all {isolated} operations isolated agree with their recomputation "
                     f"({isolation.policy.name} policy)")
    if comparison is not None and not comparison.ok:
        failed = [t.key for t in comparison.tensors if not t.ok]
        own = {c.key for c in roots}
        inherited = [k for k in failed if k not in own]
        unexplained = [k for k in failed if k not in own and k in {c.key for c in missing}]
        lines.append(f"of the {len(failed)} tensors out of tolerance against B, {len(failed) - len(inherited)} are "
                     f"root causes; {len(inherited)} inherit an error from upstream"
                     + (f" ({len(unexplained)} of them could not be isolated)" if unexplained else ""))
    return "\n".join(lines)


def _figure(check):
    if check.off is not None and check.rel < 1e-2:
        return f"{100 * check.off:.1f}% of elements off by ≥ 1 ulp"
    return f"rel {check.rel:.2e}"
