"""scripts/finetune_step.py, the one fine-tuning step notebook 6 runs in a process of its own: on a tiny random
model saved to a folder, the loss after the step is lower than before and is what qwen2np's own
value_and_grad + AdamW give in this process; its tensor-by-tensor step (moments let go once used) updates
the weights exactly as `AdamW.step(grads)` on all of them at once."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen2np import AdamW, Qwen2Config, Qwen2ForCausalLM, value_and_grad

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "finetune_step.py"
IDS = np.array([[5, 17, 3, 40, 22, 9, 31, 5, 17, 3, 40, 22]])
HELD_OUT = np.array([[7, 1, 44, 12, 30, 2]])
LR = 1e-2


def finetune_module():
    spec = importlib.util.spec_from_file_location("finetune_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen2 (GQA, biases, untied head as in the test checkpoint) saved as a Hugging Face folder."""
    config = Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny")
    Qwen2ForCausalLM(config, seed=3).save_pretrained(path)
    return path


def one_step_in_process(folder):
    """(loss before, loss after, held-out before, after, the model): value_and_grad and one AdamW.step."""
    model = Qwen2ForCausalLM.from_pretrained(folder)
    held_before = float(model(HELD_OUT, labels=HELD_OUT).loss)
    opt = AdamW(model, lr=LR, weight_decay=0.0)
    before, grads = value_and_grad(model, IDS, labels=IDS)
    opt.step(grads)
    return (float(before), float(model(IDS, labels=IDS).loss), held_before,
            float(model(HELD_OUT, labels=HELD_OUT).loss), model)


def test_the_script_lowers_the_loss_as_value_and_grad_and_adamw_do(folder):
    ids = ",".join(map(str, IDS[0]))
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(folder), "--ids", ids,
                             "--held-out", ",".join(map(str, HELD_OUT[0])), "--lr", str(LR)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()                 # one JSON line
    step = json.loads(line)
    before, after, held_before, held_after, model = one_step_in_process(folder)
    assert step["loss_after"] < step["loss_before"]
    assert step["loss_before"] == pytest.approx(before, rel=1e-6)
    assert step["loss_after"] == pytest.approx(after, rel=1e-5)
    assert abs(after - before) > 100 * 1e-5 * before    # the step moved the loss far more than the tolerance
    assert step["held_out_before"] == pytest.approx(held_before, rel=1e-6)
    assert step["held_out_after"] == pytest.approx(held_after, rel=1e-5)
    assert step["parameters"] == model.num_parameters() and step["tensors"] == len(model.params) == 27
    assert step["seconds"] >= 0 and step["load_seconds"] >= 0
    assert 0 < step["peak_rss_bytes"] < 2**31          # VmHWM of a process that held a tiny model
    assert "every layer keeps its activations" in step["gradient_plan"]


def test_one_tensor_at_a_time_is_adamw_step_on_all(folder):
    """Bit for bit: the update of a tensor reads only its own gradient and moments."""
    mine = Qwen2ForCausalLM.from_pretrained(folder)
    result = finetune_module().finetune_step(mine, IDS, lr=LR, weight_decay=0.1)
    reference = Qwen2ForCausalLM.from_pretrained(folder)
    opt = AdamW(reference, lr=LR, weight_decay=0.1)
    _, grads = value_and_grad(reference, IDS, labels=IDS)
    opt.step(grads)
    for name, w in reference.params.items():
        assert np.array_equal(mine.params[name], w), name
    assert result["loss_after"] == float(reference(IDS, labels=IDS).loss)
    assert "held_out_before" not in result


def test_a_bad_flag_is_a_usage_error(folder):
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(folder)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "one of the arguments --text --ids is required" in result.stderr
