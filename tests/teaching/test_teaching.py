"""The notebooks' exercises and teaching aids (qwen2np/teaching/): the folded solutions of every notebook
pass the grader, typical wrong answers are caught and the first wrong operation is named, and the port
of the gallery diverges exactly where each mistake says.

The solutions are read from the notebooks themselves (the markdown cells tagged `solution`), so the
solution a reader unfolds is the one tested. They run here on small random models (no checkpoint
needed); the notebooks run them on the real one.
"""

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.record import record_dump
from qwen2np.teaching import grader
from qwen2np.teaching.bpe_train import merge_everywhere, pair_counts, piece_counts, train_bpe
from qwen2np.teaching.port import MISTAKES, port_forward, reference_names

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=48, hidden_size=64, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


def tiny(**overrides):
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}), seed=7)


IDS = np.array([[3, 17, 5, 9, 30, 2, 11]])


def solution(notebook):
    """The functions defined in the notebook's folded solution, as {name: function}."""
    import json

    cells = json.loads((ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))["cells"]
    [cell] = [c for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]
    code = re.search(r"```python\n(.*?)```", "".join(cell["source"]), re.S).group(1)
    tree = ast.parse(code)
    tree.body = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
    namespace = {"np": np, "pair_counts": pair_counts, "merge_everywhere": merge_everywhere}
    exec(compile(tree, notebook, "exec"), namespace)
    return {k: v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) is None}


def test_the_bpe_training_solution_passes_and_an_unweighted_count_is_named():
    words = piece_counts([(ROOT / "LICENSE").read_text(encoding="utf-8")])
    train = solution("01_tokenizer.ipynb")["train"]
    verdict = grader.grade_bpe_training(train, words, 30)
    assert verdict.passed, verdict
    assert [m for m in train(words, 30)] == [pair for pair, _ in train_bpe(words, 30)]

    def unweighted(words, n):
        return [pair for pair, _ in train_bpe({w: 1 for w in words}, n)]

    verdict = grader.grade_bpe_training(unweighted, words, 30)
    assert not verdict.passed and verdict.first_wrong == "merge 2" and "('ĠĠ', 'ĠĠ')" in str(verdict)
    too_few = grader.grade_bpe_training(lambda w, n: train(w, n - 1), words, 30)
    assert too_few.first_wrong == "count" and "29 merges, 30 asked for" in str(too_few)


def test_ties_are_any_of_the_most_frequent_pairs():
    words = {("a", "b"): 1, ("c", "d"): 1}
    assert grader.grade_bpe_training(lambda w, n: [("c", "d"), ("a", "b")], words, 2).passed
    assert grader.grade_bpe_training(lambda w, n: [("a", "b"), ("c", "d"), ("x", "y")], words, 3).first_wrong == "merge 3"


def test_the_gqa_solution_passes_and_tile_and_copies_are_named():
    model = tiny()
    gqa = solution("02_forward_pass.ipynb")["gqa"]
    verdict = grader.grade_gqa(gqa, model, IDS, layer=1)
    assert verdict.passed, verdict
    assert [s[0] for s in verdict.steps] == ["scores", "probs", "context", "context, T=1 S=4096", "memory"]

    def attend(q, k, v, mask, G, tile):
        k, v = (np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1))) if tile else \
            (np.repeat(k, G, axis=1), np.repeat(v, G, axis=1))
        scores = (q @ k.swapaxes(-1, -2)) * np.float32(q.shape[-1] ** -0.5)
        z = scores + mask
        e = np.exp(z - z.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        return {"scores": scores, "probs": probs, "context": probs @ v}

    tiled = grader.grade_gqa(lambda q, k, v, m: attend(q, k, v, m, 2, True), model, IDS)
    assert tiled.first_wrong == "scores" and "h % KV (np.tile)" in str(tiled)
    copied = grader.grade_gqa(lambda q, k, v, m: attend(q, k, v, m, 2, False), model, IDS)
    assert copied.first_wrong == "memory" and "K and V were copied" in str(copied)
    unscaled = grader.grade_gqa(lambda q, k, v, m: {**gqa(q, k, v, m), "scores": gqa(q, k, v, m)["scores"] * 4},
                                model, IDS)
    assert unscaled.first_wrong == "scores" and "yours = 4 x the model's" in str(unscaled)


def test_the_head_attribution_solution_passes_and_a_missing_norm_scale_is_named():
    model = tiny(dtype_note=None) if False else tiny()
    fn = solution("03_inspection.ipynb")["head_attribution"]
    verdict = grader.grade_head_attribution(fn, model, IDS, answer=4, other=9)
    assert verdict.passed, verdict

    def no_scale(t, model, answer, other):
        w = model.state_dict()
        d = (w["lm_head.weight"][answer].astype(np.float64) - w["lm_head.weight"][other]) * w["model.norm.weight"]
        return np.stack([t[f"model.layers.{l}.self_attn.head_out"][0, :, -1] @ d for l in range(3)])

    verdict = grader.grade_head_attribution(no_scale, model, IDS, answer=4, other=9)
    assert verdict.first_wrong == "head_terms" and "a missing or extra scale factor?" in str(verdict)
    swapped = grader.grade_head_attribution(lambda *a: -fn(*a)["head_terms"], model, IDS, answer=4, other=9)
    assert swapped.first_wrong == "head_terms" and "yours = -1 x the model's" in str(swapped)


def test_the_top_p_solution_passes_and_dropping_the_crossing_token_is_named():
    scores = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))
    top_p = solution("04_generation.ipynb")["top_p"]
    assert grader.grade_top_p(top_p, scores).passed
    rng = np.random.default_rng(0)
    assert grader.grade_top_p(top_p, rng.standard_normal(500).astype(np.float32) * 3).passed

    def short(scores, p):
        order = np.argsort(-scores)
        e = np.exp(scores[order] - scores.max())
        keep = order[np.cumsum(e / e.sum()) < p]
        out = np.full_like(scores, -np.inf)
        out[keep] = scores[keep]
        return out

    verdict = grader.grade_top_p(short, scores)
    assert verdict.first_wrong == "p=0.5" and "the one whose probability crosses p: transformers keeps it" in str(verdict)
    rescaled = grader.grade_top_p(lambda s, p: np.where(np.isfinite(top_p(s, p)), s * 2, -np.inf), scores)
    assert not rescaled.passed and "left as they were" in str(rescaled)


def test_the_port_start_solution_passes_and_eps_outside_and_interleaving_are_named():
    model = tiny(rms_norm_eps=1e-2)          # a large eps, so that its place shows on random weights
    fns = solution("05_porting_mistakes.ipynb")
    verdict = grader.grade_port_start(fns, model, IDS)
    assert verdict.passed and [s[0] for s in verdict.steps] == ["input_layernorm", "q_rope"], verdict

    def eps_outside(x, w, eps):
        return w * (x / (np.sqrt((x * x).mean(-1, keepdims=True)) + np.float32(eps)))

    def interleaved(x, cos, sin):
        c, s = cos[:, None, :, :x.shape[-1] // 2], sin[:, None, :, :x.shape[-1] // 2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x[..., 0::2] * c - x[..., 1::2] * s, x[..., 0::2] * s + x[..., 1::2] * c
        return out

    assert grader.grade_port_start({**fns, "rms_norm": eps_outside}, model, IDS).first_wrong == "input_layernorm"
    assert grader.grade_port_start({**fns, "apply_rope": interleaved}, model, IDS).first_wrong == "q_rope"


def test_the_grader_explains_stubs_errors_and_shapes():
    model = tiny()
    assert "not attempted yet: gqa returned None" in str(grader.grade_gqa(lambda_none("gqa"), model, IDS))
    raised = grader.grade_gqa(lambda q, k, v, m: q[9], model, IDS)
    assert "your function raised IndexError" in str(raised)
    shaped = grader.grade_gqa(lambda q, k, v, m: {"scores": q}, model, IDS)
    assert shaped.first_wrong == "scores" and "shape (1, 4, 7, 16), the model's is (1, 4, 7, 7)" in str(shaped)
    nan = grader.compare_steps("x", [("probs", np.ones((2, 2)))], {"probs": np.full((2, 2), np.nan)})
    assert nan.first_wrong == "probs" and "NaN at (0, 0)" in str(nan)
    final_only = grader.compare_steps("x", [("a", np.ones(2)), ("b", np.zeros(2))], np.ones(2))
    assert final_only.first_wrong == "b" and "return a dict of the steps" in str(final_only)


def lambda_none(name):
    def stub(*args):
        return None
    stub.__name__ = name
    return stub


# -- the port of the gallery ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sliding():
    """A model whose upper layers slide (W = 3 from layer 2 on), and its golden dump of a padded batch."""
    model = tiny(use_sliding_window=True, sliding_window=3, max_window_layers=2, initializer_range=0.2)
    ids = np.array([[0, 0, 3, 17, 5, 9, 30, 2], [4, 8, 15, 16, 23, 42, 1, 7]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    return model, ids, mask, record_dump(model, ids, mask, include=reference_names(model.config), fingerprint=None)


def test_the_port_agrees_with_qwen2np_without_mistakes(sliding):
    model, ids, mask, golden = sliding
    c = compare_dumps(port_forward(model.state_dict(), model.config, ids, mask), golden)
    assert c.ok and not c.only_in_a and not c.only_in_b and len(c.tensors) == len(reference_names(model.config))


@pytest.mark.parametrize("mistake, first", [
    ("interleaved_rope", "model.layers.0.self_attn.q_rope"),
    ("gqa_tile", "model.layers.0.self_attn.scores"),
    ("mask_minus_inf", "model.layers.1.self_attn.probs"),
    ("sliding_wrong_layers", "model.layers.0.self_attn.mask"),
])
def test_each_mistake_diverges_first_where_it_is(sliding, mistake, first):
    """(The bias and eps mistakes need the real checkpoint's large biases and small norms to show; the
    gallery notebook shows them there.)"""
    model, ids, mask, golden = sliding
    c = compare_dumps(port_forward(model.state_dict(), model.config, ids, mask, mistakes=[mistake]), golden)
    assert c.first_failure is not None and c.first_failure.name == first
    if mistake == "mask_minus_inf":
        assert c.first_failure.rel == float("inf")


def test_the_bias_and_eps_mistakes_on_weights_that_show_them(sliding):
    model, ids, mask, golden = sliding
    weights = dict(model.state_dict())
    weights["model.layers.0.self_attn.q_proj.bias"] = np.full_like(weights["model.layers.0.self_attn.q_proj.bias"], 3.0)
    moved = tiny(use_sliding_window=True, sliding_window=3, max_window_layers=2, initializer_range=0.2, rms_norm_eps=0.05)
    moved.load_state_dict(weights)
    golden = record_dump(moved, ids, mask, include=reference_names(moved.config), fingerprint=None)
    for mistake, first in [("no_qkv_bias", "model.layers.0.self_attn.q_proj"),
                           ("eps_outside_sqrt", "model.layers.0.input_layernorm")]:
        c = compare_dumps(port_forward(weights, moved.config, ids, mask, mistakes=[mistake]), golden)
        assert c.first_failure.name == first, mistake
    with pytest.raises(ValueError, match="unknown mistakes \\['typo'\\]"):
        port_forward(weights, moved.config, ids, mistakes=["typo"])
    assert set(MISTAKES) == {"interleaved_rope", "gqa_tile", "no_qkv_bias", "eps_outside_sqrt", "mask_minus_inf",
                             "sliding_wrong_layers"}
