"""The legitimate rounding orders of a half-precision port, by family.

A bfloat16 or float16 port rounds its results to its dtype, but not every framework rounds at the same
places: transformers adds a projection's bias before rounding the product, keras-hub after; transformers
rounds RMSNorm's normalised x and then its product by the weight, keras-hub and mlx-lm round once;
mlx-lm rounds each step of x · sigmoid(x) and its sigmoid from a rounded exp(|x|), llama.cpp's fused
SwiGLU rounds once. Each of these is
correct: each is what some framework computes, and each differs from the others by one unit in the last
place on a good share of the elements. So isolation (isolate.py) accepts any order listed here, bit for
bit or within its measured limit, and reports which one the port uses.

The first order of each family is transformers' (the recipes' default, `""`); recipes.py and
attention.py follow `ctx.order(family)`. Only half-precision dumps try the others: in float32 they are
all the same to within float32's own rounding.

NumPy-free and model-free: names only (tests/test_layering.py).

>>> [order for order, _ in ORDERS["bias"]]
['', 'after']
>>> describe({"bias": "after"})
"the bias added after the product's rounding (as keras-hub)"
>>> len(combinations(("rope", "rope_tables")))
4
"""

import itertools

# family -> [(order, what the port does, who does it)], transformers' first
ORDERS = {
    "bias": [("", "the bias added before the product is rounded (as transformers)"),
             ("after", "the bias added after the product's rounding (as keras-hub)")],
    "norm": [("", "RMSNorm's normalised x rounded, then its product by the weight (as transformers)"),
             ("once", "RMSNorm rounded once, after the weight (as keras-hub and mlx-lm)")],
    "rope": [("", "RoPE's two products and their sum each rounded (as transformers)"),
             ("one", "RoPE rounded once (a fused kernel, as mlx-lm)")],
    "rope_tables": [("", "RoPE tables rounded to the dump's dtype (as transformers)"),
                    ("float32", "RoPE tables kept in float32 (as a fused RoPE kernel)")],
    "scores": [("", "the scores' product rounded, then scaled (as transformers)"),
               ("once", "the scaled scores rounded once"),
               ("queries", "the queries scaled before the product (as keras-hub)")],
    "softmax": [("", "the softmax in float32 (as transformers)"),
                ("half", "the softmax in half precision")],
    "silu": [("", "SiLU rounded once (as transformers)"),
             ("sigmoid", "SiLU as x · sigmoid(x), the sigmoid rounded first (as keras-hub)"),
             ("exp", "SiLU as x · sigmoid(x), the sigmoid from a rounded exp(|x|) (as mlx's CPU kernel)")],
    "swiglu": [("", "silu(gate) · up rounded once (a fused SwiGLU, as llama.cpp)"),
               ("silu", "silu(gate) rounded before the product by up (as keras-hub)"),
               ("sigmoid", "x · sigmoid(x) rounded step by step, then the product by up"),
               ("exp", "x · sigmoid(x) rounded step by step, the sigmoid from a rounded exp(|x|), "
                       "then the product by up (as mlx-lm on CPU)")],
    "swiglu_product": [("", "silu(gate) · up rounded before down_proj (as transformers)"),
                       ("exact", "silu(gate) · up not rounded before down_proj (a fused product)")],
    "attention": [("", "the attention rounded once, at its output (a fused kernel: torch sdpa, mlx.fast)"),
                  ("eager", "the scores and probabilities rounded on the way (as transformers' eager attention)"),
                  ("queries", "the queries scaled first, scores and probabilities rounded (as mlx-lm's fallback)"),
                  ("probs", "the scores and softmax in float32, the probabilities rounded before the product "
                            "by V (as JAX's dot_product_attention, keras-hub)")],
}
FAMILIES = tuple(ORDERS)


def combinations(families, first=None):
    """Every assignment of an order to each of `families` ({family: order}), the port's known orders
    (`first`, {family: order}) first, then transformers', then the rest."""
    choices = [[order for order, _ in ORDERS[f]] for f in families]
    combos = [dict(zip(families, c)) for c in itertools.product(*choices)]
    known = {f: o for f, o in (first or {}).items() if f in families}

    def rank(combo):
        return (sum(combo[f] != o for f, o in known.items()), sum(o != "" for o in combo.values()))

    return sorted(combos, key=rank)


def describe(orders):
    """What the port does in the orders `orders` ({family: order}; transformers' orders left out)."""
    return "; ".join(dict(ORDERS[f])[o] for f, o in orders.items() if o)
