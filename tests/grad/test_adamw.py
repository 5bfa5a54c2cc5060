"""AdamW (qwen2np/grad/optim.py) against torch.optim.AdamW over several steps, and a training loop that
learns."""

import numpy as np
import pytest

from grad_support import CONFIGS, config_of
from qwen2np import AdamW, Qwen2ForCausalLM, value_and_grad
from qwen2np.errors import ModelInputError, ModelInputTypeError


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# float32: torch's vectorized CPU kernels fuse lerp_'s and addcmul_'s multiply-adds (FMA) and take sqrt from
# a 0.5001-ulp approximation, NumPy rounds each operation: the moments agree within 2e-7 of their scale, the
# parameters' total change over 20 steps within 4.4e-5 (their own float32 rounding, 6e-8 of a weight of
# size 1, against a change of ~1e-2). float64: 4e-16 and 6e-14.
BOUNDS = {"float32": (1e-6, 2e-4), "float64": (1e-14, 1e-12)}


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [
    {},
    {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.0, "amsgrad": True},
    {"lr": 0.02, "maximize": True},
    {"lr": 0.3, "betas": (0.6, 0.5)},            # beta1 < 0.5: torch's lerp takes its other branch
])
def test_matches_torch_adamw(oracle, dtype, options):
    import torch

    rng = np.random.default_rng(0)
    shapes = {"w": (64, 33), "b": (33,)}
    ours = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    start = {n: a.copy() for n, a in ours.items()}
    theirs = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in ours.items()}
    opt, ref = AdamW(ours, **options), torch.optim.AdamW(list(theirs.values()), **options)
    moments, updates = BOUNDS[dtype]
    for step in range(20):
        grads = {n: (rng.standard_normal(s) * 10 ** rng.uniform(-4, 1)).astype(dtype) for n, s in shapes.items()}
        for n, p in theirs.items():
            p.grad = torch.from_numpy(grads[n].copy())
        ref.step()
        opt.step(grads)
        for n in shapes:
            state = ref.state[theirs[n]]
            assert opt.state[n]["step"] == int(state["step"]) == step + 1
            assert rel(opt.state[n]["exp_avg"], state["exp_avg"].numpy()) <= moments
            assert rel(opt.state[n]["exp_avg_sq"], state["exp_avg_sq"].numpy()) <= moments
            assert rel(ours[n] - start[n], theirs[n].detach().numpy() - start[n]) <= updates


def test_a_few_steps_lower_the_loss_of_a_tiny_model():
    model = Qwen2ForCausalLM(config_of(CONFIGS["gqa-sliding"]), seed=1)
    ids = np.tile(np.arange(1, 9), (2, 1))
    opt = AdamW(model, lr=0.01)
    losses = []
    for _ in range(10):
        loss, grads = value_and_grad(model, ids, labels=ids)
        opt.step(grads)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert float(model(ids, labels=ids).loss) < losses[-1]        # the model holds the updated weights


def test_weights_read_from_a_file_are_copied_once(tmp_path):
    Qwen2ForCausalLM(config_of(CONFIGS["gqa-sliding"]), seed=1).save_pretrained(tmp_path)
    model = Qwen2ForCausalLM.from_pretrained(tmp_path)            # float32 on disk: kept as the memory map
    name = "model.layers.0.mlp.up_proj.weight"
    assert not model.params[name].flags.writeable
    opt = AdamW(model, lr=0.1)
    assert model.params[name].flags.writeable and opt.params is model.params
    before = model.params[name].copy()
    ids = np.arange(1, 7)[None]
    opt.step(value_and_grad(model, ids, labels=ids)[1])
    assert not np.array_equal(model.params[name], before)


def test_what_it_refuses():
    with pytest.raises(ModelInputError, match="expected lr >= 0"):
        AdamW({"w": np.zeros(2)}, lr=-1)
    with pytest.raises(ModelInputTypeError, match="w is not a writable NumPy array"):
        AdamW({"w": np.broadcast_to(0.0, (2,))})      # a read-only view
    opt = AdamW({"w": np.zeros(2)})
    with pytest.raises(ModelInputError, match="v is not a parameter"):
        opt.step({"v": np.zeros(2)})
    with pytest.raises(ModelInputError, match="gradient of shape"):
        opt.step({"w": np.zeros(3)})
