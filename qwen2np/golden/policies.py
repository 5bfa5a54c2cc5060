"""Verdict policies: how far a correct implementation of a given precision may be, per tensor kind.

A policy answers two questions, each from measurements (docs/tolerances.md has them, with the scripts
that reproduce them):

* `compare` (A against a reference B, ideally qwen2np float64): is A's error what a *correct*
  implementation in this precision makes? float32 and float64 hold `rel` to tolerances.py's table; the
  reduced-precision policies (bfloat16, float16, and float32 compute on quantized weights: q8_0, q4_k_m)
  hold, per tensor kind and depth, the NMSE in dB and the cosine similarity to limits, and the logits
  also to a KL divergence and top-1 / top-p agreement.
* `isolate` (each operation of A recomputed from A's own inputs, isolate.py): is this operation right?
  float32-like policies hold the local `rel` error; bfloat16 and float16 hold the share of elements that
  differ from the rounded recomputation by one ulp or more, and by more than one.

>>> policy_named("bf16").name, default_policy("float64").name
('bfloat16', 'float64')
>>> sorted(POLICIES)
['bfloat16', 'float16', 'float32', 'float64', 'q4_k_m', 'q8_0']
"""

import math
from dataclasses import dataclass

from ..errors import DumpError
from .tolerances import TOLERANCES, kind_of

ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32",
           "fp64": "float64", "f64": "float64", "q4_k": "q4_k_m", "q8": "q8_0"}
TOP_P = 0.9   # the nucleus compared for logits: transformers' TopPLogitsWarper keeps the same set
MIN_ROWS = 16  # top-1 and top-p agreement are held to the policy only over at least this many positions


@dataclass(frozen=True)
class Rel:
    """Isolation limit: the local error `rel` (max |A - op(inputs)| / scale) at most `rel`, plus
    `per_position` times the pass's last position (RoPE: float32 angles lose digits as positions grow)."""

    rel: float
    per_position: float = 0.0

    def judge(self, check):
        limit = self.rel + self.per_position * check.position
        return check.rel <= limit, f"rel ≤ {limit:.1e}"


@dataclass(frozen=True)
class Ulps:
    """Isolation limit in half precision: at most a share `off` of the elements differ from the rounded
    recomputation (by one ulp or more) and at most `beyond` by more than one ulp; both at least `floor`
    elements, so that one element of a decode step's 128 keys is not 0.8 % of the tensor."""

    off: float
    beyond: float
    floor: int = 2

    def judge(self, check):
        if check.off is None:   # the mask: a pattern, exact
            return check.rel == 0, "exact"
        least = self.floor / max(1, check.compared)
        off, beyond = max(self.off, least), max(self.beyond, least)
        return check.off <= off and check.beyond <= beyond, f"≠ ≤ {100 * off:.3g}%, > 1 ulp ≤ {100 * beyond:.3g}%"


@dataclass(frozen=True)
class Nmse:
    """Isolation limit for a product with quantized weights: the local error's NMSE at most `db` dB
    (llama.cpp quantizes the activations to 8 bits for these products)."""

    db: float

    def judge(self, check):
        nmse = -math.inf if check.nmse_db is None else check.nmse_db
        return nmse <= self.db, f"NMSE ≤ {self.db:g} dB"


@dataclass(frozen=True)
class Budget:
    """Comparison limit for a reduced-precision policy, per depth band (layer 0; the first quarter of the
    stack; the rest): NMSE at most `nmse[band]` dB (None: exact) and cosine similarity at least
    `cosine[band]`."""

    nmse: tuple
    cosine: tuple

    @staticmethod
    def band(depth):
        return 0 if depth == 0 else 1 if depth <= 0.25 else 2


@dataclass(frozen=True)
class LogitsBudget:
    """The logits of a reduced-precision policy, per dump (one prompt, or a batch)."""

    kl: float        # mean KL(reference ‖ A) in nats, at most
    top1: float      # share of positions with the same best token, at least
    top_p: float     # share of positions with the same top-p (0.9) nucleus, at least


@dataclass(frozen=True)
class Policy:
    name: str
    about: str
    isolate: dict                 # kind -> Rel | Ulps | Nmse ("*": every other kind)
    compare: dict = None          # kind -> Budget ("*": every other kind); None: rel tolerances of tolerances.py
    logits: LogitsBudget = None

    def isolation_limit(self, name, via=""):
        """The limit of an isolated operation; `via` "fused" for a context recomputed from q, k and v."""
        kind = kind_of(name)
        return self.isolate.get(f"{kind} ({via})" if via else kind) or self.isolate.get(kind, self.isolate["*"])

    def judge_isolation(self, check):
        check.ok, check.limit = self.isolation_limit(check.name, getattr(check, "via", "")).judge(check)

    def judge_comparison(self, t, depth):
        """Set `t.ok` and `t.limit` for a TensorComparison `t` at `depth` (0 first layer … 1 last) under
        this reduced-precision policy."""
        kind = kind_of(t.name)
        if kind == "self_attn.mask":   # a pattern: any precision allows the same keys
            t.ok, t.limit = t.rel == 0, "exact"
            return
        budget = self.compare.get(kind, self.compare["*"])
        band = Budget.band(depth)
        limit, cosine = budget.nmse[band], budget.cosine[band]
        if limit is None:
            t.ok, t.limit = t.nmse_db is None, "exact"
            return
        nmse = -math.inf if t.nmse_db is None else t.nmse_db
        t.ok = bool(nmse <= limit and (t.cosine is None or t.cosine >= cosine))
        t.limit = f"NMSE ≤ {limit:g} dB, cos ≥ {cosine:g}"
        if kind == "logits" and t.kl is not None:
            rows = t.compared // max(1, t.shape[-1])
            t.ok = t.ok and t.kl <= self.logits.kl
            t.limit += f", KL ≤ {self.logits.kl:g}"
            if rows >= MIN_ROWS:   # a near-tie flipping among a few positions says nothing
                t.ok = t.ok and t.top1 >= self.logits.top1 and t.top_p >= self.logits.top_p
                t.limit += f", top-1 ≥ {100 * self.logits.top1:g}%, top-p ≥ {100 * self.logits.top_p:g}%"

    def rel_tolerances(self):
        """The `rel` table of a float policy, or None for a reduced-precision one."""
        return TOLERANCES[self.name] if self.compare is None else None


# -- the numbers: each a measured worst case with its headroom (docs/tolerances.md; scripts/measure_policies.py
# measures transformers bf16/fp16/f32, qwen2np f32 and llama.cpp F32/Q8_0/Q4_K_M against qwen2np float64,
# 5 prompts of 45-62 tokens with 2 decode steps, on the test checkpoint)

_EXACT = {"embed_tokens": Rel(0.0), "self_attn.mask": Rel(0.0)}
_ROPE = ("rotary_emb.cos", "rotary_emb.sin", "self_attn.q_rope", "self_attn.k_rope")
# float32: worst local rel 2.1e-6 (down_proj; RoPE tables at position 64, whose float32 angles are off by
# about 3.4e-8 · position); a RoPE θ off by 0.1 % makes 5e-7 · position
# a context recomputed from q, k and v (a port with a fused attention, no probs dumped) carries the port's float32
# rounding of the scores through the softmax, which layer 0's scores of a few hundred sharpen: a correct float32
# fused port of the test checkpoint measured 4.0e-5 (60 tokens; tests/support/ports.py); held as compare holds
# probs and context for the same reason (tolerances.py)
_FLOAT32_ISOLATION = {**_EXACT, **{k: Rel(2e-6, 1e-7) for k in _ROPE}, "self_attn.context (fused)": Rel(5e-4),
                      "*": Rel(2e-5)}
# quantized weights (llama.cpp): the products' local NMSE, the looser of two measurements' worst + 6 dB (5
# prompts of 45-62 tokens; 4 texts up to 512 tokens, scripts/measure_policies.py --prompt-set lengths); all else
# float32
_Q8_0_PRODUCTS = {"self_attn.q_proj": -40, "self_attn.k_proj": -37, "self_attn.v_proj": -27, "self_attn.o_proj": -25,
                  "self_attn.head_out": -25, "mlp.gate_proj": -38, "mlp.up_proj": -35, "mlp.down_proj": -31,
                  "logits": -31}
_Q4_K_M_PRODUCTS = {"self_attn.q_proj": -37, "self_attn.k_proj": -37, "self_attn.v_proj": -27,
                    "self_attn.o_proj": -26, "self_attn.head_out": -26, "mlp.gate_proj": -38, "mlp.up_proj": -35,
                    "mlp.down_proj": -23, "logits": -32}


def _budgets(table):
    """{kind: (nmse per band, cosine per band)} -> {kind: Budget}; "*" the loosest of each band."""
    budgets = {k: Budget(tuple(n), tuple(c)) for k, (n, c) in table.items()}
    layer_kinds = [b for k, b in budgets.items() if k not in ("embed_tokens", "rotary_emb.cos", "rotary_emb.sin")]
    budgets["*"] = Budget(tuple(max(b.nmse[i] for b in layer_kinds) for i in range(3)),
                          tuple(min(b.cosine[i] for b in layer_kinds) for i in range(3)))
    return budgets


# NMSE limits (dB) per band (layer 0, layers up to a quarter of the depth, the rest), and cosine limits:
# the worst measured + 6 dB, and 1 - 4 (1 - worst cosine); float32-level figures held at -100 dB.
# bfloat16: the loosest of two measurements (docs/tolerances.md, "Three bfloat16 implementations"):
# transformers on the five prompts of 45-62 tokens, and transformers, mlx-lm 0.32.2 and keras-hub 0.32.0
# on prose (96 tokens), code (128), Chinese (160) and a 512-token text (measure_policies.py --prompt-set
# lengths --ports ...)
# float16, q8_0 and q4_k_m likewise: the loosest of the five prompts and of transformers float16 and
# llama.cpp Q8_0 / Q4_K_M on the same four texts (docs/tolerances.md, "float16 and quantized weights, four
# texts up to 512 tokens"); head_out (not dumped at 512 tokens) as loose as o_proj
_BFLOAT16 = {
    "embed_tokens": ((-50, -50, -50), (0.999995,) * 3),
    "rotary_emb.cos": ((-53, -53, -53), (0.999998,) * 3),
    "rotary_emb.sin": ((-50, -50, -50), (0.999995,) * 3),
    "input_layernorm": ((-42, -14, -21), (0.999971, 0.980135, 0.996071)),
    "self_attn.q_proj": ((-49, -20, -28), (0.999993, 0.995701, 0.999215)),
    "self_attn.k_proj": ((-46, -27, -24), (0.999989, 0.999089, 0.998512)),
    "self_attn.v_proj": ((-38, -17, -20), (0.999921, 0.990909, 0.99456)),
    "self_attn.q_rope": ((-44, -20, -28), (0.999981, 0.995693, 0.999215)),
    "self_attn.k_rope": ((-46, -27, -24), (0.999986, 0.999086, 0.998495)),
    "self_attn.scores": ((-46, -8, -19), (0.99999, 0.928752, 0.994946)),
    "self_attn.probs": ((-2, -10, -20), (0.71479, 0.95025, 0.994764)),
    "self_attn.context": ((-3, -16, -18), (0.768198, 0.989013, 0.993503)),
    "self_attn.head_out": ((-8, -13, -19), (0.922262, 0.973544, 0.995332)),
    "self_attn.o_proj": ((-11, -16, -18), (0.961217, 0.988356, 0.991379)),
    "resid_mid": ((-15, -18, -24), (0.985239, 0.992261, 0.998272)),
    "post_attention_layernorm": ((-13, -14, -21), (0.97752, 0.981679, 0.995838)),
    "mlp.gate_proj": ((-12, -19, -26), (0.969773, 0.993907, 0.998788)),
    "mlp.up_proj": ((-15, -15, -21), (0.982465, 0.982974, 0.995804)),
    "mlp.act": ((-11, -17, -24), (0.958647, 0.990695, 0.997952)),
    "mlp.down_proj": ((-17, -15, -18), (0.990872, 0.982874, 0.992012)),
    "layer": ((-17, -20, -24), (0.990997, 0.994733, 0.997922)),
    "norm": ((-24, -24, -24), (0.998166,) * 3),
    "logits": ((-26, -26, -26), (0.998872,) * 3),
}
_FLOAT16 = {
    "embed_tokens": ((-72, -72, -72), (0.999999,) * 3),
    "rotary_emb.cos": ((-71, -71, -71), (0.999999,) * 3),
    "rotary_emb.sin": ((-67, -67, -67), (0.999999,) * 3),
    "input_layernorm": ((-63, -32, -39), (0.999999, 0.999649, 0.999938)),
    "self_attn.q_proj": ((-66, -36, -48), (0.999999, 0.999905, 0.999992)),
    "self_attn.k_proj": ((-64, -46, -44), (0.999999, 0.999987, 0.999978)),
    "self_attn.v_proj": ((-58, -36, -39), (0.999999, 0.999871, 0.999936)),
    "self_attn.q_rope": ((-61, -36, -48), (0.999999, 0.999905, 0.999992)),
    "self_attn.k_rope": ((-64, -46, -43), (0.999999, 0.999987, 0.999977)),
    "self_attn.scores": ((-63, -32, -35), (0.999999, 0.999759, 0.999973)),
    "self_attn.probs": ((-18, -24, -38), (0.991122, 0.997936, 0.999929)),
    "self_attn.context": ((-23, -34, -36), (0.997641, 0.999785, 0.999875)),
    "self_attn.head_out": ((-27, -32, -35), (0.999044, 0.999706, 0.999858)),
    "self_attn.o_proj": ((-28, -32, -36), (0.999275, 0.999706, 0.999905)),
    "resid_mid": ((-30, -36, -39), (0.999557, 0.999874, 0.999935)),
    "post_attention_layernorm": ((-28, -32, -39), (0.999277, 0.999691, 0.999932)),
    "mlp.gate_proj": ((-29, -37, -43), (0.999409, 0.999892, 0.999978)),
    "mlp.up_proj": ((-30, -33, -38), (0.999502, 0.999733, 0.999932)),
    "mlp.act": ((-31, -35, -41), (0.999604, 0.999851, 0.99996)),
    "mlp.down_proj": ((-35, -31, -36), (0.999858, 0.999612, 0.99987)),
    "layer": ((-35, -38, -38), (0.99986, 0.999913, 0.999927)),
    "norm": ((-41, -41, -41), (0.999965,) * 3),
    "logits": ((-44, -44, -44), (0.999982,) * 3),
}
# llama.cpp on Q8_0 / Q4_K_M weights against qwen2np on the same dequantized weights; the RoPE tables,
# head_out and act, which llama.cpp does not expose, by analogy (float32 tables; o_proj; gate_proj)
_Q8_0 = {
    "embed_tokens": ((None, None, None), (1.0,) * 3),
    "rotary_emb.cos": ((-100, -100, -100), (0.999999,) * 3),
    "rotary_emb.sin": ((-100, -100, -100), (0.999999,) * 3),
    "input_layernorm": ((-100, -30, -26), (0.999999, 0.999471, 0.998809)),
    "self_attn.q_proj": ((-68, -32, -33), (0.999999, 0.999718, 0.999751)),
    "self_attn.k_proj": ((-77, -37, -29), (0.999999, 0.999908, 0.999653)),
    "self_attn.v_proj": ((-35, -27, -23), (0.999856, 0.999104, 0.997284)),
    "self_attn.q_rope": ((-68, -32, -33), (0.999999, 0.999718, 0.999751)),
    "self_attn.k_rope": ((-77, -37, -29), (0.999999, 0.999908, 0.999653)),
    "self_attn.scores": ((-61, -21, -21), (0.999999, 0.99617, 0.996681)),
    "self_attn.probs": ((-43, -29, -20), (0.999975, 0.999467, 0.995367)),
    "self_attn.context": ((-36, -25, -17), (0.99987, 0.998279, 0.991945)),
    "self_attn.head_out": ((-34, -24, -14), (0.999778, 0.998203, 0.984483)),
    "self_attn.o_proj": ((-34, -24, -14), (0.999778, 0.998203, 0.984483)),
    "resid_mid": ((-40, -32, -29), (0.999951, 0.999706, 0.999357)),
    "post_attention_layernorm": ((-39, -29, -26), (0.999936, 0.999438, 0.998799)),
    "mlp.gate_proj": ((-35, -33, -30), (0.999838, 0.99975, 0.999498)),
    "mlp.up_proj": ((-34, -29, -27), (0.999807, 0.999333, 0.998951)),
    "mlp.act": ((-35, -33, -30), (0.999838, 0.99975, 0.999498)),
    "mlp.down_proj": ((-35, -26, -23), (0.999838, 0.998671, 0.997752)),
    "layer": ((-35, -32, -28), (0.999838, 0.999721, 0.99927)),
    "norm": ((-27, -27, -27), (0.998983,) * 3),
    "logits": ((-27, -27, -27), (0.99914,) * 3),
}
_Q4_K_M = {
    "embed_tokens": ((None, None, None), (1.0,) * 3),
    "rotary_emb.cos": ((-100, -100, -100), (0.999999,) * 3),
    "rotary_emb.sin": ((-100, -100, -100), (0.999999,) * 3),
    "input_layernorm": ((-100, -25, -24), (0.999999, 0.9984, 0.997768)),
    "self_attn.q_proj": ((-68, -25, -29), (0.999999, 0.998434, 0.999315)),
    "self_attn.k_proj": ((-78, -34, -29), (0.999999, 0.999792, 0.999407)),
    "self_attn.v_proj": ((-35, -23, -21), (0.999834, 0.997432, 0.996021)),
    "self_attn.q_rope": ((-68, -25, -29), (0.999999, 0.998434, 0.999315)),
    "self_attn.k_rope": ((-78, -34, -29), (0.999999, 0.999792, 0.999407)),
    "self_attn.scores": ((-60, -12, -22), (0.999999, 0.969082, 0.997387)),
    "self_attn.probs": ((-41, -26, -21), (0.999962, 0.998659, 0.995767)),
    "self_attn.context": ((-37, -23, -17), (0.999888, 0.997331, 0.991246)),
    "self_attn.head_out": ((-33, -23, -15), (0.999757, 0.997349, 0.984835)),
    "self_attn.o_proj": ((-33, -23, -15), (0.999757, 0.997349, 0.984835)),
    "resid_mid": ((-40, -27, -25), (0.999952, 0.999127, 0.99843)),
    "post_attention_layernorm": ((-39, -25, -23), (0.999933, 0.998288, 0.997705)),
    "mlp.gate_proj": ((-35, -29, -26), (0.999844, 0.999318, 0.998825)),
    "mlp.up_proj": ((-34, -24, -24), (0.999805, 0.998197, 0.997945)),
    "mlp.act": ((-35, -29, -26), (0.999844, 0.999318, 0.998825)),
    "mlp.down_proj": ((-27, -22, -20), (0.999054, 0.996744, 0.994987)),
    "layer": ((-27, -27, -25), (0.999048, 0.998999, 0.99827)),
    "norm": ((-23, -23, -23), (0.997585,) * 3),
    "logits": ((-25, -25, -25), (0.998559,) * 3),
}

POLICIES = {p.name: p for p in [
    Policy("float32", "a float32 implementation (rel tolerances of tolerances.py)", isolate=_FLOAT32_ISOLATION),
    Policy("float64", "a float64 implementation (rel tolerances of tolerances.py)",
           isolate={**_EXACT, **{k: Rel(1e-12, 1e-15) for k in _ROPE}, "self_attn.context (fused)": Rel(1e-10),
                    "*": Rel(1e-12)}),
    # isolation: worst 0.78 % of elements off by one ulp (one key of 128 in a decode step), 0.11 % by more
    Policy("bfloat16", "a correct bfloat16 implementation (weights rounded to bfloat16), as transformers computes",
           isolate={**_EXACT, "*": Ulps(0.02, 0.005)}, compare=_budgets(_BFLOAT16),
           logits=LogitsBudget(kl=1e-2, top1=0.90, top_p=0.25)),
    # isolation: worst 1.56 % off, 0.78 % by more than one ulp (one of 128); float16's step is 8x finer
    Policy("float16", "a correct float16 implementation (weights rounded to float16), as transformers computes",
           isolate={**_EXACT, "*": Ulps(0.05, 0.02)}, compare=_budgets(_FLOAT16),
           logits=LogitsBudget(kl=2e-4, top1=0.90, top_p=0.35)),
    Policy("q8_0", "float32 compute on Q8_0 weights (llama.cpp), against the same dequantized weights",
           isolate={**_FLOAT32_ISOLATION, **{k: Nmse(v) for k, v in _Q8_0_PRODUCTS.items()}},
           compare=_budgets(_Q8_0), logits=LogitsBudget(kl=4e-3, top1=0.90, top_p=0.25)),
    Policy("q4_k_m", "float32 compute on Q4_K_M weights (llama.cpp), against the same dequantized weights",
           isolate={**_FLOAT32_ISOLATION, **{k: Nmse(v) for k, v in _Q4_K_M_PRODUCTS.items()}},
           compare=_budgets(_Q4_K_M), logits=LogitsBudget(kl=7e-3, top1=0.85, top_p=0.25)),
]}


def policy_named(name):
    """The Policy called `name` (or one of its aliases: bf16, fp16, q4_k, …); DumpError if none is."""
    if isinstance(name, Policy):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in POLICIES:
        raise DumpError(f"policy {name!r}: expected one of {', '.join(POLICIES)} (or bf16, fp16)")
    return POLICIES[key]


def default_policy(dtype_a, dtype_b=None):
    """The policy for dumps of these dtypes: the lower precision of the two (float64 only when both are)."""
    dtypes = {dtype_a, dtype_b or dtype_a}
    for name in ("float16", "bfloat16", "float32"):
        if name in dtypes:
            return POLICIES[name]
    return POLICIES["float64"]
