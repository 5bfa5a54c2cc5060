"""The folded solutions of the notebooks' exercises, read from the notebooks themselves (the markdown cells
tagged `solution`), so that the solution a reader unfolds is the one the tests grade."""

import ast
import json
import re
from pathlib import Path

import numpy as np

from qwen2np.inspection.interp import softmax64
from qwen2np.model.layers import linear, rms_norm, silu, softmax
from qwen2np.model.rope import apply_rope
from qwen2np.teaching.bpe_train import merge_everywhere, pair_counts
from qwen2np.tokenizer.bytes_level import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[2]
# the names a notebook's solutions may use from the cells around them
CONTEXT = {"np": np, "pair_counts": pair_counts, "merge_everywhere": merge_everywhere,
           "bytes_to_unicode": bytes_to_unicode, "rms_norm": rms_norm, "linear": linear, "apply_rope": apply_rope,
           "silu": silu, "softmax": softmax, "softmax64": softmax64}


def solution_cells(notebook):
    cells = json.loads((ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]


def solutions(notebook):
    """{function name: function} of every folded solution of the notebook."""
    namespace = dict(CONTEXT)
    for source in solution_cells(notebook):
        code = re.search(r"```python\n(.*?)```", source, re.S).group(1)
        tree = ast.parse(code)
        tree.body = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
        exec(compile(tree, notebook, "exec"), namespace)
    return {k: v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) is None}
