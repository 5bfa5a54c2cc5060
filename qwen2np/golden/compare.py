"""Compare two dumps tensor by tensor, in forward order, and name the first tensor out of tolerance.

Per tensor, the figures of metrics.py (docs/tolerances.md defines each), B the reference: max abs,
mean abs, rel = max |A - B| / max(max |A|, max |B|) (the number held to a float tolerance), NMSE in dB,
cosine; for logits also top-1 and top-5 agreement, mean KL(softmax B ‖ softmax A) and the share of
positions whose top-p (0.9) nucleus is the same set of tokens. report.py prints the comparison.

Only positions where the dumps' attention mask is 1 are compared (left padding is backend-dependent);
the attention mask itself (`…self_attn.mask`) is compared as its pattern of allowed keys, since its
masked value is finfo(dtype).min, which differs between float32 and float64.

>>> import numpy as np
>>> from qwen2np.golden.dump import new_dump
>>> def dump(x):
...     return new_dump(producer="example", dtype="float32", input_ids=[[1, 2]],
...                     passes=[{"start": 0, "length": 2, "tensors": [("model.norm", x)]}])
>>> a = np.ones((1, 2, 4), np.float32)
>>> report = compare_dumps(dump(a), dump(a + np.float32(1e-3)))
>>> report.ok, report.first_failure.name, f"{report.first_failure.rel:.1e}"
(False, 'model.norm', '1.0e-03')

The verdict follows a policy (policies.py): float32 and float64 hold `rel` to tolerances.py's table;
bfloat16, float16, q8_0 and q4_k_m hold NMSE and cosine per kind and depth, and the logits' KL and top-1
and top-p agreement, to what a correct implementation of that precision was measured to reach.
"""

import fnmatch
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DumpError
from ..inspection.names import position_axes
from .manifest import tensor_key
from .fingerprint import differing_weights
from .layouts import conform, masked_scores
from .metrics import blocks, differences, logits_divergence, top_k_agreement
from .policies import TOP_P, default_policy, policy_named
from .report import format_report, json_safe   # format_report also here, beside compare_dumps (the notebooks)
from .tolerances import kind_of, tolerance_for


@dataclass
class TensorComparison:
    name: str
    key: str
    pass_index: int
    shape: tuple
    compared: int          # elements compared (after leaving out padding)
    max_abs: float
    mean_abs: float
    rel: float
    nmse_db: float | None  # None: no error at all (-inf dB)
    tolerance: float
    ok: bool
    top1: float | None = None
    top5: float | None = None
    cosine: float | None = None   # None: one side is all zeros
    kl: float | None = None       # logits: mean KL(softmax B ‖ softmax A), nats
    top_p: float | None = None    # logits: share of positions with the same top-p nucleus
    limit: str = ""               # what the policy held it to, when not a rel tolerance


@dataclass
class Comparison:
    a: object
    b: object
    tensors: list
    only_in_a: list
    only_in_b: list
    notes: list
    policy: object = None

    @property
    def ok(self):
        return all(t.ok for t in self.tensors)

    @property
    def first_failure(self):
        return next((t for t in self.tensors if not t.ok), None)

    def to_json(self):
        """The comparison as JSON-ready values (an infinite error is the string "inf")."""
        return json_safe({
            "ok": self.ok,
            "first_failure": None if self.first_failure is None else self.first_failure.key,
            "a": self.a.describe(), "b": self.b.describe(),
            "policy": self.policy.name if self.policy is not None else None,
            "tensors": [{**asdict(t), "shape": list(t.shape)} for t in self.tensors],
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "notes": self.notes,
        })


def compare_dumps(a, b, tolerances=None, policy=None):
    """Compare dump `a` with the reference dump `b`; `tolerances` is a list of (glob, value) overrides of
    the `rel` tolerance; `policy` a name of policies.py (None: the dumps' dtypes decide).

    Refuses (DumpError) dumps of different token ids, attention masks, prompts, forward passes or shapes.
    """
    check_comparable(a, b)
    mask = a.attention_mask
    policy = default_policy(a.dtype, b.dtype) if policy is None else policy_named(policy)
    rel_table = policy.rel_tolerances()
    layers = ((a.manifest.get("model") or {}).get("config") or {}).get("num_hidden_layers") or \
        ((b.manifest.get("model") or {}).get("config") or {}).get("num_hidden_layers")
    tensors, only_in_a, only_in_b, layouts = [], [], [], {}
    for index, p in enumerate(a.passes):
        names_b = set(b.names(index))
        for entry in p["tensors"]:
            name = entry["name"]
            if name not in names_b:
                only_in_a.append(entry["key"])
                continue
            # read a block at a time (metrics.py): the memory of a comparison is a few blocks, not the tensors
            x, y = a.stored(entry["key"]), b.stored(tensor_key(name, index))
            layout = conform(name, x.shape, y.shape) if x.shape != y.shape else None
            if layout is not None:   # A's own layout of the same values (token-first, heads split): read as B's
                x = layout.read(np.asarray(x))   # (read whole: a transpose is not a block at a time)
                layouts.setdefault(kind_of(name), layout.note)
            if x.shape != y.shape:
                raise DumpError(f"{entry['key']}: shape {list(x.shape)} in {a.folder or 'A'} but "
                                f"{list(y.shape)} in {b.folder or 'B'}; dumps of different shapes cannot be compared")
            valid = valid_elements(name, x.shape, mask, p["start"], p["length"], p.get("positions"))
            if name.endswith("self_attn.scores"):   # scores taken after the mask: compared where keys are allowed
                valid = _after_the_mask(a, b, name, index, x, valid, layouts)
            overridden = any(fnmatch.fnmatchcase(name, g) for g, _ in tolerances or [])
            if rel_table is not None or overridden:
                tolerance = tolerance_for(name, policy.name if rel_table is not None else "float32", tolerances,
                                          position=max(p.get("positions") or [p["start"] + p["length"] - 1]))
                tensors.append(compare_tensor(name, entry["key"], index, x, y, valid, tolerance))
            else:   # a reduced-precision policy: NMSE and cosine for the kind and depth, and the logits' figures
                t = compare_tensor(name, entry["key"], index, x, y, valid, math.inf)
                policy.judge_comparison(t, depth(name, layers))
                tensors.append(t)
        only_in_b += [t["key"] for t in b.passes[index]["tensors"] if t["name"] not in set(a.names(index))]
    if not tensors:
        raise DumpError(f"the dumps have no tensor name in common ({a.describe()}; {b.describe()})")
    layout_notes = [f"A's {kind} {note}: compared " + ("where keys are allowed" if kind.endswith("scores") else
                                                       "as B lays it out") for kind, note in layouts.items()]
    return Comparison(a, b, tensors, only_in_a, only_in_b, notes(a, b, policy) + layout_notes, policy)


def _after_the_mask(a, b, name, index, x, valid, layouts):
    """Scores of A with −inf or finfo.min exactly where B's mask hides a key (TransformerLens' hook): the
    elements to compare are the keys allowed."""
    mask_name = name.rsplit(".", 1)[0] + ".mask"
    if mask_name not in b.names(index):
        return valid
    low = min((float(np.asarray(x[i]).min()) for i in blocks(x.shape)), default=0.0)   # a block at a time
    if low > -3e4:   # nothing masked (NaN compares False: looked at below)
        return valid
    shown = masked_scores(x, np.asarray(b.tensor(mask_name, index)) != 0, a.dtype)
    if shown is None:
        return valid
    layouts.setdefault("self_attn.scores", "recorded after the mask (−inf or finfo.min where a key is hidden)")
    return shown if valid is None else valid & shown


def depth(name, num_layers):
    """Where a tensor sits in the stack, 0 (embedding, layer 0) to 1 (last layer, norm, logits).

    >>> depth("model.layers.12.mlp.act", 25), depth("logits", 24), depth("model.embed_tokens", 24)
    (0.5, 1.0, 0.0)
    """
    m = re.match(r"(?:model\.)?layers\.(\d+)", name)
    if m:
        return int(m.group(1)) / max(1, (num_layers or int(m.group(1)) + 1) - 1)
    return 0.0 if kind_of(name) in ("embed_tokens", "rotary_emb.cos", "rotary_emb.sin") else 1.0


def check_comparable(a, b):
    """Same token ids, attention mask, prompt and forward passes, or a DumpError that says which differs."""
    where = f"{a.folder or 'A'} and {b.folder or 'B'}"
    ids_a, ids_b = a.input_ids, b.input_ids
    if ids_a.shape != ids_b.shape or not np.array_equal(ids_a, ids_b):
        diff = "shapes " + f"{list(ids_a.shape)} vs {list(ids_b.shape)}" if ids_a.shape != ids_b.shape else \
            f"first difference at [row, position] {np.argwhere(ids_a != ids_b)[0].tolist()}"
        raise DumpError(f"{where} ran different token ids ({diff}); compare dumps of the same input")
    mask_a = a.attention_mask if a.attention_mask is not None else np.ones_like(ids_a)
    mask_b = b.attention_mask if b.attention_mask is not None else np.ones_like(ids_b)
    if not np.array_equal(mask_a, mask_b):
        raise DumpError(f"{where} ran different attention masks; compare dumps of the same input")
    pa, pb = a.manifest.get("prompt"), b.manifest.get("prompt")
    if pa is not None and pb is not None and (pa != pb or a.manifest.get("chat") != b.manifest.get("chat")):
        raise DumpError(f"{where} record different prompts ({pa!r:.60} vs {pb!r:.60})")
    spans_a = [(p["start"], p["length"], p.get("positions")) for p in a.passes]
    spans_b = [(p["start"], p["length"], p.get("positions")) for p in b.passes]
    if spans_a != spans_b:
        raise DumpError(f"{where} split the input into different forward passes ((start, length, positions kept): {spans_a} vs "
                        f"{spans_b}); dump both with the same --decode-steps (and --positions)")


def notes(a, b, policy=None):
    """What a reader should know: different configs or weights, different dtypes."""
    out = []
    ma, mb = a.manifest.get("model") or {}, b.manifest.get("model") or {}
    if ma.get("config_fingerprint") and mb.get("config_fingerprint") and \
            ma["config_fingerprint"] != mb["config_fingerprint"]:
        fields = [k for k in (ma.get("config") or {}) if (ma.get("config") or {}).get(k) != (mb.get("config") or {}).get(k)]
        out.append(f"the model configs differ (fingerprints differ; fields: {', '.join(fields) or '?'})")
    wa, wb = ma.get("weights_fingerprint"), mb.get("weights_fingerprint")
    if wa and wb and wa.get("method") == wb.get("method") and wa.get("digest") != wb.get("digest"):
        names = differing_weights(wa, wb)
        out.append(f"the weights differ: {len(names)} of them ({', '.join(names[:5])}{', …' * (len(names) > 5)})")
    policy = policy or default_policy(a.dtype, b.dtype)
    if a.dtype != b.dtype:
        out.append(f"dtypes differ ({a.dtype} vs {b.dtype}): the {policy.name} policy applies")
    file_type = ma.get("file_type")
    if file_type and file_type not in ("F32", "F16", "BF16") and policy.rel_tolerances() is not None:
        out.append(f"A ran on {file_type} weights: --policy {_quantized_policy(file_type)} judges it as a correct "
                   f"implementation on those weights (against a reference on the same dequantized weights)")
    return out


def _quantized_policy(file_type):
    return "q8_0" if file_type.upper().startswith("Q8") else "q4_k_m"


def valid_elements(name, shape, mask, start, length, positions=None):
    """Boolean [shape] of the elements at real (not padding) positions, or None when all are.
    `positions` are the input positions a dump kept along T (all of the pass when None)."""
    if mask is None or mask.all():
        return None
    t_axis, s_axis = position_axes(name, len(shape))
    if t_axis is None or shape[0] != mask.shape[0] or shape[t_axis] > length:
        return None  # no position axis, or rows shared by the batch (RoPE tables): nothing depends on padding
    seen = mask[:, :start + length].astype(bool)                         # [B, past + T]
    if positions is not None and shape[t_axis] == len(positions):        # a dump that kept some positions
        keep = _along(seen[:, positions], t_axis, len(shape))
    else:
        keep = _along(seen[:, start:][:, seen.shape[1] - start - shape[t_axis]:], t_axis, len(shape))
    if s_axis is not None:  # key positions: the last S positions seen so far (a sliding layer keeps fewer)
        keep = keep & _along(seen[:, -shape[s_axis]:], s_axis, len(shape))
    return np.broadcast_to(keep, shape)


def _along(rows, axis, ndim):
    """[B, N] -> broadcastable [B, 1, …, N (at `axis`), 1, …]."""
    shape = [rows.shape[0]] + [1] * (ndim - 1)
    shape[axis] = rows.shape[1]
    return rows.reshape(shape)


def compare_tensor(name, key, pass_index, x, y, valid, tolerance, logits_figures=True):
    """The metrics of one tensor (x from A, y from the reference B) over the `valid` elements
    (`logits_figures`: also top-k agreement, KL and top-p for the logits).

    x and y are arrays, or a dump's DumpTensor (Dump.stored): metrics.py reads them a block at a time,
    so that the memory this takes is a few blocks whatever the size of the tensor.
    """
    is_mask = name.rsplit(".", 1)[-1] == "mask"
    top1 = top5 = kl = top_p = None
    if logits_figures and name.rsplit(".", 1)[-1] == "logits" and x.ndim >= 2:
        rows = None if valid is None else valid[..., 0]
        top1, top5 = top_k_agreement(x, y, rows)
        kl, top_p = logits_divergence(x, y, rows, top_p=TOP_P)
    d = differences(x, y, valid, convert=_allowed_keys if is_mask else None)
    return TensorComparison(name=name, key=key, pass_index=pass_index, shape=tuple(x.shape), compared=d.compared,
                            max_abs=d.max_abs, mean_abs=d.mean_abs, rel=d.rel, nmse_db=d.nmse_db, tolerance=tolerance,
                            ok=not d.one_sided and bool(d.rel <= tolerance), top1=top1, top5=top5, cosine=d.cosine,
                            kl=kl, top_p=top_p)


def _allowed_keys(mask):
    """A block of an attention mask as its pattern of allowed keys: compared instead of the value standing
    for "masked" (finfo(dtype).min, which differs between float32 and float64)."""
    return mask == 0
