"""The teaching notebooks (notebooks/*.ipynb): committed with their outputs, and those outputs still true.

Each notebook is executed in a fresh Jupyter kernel with nbclient (scripts/notebooks.py); a cell that
raises (the notebooks check their hand-made results against qwen2np's with asserts) fails the test,
naming the cell. The fresh outputs are then compared with the committed ones under the tolerance stated
in scripts/notebooks.py and notebooks/README.md (paths, durations, addresses and versions sanitised;
integers exact; printed decimals within one unit of their last digit plus 0.1 %; rounding errors
printed in scientific notation within a factor of 10; images of the same size within 2 %, pixels within
2 % on average; in cells tagged `nbcheck-rounding`, NMSE in dB within 10 dB; cells tagged
`nbcheck-varies` only by the kinds of their outputs).

The notebooks load the real test checkpoint through `resolve_model_path("test")`: the `test_gguf`
fixture's path is handed to the kernel in $QWEN2NP_TEST_CHECKPOINT, so in CI a missing checkpoint fails
these tests instead of skipping them.
"""

import base64
import copy
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def notebook_tools():
    """(nbformat, the scripts/notebooks.py module), or a skip (a failure in CI) naming the missing extra."""
    try:
        import nbformat
        from nbclient import NotebookClient  # noqa: F401
        import ipykernel  # noqa: F401  (the kernel nbclient starts)
        import matplotlib  # noqa: F401
    except ImportError as e:
        require(False, f"the notebook tools are not installed ({e}); pip install 'qwen2np[test]'")
    spec = importlib.util.spec_from_file_location("notebooks_script", ROOT / "scripts" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return nbformat, module


TEACHING = ["01_tokenizer.ipynb", "02_forward_pass.ipynb", "03_inspection.ipynb", "04_generation.ipynb",
            "05_porting_mistakes.ipynb", "06_training.ipynb"]   # the course, the gradients chapter last
EXERCISE = re.compile(r"^### Exercise (\d+\.\d+) · (.+?) · ([★☆]{3}) · about (\d+) min$", re.M)


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == TEACHING


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_from_one_clean_run(path):
    """Outputs present, execution counts 1, 2, 3, … (one top-to-bottom run in a fresh kernel), no error."""
    nbformat, script = notebook_tools()
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert script.committed_problems(nb, path.name) == []
    shown = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and re.search(r"^\s*plt\.show\(\)", c.source, re.M)]
    for index in shown:   # every plot is committed as an inline PNG
        assert any("image/png" in o.get("data", {}) for o in nb.cells[index].outputs), f"{path.name} cell {index}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_name_no_developer_path(path):
    """What a reader sees on GitHub shows no home folder or checkout path (sanitising is for the check,
    not an excuse)."""
    nbformat, script = notebook_tools()
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") + out.get("data", {}).get("text/plain", "")
            assert not re.search(r"/(?:root|home|work|tmp|Users)/", text), f"{path.name} cell {index}: {text[:200]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_listed_in_the_readme(path):
    assert path.name in (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_an_exercise_with_a_folded_solution(path):
    """A graded exercise (a call to one of qwen2np.teaching's grade_* functions), and its solution folded in
    <details>."""
    nbformat, _ = notebook_tools()
    nb = nbformat.read(path, as_version=4)
    graded = [c for c in nb.cells if c.cell_type == "code" and re.search(r"\bgrade_\w+\(", c.source)]
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert graded and solutions, path.name
    for cell in solutions:
        assert cell.cell_type == "markdown" and cell.source.startswith("<details>") and "```python" in cell.source


def exercises_of(nbformat, name):
    """[(number, title, stars, minutes, [the cells of the exercise])] of a notebook of the course."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        m = EXERCISE.match(cell.source) if cell.cell_type == "markdown" else None
        if m:
            found.append((m.group(1), m.group(2), m.group(3), int(m.group(4)), nb.cells[i:i + 4]))
    return found


@pytest.mark.parametrize("name", TEACHING)
def test_every_exercise_has_a_label_a_hint_a_graded_stub_and_a_folded_solution(name):
    """Task (numbered, difficulty ★ to ★★★, time), then a folded hint, a code cell that grades a stub (which
    the committed run shows as "not attempted yet"), and the folded solution, tagged for the tests."""
    nbformat, _ = notebook_tools()
    found = exercises_of(nbformat, name)
    assert found, name
    number = name[1]
    for k, (n, title, stars, minutes, (task, hint, stub, solution)) in enumerate(found, 1):
        where = f"{name} exercise {n}"
        assert n == f"{number}.{k}", f"{where}: exercises are numbered {number}.1, {number}.2, … in order"
        assert stars in ("★☆☆", "★★☆", "★★★") and 3 <= minutes <= 40, where
        assert hint.cell_type == "markdown" and hint.source.startswith("<details><summary>Hint"), where
        assert stub.cell_type == "code" and re.search(r"\bexercises\.grade_\w+\(|\bgrade_\w+\(", stub.source), where
        shown = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in stub.get("outputs", []))
        assert "not attempted yet" in shown or "wrong" in shown, (where, shown[:200])
        assert "solution" in solution.metadata.get("tags", []) and solution.source.startswith(
            "<details><summary>Solution"), where


def test_twenty_graded_exercises_listed_in_the_readme():
    nbformat, _ = notebook_tools()
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    rows = 0
    for name in TEACHING:
        for n, title, stars, minutes, _ in exercises_of(nbformat, name):
            row = f"| {n} | `{name}` | {title} | {stars} | {minutes} min |"
            assert row in readme, row
            rows += 1
    assert rows >= 20


# -- the output check itself ----------------------------------------------------------------------------


def _notebook(nbformat, *cells):
    """A notebook of code cells, each given as (source, [outputs]) with outputs already formed."""
    nb = nbformat.v4.new_notebook()
    for i, (source, outputs) in enumerate(cells, 1):
        cell = nbformat.v4.new_code_cell(source, execution_count=i)
        cell.outputs = outputs
        nb.cells.append(cell)
    return nb


def _stdout(nbformat, text):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def _png(nbformat, colour, size=(40, 30)):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buffer.getvalue()).decode()})


def test_the_output_check_accepts_what_may_differ_and_names_what_may_not():
    nbformat, script = notebook_tools()
    committed = _notebook(nbformat,
                          ("print(...)", [_stdout(nbformat, "loaded in 12.3 s from /root/.cache/m.gguf, qwen2np 0.1.0\n"),
                                          _stdout(nbformat, "p = 0.613, ids [9707, 1879], err 1.2e-07\n")]),
                          ("plot()", [_png(nbformat, (10, 20, 30))]))

    def fresh(text="p = 0.613, ids [9707, 1879], err 1.2e-07\n", colour=(10, 20, 30), size=(40, 30)):
        nb = copy.deepcopy(committed)
        nb.cells[0].outputs = [_stdout(nbformat, "loaded in 31.0 s from /home/ci/cache/m.gguf, qwen2np 0.2.0\n" + text)]
        nb.cells[1].outputs = [_png(nbformat, colour, size)]
        return nb

    # streams joined; durations, paths and versions sanitised; rounding-level changes accepted
    assert script.compare_notebooks(committed, fresh()) == []
    assert script.compare_notebooks(committed, fresh("p = 0.614, ids [9707, 1879], err 6.0e-07\n")) == []
    # a number out of tolerance, an id, a word, an image: each named with its cell
    [problem] = script.compare_notebooks(committed, fresh("p = 0.650, ids [9707, 1879], err 1.2e-07\n"), "nb")
    assert problem.startswith("nb code cell 1 (stream:stdout): the number 0.650 was 0.613")
    assert "the number 1880 was 1879" in script.compare_notebooks(committed, fresh("p = 0.613, ids [9707, 1880], err 1.2e-07\n"))[0]
    assert "reads 'q = #" in script.compare_notebooks(committed, fresh("q = 0.613, ids [9707, 1879], err 1.2e-07\n"))[0]
    assert "err 3.0e-05" not in str(script.compare_notebooks(committed, fresh("p = 0.613, ids [9707, 1879], err 3.0e-05\n")))
    assert script.compare_notebooks(committed, fresh("p = 0.613, ids [9707, 1879], err 3.0e-05\n"))
    assert "image differs by" in script.compare_notebooks(committed, fresh(colour=(200, 20, 30)))[0]
    assert "image of 60x30 pixels, committed 40x30" in script.compare_notebooks(committed, fresh(size=(60, 30)))[0]
    # a cell tagged nbcheck-rounding: NMSE in dB (negative, fixed notation) within 10 dB
    report = _notebook(nbformat, ("report", [_stdout(nbformat, "q_proj  3.3e-06  -148.9  2.0e-04  ok\n")]))
    moved = copy.deepcopy(report)
    moved.cells[0].outputs = [_stdout(nbformat, "q_proj  4.1e-06  -146.2  2.0e-04  ok\n")]
    assert "the number -146.2 was -148.9" in script.compare_notebooks(report, moved)[0]
    report.cells[0].metadata["tags"] = ["nbcheck-rounding"]
    assert script.compare_notebooks(report, moved) == []
    moved.cells[0].outputs = [_stdout(nbformat, "q_proj  4.1e-06  -120.0  2.0e-04  ok\n")]
    assert "the number -120.0 was -148.9" in script.compare_notebooks(report, moved)[0]
    # a cell tagged nbcheck-varies: only the kinds of its outputs
    committed.cells[1].metadata["tags"] = ["nbcheck-varies"]
    assert script.compare_notebooks(committed, fresh(colour=(200, 20, 30))) == []
    no_image = fresh()
    no_image.cells[1].outputs = []
    assert "outputs [], committed ['png']" in script.compare_notebooks(committed, no_image)[0]


def test_a_committed_notebook_must_come_from_one_clean_run():
    nbformat, script = notebook_tools()
    nb = _notebook(nbformat, ("1", [_stdout(nbformat, "1\n")]), ("2", [_stdout(nbformat, "2\n")]))
    assert script.committed_problems(nb) == []
    nb.cells[1].execution_count = 5
    assert "are not 1, 2, 3" in script.committed_problems(nb)[0]
    nb.cells[1].execution_count = 2
    nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[])]
    assert "committed with an error (AssertionError)" in script.committed_problems(nb)[0]


def test_the_kernel_prints_no_warnings_of_its_own(tmp_path):
    """ipykernel's TCP warning and debugpy's frozen-modules warning went to the test's stderr before: the
    kernel now runs over IPC with -X frozen_modules=off (scripts/notebooks.py's kernel_manager). Run in a
    process of its own, as a user runs the script: within the test process, the teardown of an earlier
    test's kernel client (zmq under tornado) could write to the same stderr."""
    nbformat, _ = notebook_tools()
    path = tmp_path / "one.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys._xoptions.get('frozen_modules'))"))
    nbformat.write(nb, path)
    run = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('nb', sys.argv[1]); "
           "nb = importlib.util.module_from_spec(spec); spec.loader.exec_module(nb); "
           "print(nb.execute(sys.argv[2])[0].cells[0].outputs[0]['text'], end='')")
    r = subprocess.run([sys.executable, "-c", run, str(ROOT / "scripts" / "notebooks.py"), str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "off\n", r.stdout + r.stderr
    assert r.stderr == "", r.stderr


@pytest.mark.slow
@pytest.mark.checkpoint
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_runs_and_its_committed_outputs_are_still_true(path, test_gguf):
    nbformat, script = notebook_tools()
    fresh, _, _ = script.execute(path, checkpoint=test_gguf)   # CellExecutionError names the failing cell
    problems = script.compare_notebooks(nbformat.read(path, as_version=4), fresh, path.name)
    assert not problems, ("the committed outputs no longer match a fresh run (rerun `python scripts/notebooks.py "
                          f"--write {path.stem}` if the change is intended):\n" + "\n".join(problems[:20]))
