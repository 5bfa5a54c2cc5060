"""The real checkpoint within a small memory budget: per-use conversion gives bitwise the resident path's
logits, in a fraction of its memory (each run in a fresh process, its peak RSS measured there).

Three files of the same model: the test GGUF (Q4_K_M blocks), and the float32 and bfloat16 safetensors
folders `qwen2np convert` makes of it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.checkpoint, pytest.mark.slow]

RUN = r"""
import json, sys
import numpy as np
from qwen2np import Qwen2ForCausalLM
path, budget, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = Qwen2ForCausalLM.from_pretrained(path, max_memory=None if budget == "none" else budget)
ids = np.array([[14582, 264, 13027, 729, 429, 17431, 288, 264, 914, 13, 151645, 198, 151644, 77091, 198]])
first = model(ids[:, :-2])
logits = [first.logits]
cache = first.past_key_values
for t in (-2, -1):                                  # two decode steps through the cache
    step = model(ids[:, t:][:, :1], past_key_values=cache)
    logits.append(step.logits)
    cache = step.past_key_values
np.save(out, np.concatenate([l.reshape(-1, l.shape[-1]) for l in logits]))
# subtle: VmHWM, this process's own peak; ru_maxrss would carry over the peak of the (big) pytest process
# that forked it, across exec
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss": peak, "plan": model.weight_plan.description}))
"""


@pytest.fixture(scope="module")
def files(test_gguf, tmp_path_factory):
    folders = {"gguf": test_gguf}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path_factory.mktemp("real") / dtype
        subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(test_gguf), str(folder), "--dtype", dtype],
                       check=True, capture_output=True, timeout=600)
        folders[dtype] = folder
    return folders


def run(path, budget, out):
    done = subprocess.run([sys.executable, "-c", RUN, str(path), budget, str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


@pytest.mark.parametrize("kind", ["gguf", "float32", "bfloat16"])
def test_a_small_budget_converts_per_use_with_the_same_logits_in_a_fraction_of_the_memory(files, tmp_path, kind):
    resident, logits = run(files[kind], "none", tmp_path / "resident.npy")
    assert "every weight kept as float32" in resident["plan"]
    # subtle: 1.0 GB, not 1.5: since issue 17 the nominal pass is estimated at what it takes (0.44 GB, was
    # 1.19), and 1.5 GB left room to keep 6 layers and map the rest, streaming nothing
    small, streamed = run(files[kind], "1.0GB", tmp_path / "small.npy")
    assert "streamed from the file" in small["plan"], small["plan"]
    assert np.array_equal(streamed, logits)                       # bit for bit, prefill and decode steps
    assert small["rss"] < 0.6 * resident["rss"], (small, resident)
