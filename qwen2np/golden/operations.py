"""The recipes of recipes.py run on one dump: each operation's inputs read from the tensors the dump recorded.

`Operations.expected(name, k)` is op(inputs) for tensor `name` of forward pass k: it picks the recipe whose
inputs the dump has, reads them (a cached input, `…@*`, as the passes so far joined along T: what the KV
cache holds), and computes in float64 with the port's rounding orders and the weights as the port holds
them. `Operations.used` lists the dump keys the last operation read. isolate.py judges the result.

A dump that kept only some positions of its prefill (`qwen2np dump --positions`) is recomputed at those
positions; an operation that needs every position of a pass (attention over the cache) is not isolated
there, and says why.
"""

import numpy as np

from ..inspection.names import position_axes
from .compare import valid_elements
from .recipes import LAYER_RECIPES, RECIPES, Context, NotIsolated
from .rounding import rounding


class Operations:
    """The recipes run on one dump (in qwen2np's layouts: layouts.normalised) with a config and weights."""

    def __init__(self, dump, config, weights):
        self.dump, self.config, self.weights = dump, config, weights
        self.r = rounding(dump.dtype)
        self.cache = {}      # weights in float64, kept while one name is isolated pass by pass
        # intermediates and weights of a head's base model carry "model." (a bare Qwen2Model's do not)
        self.prefix = "model." if "model.embed_tokens.weight" in weights else ""
        self.used = []       # the inputs the last operation read, as dump keys
        self.substitutes = {}   # key -> array read instead of the dump's (diagnosis.py: a layout undone)
        self._names = [set(dump.names(k)) for k in range(len(dump.passes))]

    def forget(self):
        self.cache.clear()

    def recipe(self, name, k):
        """(layer, recipe) of tensor `name` in pass k: the first alternative whose inputs are recorded."""
        layer, op = self.operation(name)
        choices = (RECIPES if layer is None else LAYER_RECIPES)[op]
        return layer, next(c for c in (choices if isinstance(choices, tuple) else (choices,))
                           if all(self.has(self.input_name(n, layer), k) for n in c.when))

    def context(self, name, k, layer, orders=None, observed=None):
        p = self.dump.passes[k]
        start, length = p["start"], p["length"]
        kept = p.get("positions")
        ids = self.dump.input_ids[:, start:start + length] if kept is None else self.dump.input_ids[:, kept]
        return Context(self.config, layer=layer, scope=f"{self.prefix}layers.{layer}", start=start, length=length,
                       shape=tuple(self.dump[_key(name, k)].shape), input_ids=ids,
                       attention_mask=self.dump.attention_mask, r=self.r, cache=self.cache, kept=kept,
                       orders=orders or {}, observed=observed)

    def expected(self, name, k, orders=None, recipe=None, observed=None):
        """op(inputs) for tensor `name` of pass k, float64, in the dump's shape (NotIsolated when an input is
        not recorded), in the rounding `orders` ({family: order}) given; `recipe` (compute, inputs, weights)
        replaces the operation's own (catalogue.py's mistakes); `observed`: the port's output, by which a
        fused attention settles its rounding ties (attention.settle_ties)."""
        layer, own = self.recipe(name, k)
        ctx = self.context(name, k, layer, orders, observed)
        compute, symbols, weights = (own.compute, own.inputs, own.weights) if recipe is None else recipe
        inputs = [self.read(symbol, layer, k) for symbol in symbols]
        return compute(ctx, *inputs, *(self.weight(w, layer) for w in weights))

    def expected_passes(self, name, passes, orders=None):
        """{k: (op(inputs), the keys read)} for the passes of a position-wise operation (a product, a norm),
        computed as one with their inputs joined along T, so that each weight is converted once (lm_head's
        136 M values, not once per decode step); {} when it is not position-wise, or the passes' recipes
        differ. NotIsolated when an input is not recorded."""
        layer, recipe = self.recipe(name, passes[0])
        if not recipe.rowwise or len(passes) < 2 or any(self.recipe(name, k)[1] is not recipe for k in passes[1:]):
            return {}
        inputs, used = [], {}
        for k in passes:
            self.used = []
            inputs.append([self.read(symbol, layer, k) for symbol in recipe.inputs])
            used[k] = list(dict.fromkeys(self.used))
        joined = [np.concatenate(xs, axis=1) for xs in zip(*inputs)]              # [B, T0 + T1 + …, …]
        out = recipe.compute(self.context(name, passes[0], layer, orders), *joined,
                             *(self.weight(w, layer) for w in recipe.weights))
        parts = np.split(out, np.cumsum([xs[0].shape[1] for xs in inputs])[:-1], axis=1)
        return {k: (part, used[k]) for k, part in zip(passes, parts)}

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
        symbol = symbol.removesuffix("@*")
        if symbol == "residual":   # the stream entering the layer, or the final norm
            before = self.config.num_hidden_layers if layer is None else layer
            return f"{self.prefix}layers.{before - 1}" if before > 0 else f"{self.prefix}embed_tokens"
        if layer is None or symbol in RECIPES:
            return self.model_name(symbol)
        return f"{self.prefix}layers.{layer}.{symbol}"

    def weight_name(self, name, layer):
        if name.startswith("lm_head"):
            return name
        return f"{self.prefix}{name}" if layer is None else f"{self.prefix}layers.{layer}.{name}"

    def weight(self, name, layer):
        """A recipe's weight (None when the model has none of that name: a bias of a port's other model)."""
        return self.weights.get(self.weight_name(name, layer))

    def has(self, name, k):
        return name in self._names[k]

    def read(self, symbol, layer, k):
        """A recipe's input at pass k; `…@*`: passes 0 … k joined along T, what the KV cache holds."""
        name = self.input_name(symbol, layer)
        if not symbol.endswith("@*"):
            return self.get(name, k)
        passes = []
        for i in range(k + 1):
            p = self.dump.passes[i]
            kept = p.get("positions")
            if kept is not None and list(kept) != list(range(p["start"], p["start"] + p["length"])):
                raise NotIsolated(f"needs every position of {_key(name, i)} (the KV cache), and A keeps only "
                                  f"positions {_short(p['positions'])} of that pass")
            passes.append(self.get(name, i))
        t_axis, _ = position_axes(name, passes[0].ndim)
        return np.concatenate(passes, axis=t_axis)

    def get(self, name, k):
        """The dump's tensor `name` of pass k, float64, noted as an input of the operation. A NaN or inf at
        a padding position is read as 0; a mask is read as recorded (its -inf, if any, means "hidden")."""
        if not self.has(name, k):
            raise NotIsolated(f"needs {_key(name, k)}, which A does not record")
        key = _key(name, k)
        self.used.append(key)
        if key in self.substitutes:
            return self.substitutes[key]
        p = self.dump.passes[k]
        x = np.asarray(self.dump[key], dtype=np.float64)
        if not name.endswith(".mask") and not np.isfinite(x).all():
            valid = valid_elements(name, x.shape, self.dump.attention_mask, p["start"], p["length"], p.get("positions"))
            if valid is not None:   # a NaN at padding must not reach a real position
                x = np.where(valid | np.isfinite(x), x, 0.0)
        return x


def _key(name, k):
    return name if k == 0 else f"{name}@{k}"


def _short(positions):
    positions = list(positions)
    return str(positions) if len(positions) <= 6 else f"[{positions[0]}, {positions[1]}, …, {positions[-1]}]"
