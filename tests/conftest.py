"""Shared test set-up: the oracle and the real checkpoint are required in CI, optional elsewhere.

`.ci/run` sets QWEN2NP_CI=1. Then a test that needs transformers (the oracle) or the real test checkpoint
fails when it cannot run, instead of skipping: a silent skip in CI would be a test that cannot fail.
"""

import fcntl
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

IN_CI = os.environ.get("QWEN2NP_CI") == "1"

ORACLE_VERSIONS = {"transformers": "5.24.0", "torch": "2.13.0", "tokenizers": "0.23.3"}

settings.register_profile(
    "qwen2np", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# in CI the same examples every run (a red CI is then a change, not a new draw); elsewhere fresh ones each run
settings.register_profile("qwen2np-ci", settings.get_profile("qwen2np"), derandomize=True)
settings.load_profile("qwen2np-ci" if IN_CI else "qwen2np")


def require(ok, reason):
    """Skip with `reason` when not `ok`; in CI, fail instead."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (QWEN2NP_CI=1: this must run in CI, not skip)")
    pytest.skip(reason)


def _oracle_problem():
    try:
        import tokenizers
        import torch
        import transformers
    except ImportError as e:
        return f"the oracle is not installed ({e}); pip install torch==2.13.0 'qwen2np[oracle]'"
    found = {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "tokenizers": tokenizers.__version__,
    }
    wrong = [f"{k} {found[k]} (want {v})" for k, v in ORACLE_VERSIONS.items() if found[k] != v]
    return f"wrong oracle versions: {', '.join(wrong)}" if wrong else None


@pytest.fixture(scope="session")
def oracle():
    """The transformers module, pinned to 5.24.0 (torch 2.13.0, 2 threads, no grad)."""
    problem = _oracle_problem()
    require(problem is None, problem)
    import torch
    import transformers

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="session")
def dt(oracle):
    """scripts/dump_transformers.py as a module: transformers' dump recorder, `load_model`, and
    `float64_everywhere`, the patch that lifts its float32 islands."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "dump_transformers.py"
    spec = importlib.util.spec_from_file_location("dump_transformers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def test_gguf():
    """Path of the real Qwen2.5-Coder-0.5B-Instruct GGUF, assembled by `qwen2np fetch`."""
    from qwen2np.io.fetch import test_checkpoint_path

    path = test_checkpoint_path()
    require(path.is_file(), f"the test checkpoint is missing at {path}; run `qwen2np fetch`")
    return path


@pytest.fixture(scope="session")
def real_model(test_gguf):
    """qwen2np's Qwen2ForCausalLM on the real GGUF, float32, loaded once per session."""
    from qwen2np import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(test_gguf)


@pytest.fixture(scope="session")
def real_tokenizer(test_gguf):
    from qwen2np import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(test_gguf)


def transformers_checkpoint_folder(oracle, gguf):
    """The real GGUF as transformers itself dequantizes it, saved once as a float32 safetensors folder.

    transformers needs about a minute to load a GGUF; the folder it writes here loads in seconds
    (memory-mapped). It is made by transformers alone, so it stays an independent oracle; a stamp names
    the GGUF and the transformers version it came from.
    """
    import torch

    folder = gguf.parent / f"transformers-{oracle.__version__}-float32"
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size, "transformers": oracle.__version__}
    # one process makes it (pytest -n runs several), the others wait for it and then find it made
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "stamp.json").is_file() and json.loads((folder / "stamp.json").read_text()) == stamp:
            return folder
        model = oracle.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one and save that
        plain = oracle.Qwen2ForCausalLM(model.config)
        plain.load_state_dict(model.state_dict())
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)   # what a killed run left
        plain.save_pretrained(tmp)
        (tmp / "stamp.json").write_text(json.dumps(stamp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


@pytest.fixture(scope="session")
def hf_real_model(oracle, test_gguf):
    """transformers 5.24's Qwen2ForCausalLM on the same dequantized weights: float32, eager attention."""
    import torch

    folder = transformers_checkpoint_folder(oracle, test_gguf)
    return oracle.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                       attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gguf():
    """The `gguf` package (the `gguf` extra)."""
    try:
        import gguf
    except ImportError:
        require(False, "the gguf package is not installed: pip install 'qwen2np[gguf]'")
    return gguf
