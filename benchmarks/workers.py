"""What the side-by-side benchmarks share: each side in a fresh subprocess, and transformers' float32 folder.

The benchmarks run as scripts (`python benchmarks/bench_model.py`), so this folder is on their sys.path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(script, *args):
    """Run `script --worker ARGS` in a fresh interpreter (its peak RSS its own); its last stdout line as JSON."""
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def transformers_folder(gguf):
    """transformers' own float32 conversion of the GGUF (cached beside it, as the tests do)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import transformers
    from conftest import transformers_checkpoint_folder

    return transformers_checkpoint_folder(transformers, Path(gguf))
