"""Notebook 2's exercises, the toy ones (softmax, masks, one head, several heads) and those on a model
(RMSNorm, RoPE, GQA, a whole decoder layer): the folded solutions pass, and the likely wrong answers are
caught and named. The model ones run on a small random model whose biases, norm weights, eps and
rope_theta are set so that each mistake shows (the real checkpoint's are shown in the notebook)."""

import numpy as np
import pytest

from notebook_solutions import solutions
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.model.layers import softmax
from qwen2np.teaching import exercises as ex

SOLUTIONS = solutions("02_forward_pass.ipynb")
IDS = np.array([[3, 17, 5, 9, 30, 2, 11]])
LOWEST = np.finfo(np.float32).min


@pytest.fixture(scope="module")
def model():
    """A small model with non-zero biases, norm weights other than 1, a large eps and rope_theta = 1e6."""
    config = Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-2,
                         rope_theta=1e6)
    m = Qwen2ForCausalLM(config, seed=7)
    rng = np.random.default_rng(1)
    w = dict(m.state_dict())
    for name in w:
        if name.endswith("bias"):
            w[name] = (rng.standard_normal(w[name].shape) * 2).astype(np.float32)
        elif name.endswith("norm.weight"):
            w[name] = (1 + rng.standard_normal(w[name].shape) * 0.5).astype(np.float32)
    m.load_state_dict(w)
    return m


def wrong(verdict, message):
    assert not verdict.passed and message in str(verdict), (message, str(verdict))


def test_the_solutions_are_there():
    assert {"my_softmax", "causal_mask", "attention_head", "multi_head", "padded_mask", "my_rms_norm", "my_rope", "gqa",
            "my_decoder_layer"} <= set(SOLUTIONS)


def test_softmax():
    assert ex.grade_softmax(SOLUTIONS["my_softmax"]).passed

    def no_max(x):
        with np.errstate(over="ignore", invalid="ignore"):
            return np.exp(x) / np.exp(x).sum(-1, keepdims=True)

    def axis0(x):
        e = np.exp(x - x.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    wrong(ex.grade_softmax(no_max), "exp(1000) overflows to inf")
    wrong(ex.grade_softmax(axis0), "you normalised along the first axis")
    wrong(ex.grade_softmax(lambda x: np.exp(x - x.max(-1, keepdims=True))), "divide by the sum of its exponentials")


def test_the_causal_mask():
    assert ex.grade_causal_mask(SOLUTIONS["causal_mask"]).passed

    def made(rule, fill=LOWEST):
        def mask(T, S):
            visible = rule(np.arange(S - T, S)[:, None], np.arange(S)[None, :], T)
            return np.where(visible, np.float32(0), fill).astype(np.float32)
        return mask

    wrong(ex.grade_causal_mask(made(lambda q, k, T: k <= q, -np.inf)), "you used -inf")
    wrong(ex.grade_causal_mask(lambda T, S: np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]), "boolean picture")
    wrong(ex.grade_causal_mask(made(lambda q, k, T: k >= q)), "wrong way round")
    wrong(ex.grade_causal_mask(made(lambda q, k, T: k < q)), "a query must see itself")
    wrong(ex.grade_causal_mask(made(lambda q, k, T: k <= q - q[0])), "your triangle starts at key 0")


def test_the_padded_mask():
    assert ex.grade_padded_mask(SOLUTIONS["padded_mask"]).passed

    def made(rule):
        def mask(m):
            B, T = m.shape
            causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
            return np.where(rule(causal, m.astype(bool)), np.float32(0), LOWEST).astype(np.float32)
        return mask

    wrong(ex.grade_padded_mask(made(lambda c, m: c[None, None] & m[:, None, :, None])), "padded *queries* (rows)")
    wrong(ex.grade_padded_mask(made(lambda c, m: np.broadcast_to(m[:, None, None, :], (len(m), 1) + c.shape))),
          "the causal part is missing")
    wrong(ex.grade_padded_mask(made(lambda c, m: np.broadcast_to(c, (len(m), 1) + c.shape))), "the padding part is missing")
    wrong(ex.grade_padded_mask(lambda m: made(lambda c, m: c[None, None] & m[:, None, None, :])(m)[:, 0]),
          "the same numbers laid out another way")


def head(x, w_q, w_k, w_v, scale=True, mask=True, axis=-1):
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    scores = q @ k.T / (np.sqrt(np.float32(w_q.shape[1])) if scale else 1)
    T = len(x)
    z = np.where(np.triu(np.ones((T, T), dtype=bool), 1), LOWEST, scores) if mask else scores
    e = np.exp(z - z.max(axis, keepdims=True))
    probs = e / e.sum(axis, keepdims=True)
    return {"q": q, "k": k, "v": v, "scores": scores, "probs": probs, "context": probs @ v}


def test_one_attention_head():
    assert ex.grade_attention_head(SOLUTIONS["attention_head"]).passed
    assert ex.grade_attention_head(head).passed
    wrong(ex.grade_attention_head(lambda *a: head(*a, scale=False)), "not divided by √HD")
    wrong(ex.grade_attention_head(lambda *a: head(*a, mask=False)), "the future leaks")
    wrong(ex.grade_attention_head(lambda *a: head(*a, axis=0)), "normalised along the first axis")
    wrong(ex.grade_attention_head(lambda *a: {**head(*a), "scores": head(*a)["scores"].T}), "this is k qᵀ")
    final_only = ex.grade_attention_head(lambda *a: head(*a, mask=False)["context"])
    assert not final_only.passed and final_only.first_wrong == "context" and "return a dict of the steps" in str(final_only)


def test_several_heads():
    multi_head = SOLUTIONS["multi_head"]
    assert ex.grade_multi_head(multi_head).passed

    def bad_split(x, w_q, w_k, w_v, w_o, H):
        out = multi_head(x, w_q, w_k, w_v, w_o, H)
        T, D = x.shape
        return {**out, "q_heads": (x @ w_q).reshape(H, T, D // H)}

    def bad_merge(x, w_q, w_k, w_v, w_o, H):
        out = multi_head(x, w_q, w_k, w_v, w_o, H)
        T, D = x.shape
        v = (x @ w_v).reshape(T, H, D // H).transpose(1, 0, 2)
        context = (out["probs"] @ v).reshape(T, D)
        return {"probs": out["probs"], "context": context, "out": context @ w_o}

    wrong(ex.grade_multi_head(bad_split), "you reshaped [T, H·HD] straight to [H, T, HD]")
    wrong(ex.grade_multi_head(bad_merge), "you reshaped [H, T, HD] straight to [T, D]")


def test_rms_norm(model):
    assert ex.grade_rms_norm(SOLUTIONS["my_rms_norm"], model, IDS, layer=1).passed
    cases = {
        "eps is outside the square root":
            lambda x, w, eps: w * x / (np.sqrt((x * x).mean(-1, keepdims=True)) + np.float32(eps)),
        "the learned scale w is missing": lambda x, w, eps: x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps)),
        "that is LayerNorm": lambda x, w, eps: w * (x - x.mean(-1, keepdims=True)) / np.sqrt(
            ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + np.float32(eps)),
        "runs over the positions (axis 1)": lambda x, w, eps: w * x / np.sqrt((x * x).mean(1, keepdims=True) + np.float32(eps)),
    }
    for message, fn in cases.items():
        wrong(ex.grade_rms_norm(fn, model, IDS, layer=1), message)


def test_rope(model):
    my_rope = SOLUTIONS["my_rope"]
    verdict = ex.grade_rope(my_rope, model, IDS)
    assert verdict.passed and [s[0] for s in verdict.steps] == ["inv_freq", "cos", "sin", "q_rope"], verdict

    def interleaved(x, positions, theta):
        HD = x.shape[-1]
        inv = np.float32(1) / np.float32(theta) ** (np.arange(0, HD, 2, dtype=np.float32) / np.float32(HD))
        a = positions[:, None].astype(np.float32) * inv
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * np.cos(a) - x[..., 1::2] * np.sin(a)
        out[..., 1::2] = x[..., 0::2] * np.sin(a) + x[..., 1::2] * np.cos(a)
        return out

    wrong(ex.grade_rope(interleaved, model, IDS), "RoPE on neighbouring pairs (2i, 2i+1)")
    wrong(ex.grade_rope(lambda x, p, t: my_rope(x, p, 10000.0), model, IDS), "these are θ = 10000's frequencies")
    wrong(ex.grade_rope(lambda x, p, t: my_rope(x, p + 1, t)["q_rope"], model, IDS), "positions start at 1")
    wrong(ex.grade_rope(lambda x, p, t: my_rope(x, -p, t)["q_rope"], model, IDS), "rotated the other way")
    assert ex.grade_rope(lambda x, p, t: {**my_rope(x, p, t), "cos": my_rope(x, p, t)["cos"][None]}, model, IDS).passed


def test_gqa(model):
    gqa = SOLUTIONS["gqa"]
    verdict = ex.grade_gqa(gqa, model, IDS, layer=1)
    assert verdict.passed, verdict
    assert [s[0] for s in verdict.steps] == ["scores", "probs", "context", "context, T=1 S=4096", "memory"]

    def attend(q, k, v, mask, tile):
        G = q.shape[1] // k.shape[1]
        k, v = (np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1))) if tile else \
            (np.repeat(k, G, axis=1), np.repeat(v, G, axis=1))
        scores = (q @ k.swapaxes(-1, -2)) * np.float32(q.shape[-1] ** -0.5)
        probs = softmax(scores + mask)
        return {"scores": scores, "probs": probs, "context": probs @ v}

    tiled = ex.grade_gqa(lambda *a: attend(*a, tile=True), model, IDS)
    assert tiled.first_wrong == "scores" and "h % KV (np.tile)" in str(tiled)
    tiled_final = ex.grade_gqa(lambda *a: attend(*a, tile=True)["context"], model, IDS)
    assert tiled_final.first_wrong == "context" and "h % KV (np.tile)" in str(tiled_final)
    copied = ex.grade_gqa(lambda *a: attend(*a, tile=False), model, IDS)
    assert copied.first_wrong == "memory" and "K and V were copied" in str(copied)
    unscaled = ex.grade_gqa(lambda *a: {**gqa(*a), "scores": gqa(*a)["scores"] * 4}, model, IDS)
    assert unscaled.first_wrong == "scores" and "yours = 4 x the model's" in str(unscaled)


def test_a_whole_decoder_layer(model):
    layer = SOLUTIONS["my_decoder_layer"]
    verdict = ex.grade_decoder_layer(layer, model, IDS, layer=2)
    assert verdict.passed and len(verdict.steps) == 17, verdict

    def changed(**replace):
        def fn(x, w, cos, sin, mask, config):
            s = layer(x, w, cos, sin, mask, config)
            for name, f in replace.items():
                s[name.replace("__", ".")] = f(s, x, w)
            return s
        return fn

    cases = {
        "the bias is missing: Qwen2's q, k and v": changed(self_attn__q_proj=lambda s, x, w: s["self_attn.q_proj"] - w["self_attn.q_proj.bias"]),
        "the residual is missing": changed(resid_mid=lambda s, x, w: s["self_attn.o_proj"]),
        "GELU instead of SiLU": changed(mlp__act=lambda s, x, w: 0.5 * s["mlp.gate_proj"] * (1 + np.tanh(
            np.sqrt(2 / np.pi) * (s["mlp.gate_proj"] + 0.044715 * s["mlp.gate_proj"] ** 3)))),
        "SiLU of up_proj": changed(mlp__act=lambda s, x, w: s["mlp.up_proj"] / (1 + np.exp(-s["mlp.up_proj"]))),
        "the second residual is missing": changed(output=lambda s, x, w: s["mlp.down_proj"]),
        "the second norm reads x": changed(post_attention_layernorm=lambda s, x, w: (w["post_attention_layernorm.weight"] * x
                                           / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-2)))),
    }
    for message, fn in cases.items():
        wrong(ex.grade_decoder_layer(fn, model, IDS, layer=2), message)
    missing = ex.grade_decoder_layer(lambda *a: {k: v for k, v in layer(*a).items() if k != "output"}, model, IDS, layer=2)
    assert missing.first_wrong == "output" and "missing" in str(missing)
