"""`qwen2np dump --grad` writes gradients as golden values under `name.grad`, scripts/dump_transformers.py
--grad writes transformers' side, and `qwen2np compare` judges them with the gradient policies."""

import json

import numpy as np
import pytest

from grad_support import CONFIGS, config_of
from qwen2np import Qwen2ForCausalLM, trace, value_and_grad
from qwen2np.cli import main
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump, write_dump

IDS = [[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
MASK = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("grad") / "model"
    Qwen2ForCausalLM(config_of(CONFIGS["gqa-sliding"]), seed=4).save_pretrained(path)
    return path


def dump_grad(folder, out, *extra):
    code = main(["dump", "--model", str(folder), "--ids", json.dumps(IDS), "--attention-mask", json.dumps(MASK),
                 "--grad", "--fingerprint", "none", "--out", str(out), *extra])
    assert code == 0
    return read_dump(out)


def test_dump_grad_writes_the_gradients_value_and_grad_gives(folder, tmp_path):
    dump = dump_grad(folder, tmp_path / "q", "--include", "model.layers.1.*", "logits.grad", "lm_head.weight.grad")
    names = dump.names()
    model = Qwen2ForCausalLM.from_pretrained(folder)
    ids, mask = np.array(IDS), np.array(MASK)
    labels = np.where(mask == 1, ids, -100)
    with trace(model, "model.layers.1.*", "logits.grad") as t:
        loss, grads = value_and_grad(model, ids, labels=labels, attention_mask=mask)
    assert dump.manifest["options"]["grad"] == {"labels": "input_ids, -100 at padding", "loss": float(loss)}
    forward = [n for n in names if not n.endswith(".grad")]
    assert forward == [n for n in model.intermediate_names() if n.startswith("model.layers.1.") and n in t]
    # the gradients in the order the backward pass produces them: logits first, then layer 1 from its output
    # down, then the parameters' from the last to the first
    grad_names = [n for n in names if n.endswith(".grad")]
    assert grad_names[:3] == ["logits.grad", "model.layers.1.grad", "model.layers.1.mlp.down_proj.grad"]
    params = [n for n in grad_names if n[:-5] in grads]
    assert params == [f"{n}.grad" for n in reversed(list(grads)) if f"{n}.grad" in names]
    assert len(params) == 1 + 12                      # lm_head, and layer 1's twelve tensors
    assert params[0] == "lm_head.weight.grad" and params[-1] == "model.layers.1.input_layernorm.weight.grad"
    for n in names:
        expected = grads[n[:-5]] if n[:-5] in grads else t[n]
        assert np.array_equal(dump[n], expected), n


def test_compare_judges_gradients_and_names_the_first_one_off(folder, tmp_path):
    dump = dump_grad(folder, tmp_path / "q", "--include", "*.grad")
    assert main(["compare", str(tmp_path / "q"), str(tmp_path / "q")]) == 0
    # a gradient off by 1 % (beyond the float32 gradient policy, 3e-3): compare fails and names it
    name = "model.layers.0.self_attn.k_proj.weight.grad"
    dump.tensors = {k: (v * np.float32(1.01) if k == name else v) for k, v in dump.tensors.items()}
    write_dump(dump, tmp_path / "off")
    report = compare_dumps(read_dump(tmp_path / "off"), read_dump(tmp_path / "q"))
    assert not report.ok and [t.name for t in report.tensors if not t.ok] == [name]
    assert report.first_failure.tolerance == 3e-3
    assert main(["compare", str(tmp_path / "off"), str(tmp_path / "q")]) == 1


def test_dump_grad_refuses_decode_steps_and_unknown_names(folder, tmp_path, capsys):
    assert main(["dump", "--model", str(folder), "--ids", "1,2,3", "--grad", "--decode-steps", "1",
                 "--out", str(tmp_path / "a")]) != 0
    assert "takes no --decode-steps" in capsys.readouterr().err
    assert main(["dump", "--model", str(folder), "--ids", "1,2,3", "--grad", "--include", "*.nothing.grad",
                 "--out", str(tmp_path / "b")]) != 0
    assert "matches no intermediate, intermediate gradient or parameter gradient" in capsys.readouterr().err


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transformers_side_agrees_under_the_policy(oracle, dt, folder, tmp_path, dtype):
    """scripts/dump_transformers.py --grad on the same folder: every tensor of both dumps compared, within the
    float32 or float64 policy (float64 with transformers' four float32 islands lifted)."""
    ours = dump_grad(folder, tmp_path / "q", "--dtype", dtype)
    args = ["--model", str(folder), "--ids", json.dumps(IDS), "--attention-mask", json.dumps(MASK), "--grad",
            "--fingerprint", "none", "--dtype", dtype, "--out", str(tmp_path / "t")]
    assert dt.main(args + (["--float64-everywhere"] if dtype == "float64" else [])) == 0
    report = compare_dumps(ours, read_dump(tmp_path / "t"))
    assert report.ok, report.first_failure
    assert not report.only_in_a and report.only_in_b == ["model.layers.0.self_attn.head_out",
                                                         "model.layers.1.self_attn.head_out"]
    grads = [t for t in report.tensors if t.name.endswith(".grad")]
    assert len(grads) == 2 * 17 + 3 + 2 * 12 + 3       # 17 per layer, embedding, norm, logits; 27 parameters
