"""The package's layers hold: a lower layer never imports a higher one, and nothing imports in a circle.

Read with `ast` from the source, so that a function-level import cannot hide a dependency. Layers, from
the bottom (STYLE.md, "The math never sees the plumbing"; README.md, "Reading the code"):

    errors, config                     what everything shares
    io                                 files only: headers, maps, the hub, the test checkpoint
    weights                            stored bytes -> compute arrays, the memory plan, the array module
    chat, tokenizer                    text -> ids and back, chat templates
    inspection.tracing, .names         `tap`, the hook the forward pass calls, and the names it uses
    generation                         the decoding loop, given any model
    model                              the forward pass
    grad                               the backward pass, beside it
    inspection (edits, interp)         interventions and interpretability on a model's intermediates
    golden                             dumps, comparison, isolation: a second implementation, not the model's
    teaching                           the notebooks' grader, figures and port
    cli                                the command line
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwen2np"

# a part of qwen2np -> the parts it may import (besides itself; the standard library and NumPy always)
BASE = {"errors", "config"}
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "io": {"errors"},
    "weights": BASE | {"io"},
    "chat": {"errors"},
    "tokenizer": {"errors", "io", "chat"},
    "inspection.tracing": {"errors", "inspection.names", "weights"},
    "inspection.names": set(),
    "generation": BASE | {"weights", "tokenizer"},
    "model": BASE | {"io", "weights", "inspection.tracing", "inspection.names", "generation"},
    # the backward pass, beside the forward it differentiates
    "grad": BASE | {"io", "weights", "inspection.tracing", "inspection.names", "model"},
    "inspection": BASE | {"io", "weights", "tokenizer", "inspection.tracing", "inspection.names", "model"},
    # the golden tools judge the model: they never import it (recipes.py is a second implementation)
    "golden": BASE | {"io", "weights", "tokenizer", "inspection.tracing", "inspection.names"},
    "teaching": BASE | {"io", "weights", "chat", "tokenizer", "generation", "inspection.tracing", "inspection.names",
                        "model", "grad", "inspection", "golden"},
    "cli": BASE | {"io", "weights", "chat", "tokenizer", "generation", "inspection.tracing", "inspection.names",
                   "model", "inspection", "golden", "teaching", "grad", "root"},
    "root": set(),   # qwen2np/__init__.py and __main__.py: the lazy public names, anything
}
# golden/recipes.py recomputes each operation from a dump (with attention.py's attention, rotary.py's RoPE
# tables and rounding.py's half precision, in the rounding orders of orders.py), catalogue.py names known
# porting mistakes and mistakes.py replays them, metrics.py measures the difference: NumPy and the errors only,
# and each other
ISOLATED = {f"qwen2np.golden.{m}": {"errors"} for m in ("recipes", "attention", "orders", "catalogue", "mistakes",
                                                        "metrics", "rotary", "rounding")}
# imports allowed inside a function: optional dependencies, each imported only where it is needed
OPTIONAL = {"gguf", "cupy", "huggingface_hub", "matplotlib"}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module):
    """The layer a qwen2np module belongs to: `qwen2np.model.rope` -> "model"."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("__main__",):
        return "root"
    if parts[0] == "inspection" and len(parts) > 1 and parts[1] in ("tracing", "names"):
        return f"inspection.{parts[1]}"
    return parts[0]


def imports(path):
    """(line, imported qwen2np module, names, whether at module level) of every import in `path`."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            found.append((node.lineno, target, names, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                found.append((node.lineno, a.name, [], id(node) in top))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target, names):
    """The qwen2np modules an import statement really loads: `from qwen2np.model import masks` loads
    qwen2np.model.masks; `from qwen2np import Qwen2ForCausalLM` loads the module the lazy name points to."""
    if target == "qwen2np":
        import qwen2np

        return [qwen2np._EXPORTS[n] for n in names if n in qwen2np._EXPORTS] or ["qwen2np"]
    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return submodules or [target]


def edges():
    for module, path in MODULES.items():
        for line, target, names, at_top in imports(path):
            if target and (target == "qwen2np" or target.startswith("qwen2np.")):
                for t in resolve(target, names):
                    yield module, path, line, t, names, at_top


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for module, path, line, target, _, _ in edges():
        src, dst = part_of(module), part_of(target)
        allowed = ISOLATED.get(module, ALLOWED[src])
        if dst != src and dst != "root" and dst not in allowed and src != "root":
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} imports {target} ({dst})")
        if module in ISOLATED and target != "qwen2np" and dst not in ISOLATED[module] and target != module:
            if target not in ISOLATED:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} must share no code with {target}")
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    graph = {m: set() for m in MODULES}
    for module, _, _, target, _, _ in edges():
        if target in graph and target != module:
            graph[module].add(target)
    # a package's __init__ is imported before its submodules: a submodule importing its own package is
    # not a cycle unless __init__ imports it back, which the edges already show
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


def test_function_level_imports_are_optional_dependencies_only():
    wrong = []
    for module, path in MODULES.items():
        for line, target, names, at_top in imports(path):
            if not at_top and target.split(".")[0] not in OPTIONAL:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: import of {target} inside a function")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for module, path in MODULES.items():
        for line, target, names, _ in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad, expected", [
    ("qwen2np/io/stored.py", "io imports qwen2np.model.modeling (model)"),
    ("qwen2np/model/rope.py", "model imports qwen2np.golden.compare (golden)"),
])
def test_the_layering_test_catches_a_bad_import(bad, expected, monkeypatch):
    """The check itself: a planted upward import is reported."""
    import_line = {"qwen2np/io/stored.py": "from ..model import modeling\n",
                   "qwen2np/model/rope.py": "from ..golden.compare import compare_tensor\n"}[bad]
    path = PACKAGE.parent / bad
    original = imports

    def planted(p):
        found = original(p)
        if p == path:
            tree_target = import_line.split()[1]
            level = len(tree_target) - len(tree_target.lstrip("."))
            package = module_name(p).split(".")[:-1]
            base = ".".join(package[:len(package) - level + 1] + [tree_target.lstrip(".")])
            found.append((1, base, import_line.split("import ")[1].strip().split(", "), True))
        return found

    monkeypatch.setitem(globals(), "imports", planted)
    with pytest.raises(AssertionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        test_lower_layers_never_import_higher_ones()
