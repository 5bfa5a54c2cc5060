"""AdamW, as torch.optim.AdamW (torch 2.13, its single-tensor path, the one CPU tensors take) computes it.

For each parameter θ with gradient g, at step t (from 1), learning rate lr, betas (β1, β2), eps ε and
weight decay λ:

    θ ← θ · (1 − lr·λ)                         decoupled weight decay (the "W" of AdamW)
    m ← m + (1 − β1)(g − m)                    first moment (torch: exp_avg.lerp_(g, 1 − β1))
    v ← β2·v + (1 − β2)·g²                     second moment
    θ ← θ − lr / (1 − β1ᵗ) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + ε)

subtle: ε is added *after* dividing sqrt(v) by sqrt(1 − β2ᵗ), as torch does; the paper's
m̂ / (sqrt(v̂) + ε) is the same thing. The scalars are computed in Python floats (double), as torch
computes them, then applied in the parameter's dtype, operation for operation. torch's vectorized CPU
kernels fuse lerp_'s and addcmul_'s multiply-adds and take float32 sqrt from a 0.5001-ulp approximation;
NumPy rounds each operation. So the two agree to rounding, not bit for bit: the moments within 2e-7 of
their scale in float32 (4e-16 in float64), over 20 steps (tests/grad/test_adamw.py).

>>> import numpy as np
>>> w = {"w": np.array([1.0, -2.0])}
>>> opt = AdamW(w, lr=0.1, weight_decay=0.0)
>>> opt.step({"w": np.array([0.5, -0.5])})          # the first step moves each weight by about lr
>>> np.round(w["w"], 6).tolist()
[0.9, -1.9]
"""

import numpy as np

from ..errors import ModelInputError, ModelInputTypeError
from ..weights.store import StoredWeight


class AdamW:
    """AdamW over `params`: a dict {name: array} updated in place, or a qwen2np model (its parameters;
    weights the model reads from a file, memory-mapped or converted per use, are first copied into
    writable arrays the model then holds). `step(grads)` takes {name: gradient} (value_and_grad's) and
    updates the parameters named there; moments are kept per name, as torch keeps its state per tensor.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas) or not 0.0 <= weight_decay:
            raise ModelInputError(f"AdamW: expected lr >= 0, eps >= 0, 0 <= betas < 1 and weight_decay >= 0, found "
                                  f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.params = _writable_parameters(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), float(weight_decay)
        self.amsgrad, self.maximize = amsgrad, maximize
        self.state = {}     # name -> {"step": int, "exp_avg": array, "exp_avg_sq": array[, "max_exp_avg_sq"]}

    def step(self, grads):
        """One update of every parameter named in `grads`, in place."""
        unknown = [n for n in grads if n not in self.params]
        if unknown:
            raise ModelInputError(f"AdamW.step: {unknown[0]} is not a parameter this optimizer updates")
        for name, grad in grads.items():
            param = self.params[name]
            if grad.shape != param.shape:
                raise ModelInputError(f"AdamW.step: {name}: gradient of shape {grad.shape}, parameter {param.shape}")
            self._update(name, param, grad.astype(param.dtype, copy=False))

    def _update(self, name, param, grad):
        lr, (beta1, beta2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        t = param.dtype.type
        if self.maximize:
            grad = -grad
        state = self.state.get(name)
        if state is None:
            state = self.state[name] = {"step": 0, "exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}
            if self.amsgrad:
                state["max_exp_avg_sq"] = np.zeros_like(param)
        state["step"] += 1
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            param *= t(1 - lr * wd)                       # decoupled weight decay
        _lerp(m, grad, 1 - beta1)                        # m ← m + (1 − β1)(g − m)
        v *= t(beta2)
        v += t(1 - beta2) * grad * grad                  # v ← β2 v + (1 − β2) g² (torch's addcmul_: (c·g)·g)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        step_size = lr / bias_correction1
        if self.amsgrad:
            np.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            denom = np.sqrt(state["max_exp_avg_sq"]) / t(bias_correction2_sqrt)
        else:
            denom = np.sqrt(v) / t(bias_correction2_sqrt)
        denom += t(eps)
        param += t(-step_size) * m / denom               # torch's addcdiv_: (c·m)/denom


def _lerp(start, end, weight):
    """start ← lerp(start, end, weight) in place, with torch's two-sided formula (exact at weight 0 and 1)."""
    t = start.dtype.type
    if weight < 0.5:
        start += t(weight) * (end - start)
    else:
        start[...] = end - (end - start) * t(1 - weight)


def _writable_parameters(params):
    """{name: writable array}: `params` itself when a dict, or a model's parameters (copied where the model
    reads them from a file, and given back to the model)."""
    if isinstance(params, dict):
        for name, a in params.items():
            if not isinstance(a, np.ndarray) or not a.flags.writeable:
                raise ModelInputTypeError(f"AdamW: {name} is not a writable NumPy array (found "
                                          f"{type(a).__name__}); pass a model, or writable arrays")
        return params
    model = params
    copies = {n: np.array(a) for n, a in model.params.items()
              if isinstance(a, StoredWeight) or not isinstance(a, np.ndarray) or not a.flags.writeable}
    if copies:
        model.load_state_dict(copies, strict=False)   # the model now holds the writable copies
    return model.params
