"""What the gradient tests share: tiny configs (GQA, MQA, tied, sliding-window), and central finite
differences of any scalar function of a parameter array."""

import numpy as np

from qwen2np import Qwen2Config

# each a different shape of attention and head; `initializer_range` wide so that every path carries weight
CONFIGS = {
    "gqa-sliding": dict(vocab_size=20, hidden_size=12, intermediate_size=10, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=2, use_sliding_window=True,
                        sliding_window=3, max_window_layers=1, pad_token_id=0),
    "mqa-tied": dict(vocab_size=18, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0),
    "mha-head-dim": dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5, pad_token_id=0),
    "all-sliding": dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, use_sliding_window=True, sliding_window=2, max_window_layers=0,
                        pad_token_id=0),
}
# every element of every tensor is checked on these (small enough for that)
MICRO = {
    "micro-gqa-sliding": dict(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=2,
                              max_window_layers=1, pad_token_id=0),
    "micro-tied": dict(vocab_size=6, hidden_size=4, intermediate_size=3, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0),
}
WIDE = 0.5    # initializer_range of the test models


def config_of(kwargs, **overrides):
    return Qwen2Config(**{"initializer_range": WIDE, **kwargs, **overrides})


def directional_fd(f, p, u, h=1e-4):
    """d/dt f(p + t·u) at t = 0, by fourth-order central differences (error O(h⁴)); `p` is changed in
    place and restored exactly."""
    saved = p.copy()
    values = []
    for t in (2 * h, h, -h, -2 * h):
        p[...] = saved + t * u
        values.append(f())
    p[...] = saved
    f2, f1, m1, m2 = values
    return (-f2 + 8 * f1 - 8 * m1 + m2) / (12 * h)


def elementwise_fd(f, p, indices, h=1e-4):
    """The partial derivatives of f with respect to p's elements at `indices` (flat indices)."""
    out = []
    for i in indices:
        u = np.zeros(p.size)
        u[i] = 1.0
        out.append(directional_fd(f, p, u.reshape(p.shape), h))
    return np.array(out)


def relative_error(fd, g, floor=0.0):
    """max |fd − g| / max |g| over the elements checked (the `rel` of docs/tolerances.md); `floor` bounds
    the scale below, for a gradient that is almost 0 everywhere (then the differences' own rounding,
    ~1e-12, is all there is to see)."""
    fd, g = np.asarray(fd, np.float64), np.asarray(g, np.float64)
    scale = max(np.abs(g).max(), floor)
    return float(np.abs(fd - g).max() / scale) if scale else float(np.abs(fd).max())


def check_tensor(f, p, g, rng, elements=6, floor=1e-6):
    """The worst relative error of gradient `g` of f with respect to `p`: along g itself, along a random
    direction (both relative to |g|, so that a direction where g is small by chance does not divide by
    almost 0), and element by element at the largest entry of g and a few random ones.

    subtle: |g| is bounded below by `floor` (the caller's: 1e-5 of the model's largest gradient), for
    gradients that are 0 in exact arithmetic and hold only rounding (q and k when every key a query sees
    is the same token): the differences' own error, ~1e-12, must not be divided by 1e-18."""
    norm = max(float(np.linalg.norm(g)), floor)
    errors = []
    for u in (g if g.any() else rng.standard_normal(p.shape), rng.standard_normal(p.shape)):
        u = u / np.linalg.norm(u)
        errors.append(abs(directional_fd(f, p, u) - float((g * u).sum())) / norm)
    if elements:
        picks = np.unique(np.concatenate([[int(np.abs(g).argmax())], rng.integers(0, p.size, elements - 1)]))
        fd = elementwise_fd(f, p, picks)
        errors.append(float(np.abs(fd - g.reshape(-1)[picks]).max() / max(np.abs(g).max(), floor)))
    return max(errors)


def gradient_floor(grads):
    """1e-5 of the largest gradient norm of any tensor: check_tensor's floor.

    subtle: not 1e-6: hypothesis drew a model (hidden size 2, one head, T = 2) whose q_proj gradient is 0
    exactly and whose differences read 1.5e-12 of rounding, 1.5e-6 of the largest gradient (1.0)."""
    return 1e-5 * max(float(np.linalg.norm(g)) for g in grads.values())
