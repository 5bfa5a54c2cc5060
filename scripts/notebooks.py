"""Execute the teaching notebooks, store their outputs, and check that committed outputs are still true.

    python scripts/notebooks.py --write [NAME ...]   execute, write the outputs into the .ipynb files, and
                                                     print each notebook's run time and peak memory
    python scripts/notebooks.py --check [NAME ...]   execute into memory and compare with what is committed

The notebooks are committed *with* their outputs, so that a reader browsing the repository sees the
numbers and the plots; tests/teaching/test_notebooks.py runs the check on every notebook in CI. What "the same
output" means (also in notebooks/README.md):

* Each code cell must produce the same outputs, in the same order, of the same kinds (stdout and stderr
  text, results, displays, PNG images). Consecutive stream outputs are joined first (how a print is
  split into messages is not part of the output), and execution counts are not compared; the committed
  ones must run 1, 2, 3, … (the notebook was run top to bottom in one kernel).
* Text is compared after sanitising what legitimately differs between machines and runs: absolute
  paths (`<path>`), memory addresses (`0x…`), durations such as `12.3 s` or `85 ms` (`<time>`) and
  version numbers such as `0.1.0` (`<version>`). Then the text without its numbers must be identical,
  and the numbers must agree:
    - integers (ids, counts, shapes): exactly;
    - numbers written in fixed notation (`0.613`, `61.3%`): within one unit of the last digit printed
      plus 0.1 % (a value on a rounding boundary may print either way);
    - numbers written in scientific notation (`1.2e-07`): these are the sizes of rounding errors in
      these notebooks, which depend on the BLAS kernels of the machine; within a factor of 10, and
      zero only where the other is zero.
* A PNG must have the same size within 2 % on each side; when the sizes are equal, the mean absolute
  pixel difference must be at most 2 % of full scale (matplotlib's antialiasing differs slightly
  between versions; a changed plot moves far more).
* A cell tagged `nbcheck-rounding` prints `compare` reports of float rounding (float32 against
  float64, a port against qwen2np): there the NMSE in decibels (the negative numbers in fixed notation)
  is compared within 10 dB, the same factor of 10 as the errors themselves; everything else as above.
* A cell tagged `nbcheck-varies` (timings and memory measured live, e.g. the KV cache's speed) is
  checked for the kinds and number of its outputs only.
"""

import argparse
import base64
import io
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
VARIES = "nbcheck-varies"
ROUNDING = "nbcheck-rounding"
# Seconds per cell: a cell takes at most ~30 s on a quiet 2-core machine (loading the GGUF); the machines
# are shared, so the limit leaves a wide margin and only catches a cell that hangs.
CELL_TIMEOUT = 900

_SANITISE = [
    (re.compile(r"0x[0-9a-fA-F]{6,}"), "0x…"),
    (re.compile(r"(?<![\w.])\d+\.\d+\.\d+(?:[.+\-][0-9A-Za-z]+)*"), "<version>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:/[\w.\-@+]+){2,}/?"), "<path>"),
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|µs|us|ns|s|min|seconds)(?![\w/])"), "<time>"),
]
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])|\b(?:nan|inf)\b")


def sanitise(text):
    """Text with paths, memory addresses, durations and versions replaced by placeholders.

    >>> sanitise("loaded in 12.3 s from /root/.cache/x.gguf at 0x7f3a2b1c9d10, qwen2np 0.1.0")
    'loaded in <time> from <path> at 0x…, qwen2np <version>'
    """
    for pattern, placeholder in _SANITISE:
        text = pattern.sub(placeholder, text)
    return text


def split_numbers(text):
    """(the text with each number replaced by `#`, the numbers as strings).

    >>> split_numbers("p = 0.613, top-5 [9707, 1879] err 1.2e-07")
    ('p = #, top-# [#, #] err #', ['0.613', '5', '9707', '1879', '1.2e-07'])
    """
    numbers = _NUMBER.findall(text)
    return _NUMBER.sub("#", text), numbers


def numbers_agree(a, b, rounding=False):
    """Whether two printed numbers agree under the stated tolerance (module docstring); `rounding` for a
    cell tagged nbcheck-rounding.

    >>> numbers_agree("0.613", "0.614"), numbers_agree("0.613", "0.62"), numbers_agree("3", "4")
    (True, False, False)
    >>> numbers_agree("1.2e-07", "8.0e-07"), numbers_agree("1.2e-07", "2.0e-05"), numbers_agree("0.0e+00", "1e-9")
    (True, False, False)
    >>> numbers_agree("-117.4", "-116.2"), numbers_agree("-117.4", "-116.2", rounding=True), numbers_agree("-117.4", "-104.0", rounding=True)
    (False, True, False)
    """
    if a == b:
        return True
    if a in ("nan", "inf") or b in ("nan", "inf"):
        return False
    x, y = float(a), float(b)
    scientific = "e" in a.lower() or "e" in b.lower()
    fixed = "." in a or "." in b
    if scientific:
        if x == 0 or y == 0 or (x < 0) != (y < 0):
            return x == y
        return max(abs(x), abs(y)) <= 10 * min(abs(x), abs(y))
    if not fixed:
        return False                                       # integers: exactly
    if rounding and (x < 0 or y < 0):
        return abs(x - y) <= 10                            # NMSE in dB: within a factor of 10
    decimals = max(len(s.split(".")[1]) if "." in s else 0 for s in (a, b))
    return abs(x - y) <= 1.5 * 10.0 ** -decimals + 1e-3 * max(abs(x), abs(y))


def _outputs(cell):
    """The cell's outputs as comparable items: ("stream:stdout", text), ("text", text), ("png", bytes)."""
    items = []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            key = f"stream:{out['name']}"
            if items and items[-1][0] == key:
                items[-1] = (key, items[-1][1] + out["text"])
            else:
                items.append((key, out["text"]))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "image/png" in data:
                items.append(("png", base64.b64decode(data["image/png"])))
            elif "text/plain" in data:
                items.append(("text", data["text/plain"]))
        elif kind == "error":
            items.append(("error", f"{out['ename']}: {out['evalue']}"))
    return items


def _compare_text(where, a, b, rounding=False):
    (ta, na), (tb, nb) = split_numbers(sanitise(a)), split_numbers(sanitise(b))
    if ta != tb or len(na) != len(nb):
        lines_a, lines_b = ta.splitlines(), tb.splitlines()
        for i, (la, lb) in enumerate(zip(lines_a, lines_b)):
            if la != lb:
                return [f"{where}: line {i + 1} reads {lb!r}, committed {la!r}"]
        return [f"{where}: {len(lines_b)} lines, committed {len(lines_a)}"]
    bad = [(x, y) for x, y in zip(na, nb) if not numbers_agree(x, y, rounding)]
    if bad:
        x, y = bad[0]
        return [f"{where}: the number {y} was {x} when committed ({len(bad)} number(s) out of tolerance)"]
    return []


def _compare_png(where, a, b):
    import numpy as np
    from PIL import Image

    ia, ib = Image.open(io.BytesIO(a)).convert("RGB"), Image.open(io.BytesIO(b)).convert("RGB")
    if ia.size != ib.size:
        (wa, ha), (wb, hb) = ia.size, ib.size
        if abs(wa - wb) > 0.02 * wa or abs(ha - hb) > 0.02 * ha:
            return [f"{where}: image of {wb}x{hb} pixels, committed {wa}x{ha}"]
        return []
    diff = np.abs(np.asarray(ia, dtype=np.int16) - np.asarray(ib, dtype=np.int16)).mean() / 255
    return [f"{where}: image differs by {diff:.1%} of full scale on average (tolerance 2%)"] if diff > 0.02 else []


def compare_notebooks(committed, fresh, name="notebook"):
    """Differences between the outputs of a committed notebook and a fresh execution of it: a list of
    one-line messages, empty when they agree."""
    problems = []
    code_a = [c for c in committed.cells if c.cell_type == "code"]
    code_b = [c for c in fresh.cells if c.cell_type == "code"]
    if [c.source for c in code_a] != [c.source for c in code_b]:
        return [f"{name}: the executed notebook has other code than the committed one"]
    for index, (a, b) in enumerate(zip(code_a, code_b)):
        where = f"{name} code cell {index + 1}"
        ia, ib = _outputs(a), _outputs(b)
        if [k for k, _ in ia] != [k for k, _ in ib]:
            problems.append(f"{where}: outputs {[k for k, _ in ib]}, committed {[k for k, _ in ia]}")
            continue
        tags = a.get("metadata", {}).get("tags", [])
        if VARIES in tags:
            continue
        for (kind, x), (_, y) in zip(ia, ib):
            problems += _compare_png(where, x, y) if kind == "png" else \
                _compare_text(f"{where} ({kind})", x, y, ROUNDING in tags)
    return problems


def committed_problems(nb, name="notebook"):
    """What is wrong with a committed notebook on its own: not run top to bottom, errors, no outputs."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    problems = []
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"{name}: execution counts {counts[:12]}… are not 1, 2, 3, …: run it top to bottom in a "
                        f"fresh kernel (python scripts/notebooks.py --write)")
    for index, cell in enumerate(code):
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                problems.append(f"{name} code cell {index + 1}: committed with an error ({out['ename']})")
    if not any(c.get("outputs") for c in code):
        problems.append(f"{name}: committed without outputs")
    return problems


def kernel_manager(folder):
    """A manager for a fresh python3 kernel that prints no warnings of its own on stderr, so that what the
    notebook check shows on stderr is the notebooks' (a real error is never hidden: it is an error output):

    * over IPC (Unix sockets in `folder`), not TCP: ipykernel warns on every start that a TCP kernel
      without CurveZMQ keys is unencrypted;
    * with `-X frozen_modules=off`: debugpy, which ipykernel imports, warns on Python >= 3.11 that frozen
      modules may make it miss breakpoints.
    """
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(folder) / "kernel"))
    spec = km.kernel_spec
    if "-Xfrozen_modules=off" not in spec.argv:
        spec.argv = [spec.argv[0], "-Xfrozen_modules=off", *spec.argv[1:]]
    return km


def execute(path, checkpoint=None, measure=False):
    """Run the notebook at `path` in a fresh kernel (its folder as the working directory): (notebook,
    wall seconds, and unless `measure` is false, {"peak": the kernel's peak resident memory in bytes,
    "cpu": the kernel's CPU seconds, user + system}; else None)."""
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # the kernel imports qwen2np from this checkout, whatever else is installed (its working directory is
    # notebooks/, which would not put the checkout on sys.path)
    path_entries = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join(path_entries))
    if checkpoint is not None:
        env["QWEN2NP_TEST_CHECKPOINT"] = str(checkpoint)
    if measure:   # one more cell, removed again: the peak resident memory of the kernel and of its children
        nb.cells.append(nbformat.v4.new_code_cell(
            "import resource; r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN); "
            "print(r.ru_maxrss, c.ru_maxrss, r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime)"))
    saved = dict(os.environ)
    os.environ.update(env)            # the kernel inherits the environment of this process
    with tempfile.TemporaryDirectory(prefix="qwen2np-kernel-") as sockets:
        km = kernel_manager(sockets)
        client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False, record_timing=True,
                                coalesce_streams=True,    # a streamed print is one output
                                resources={"metadata": {"path": str(Path(path).parent)}})
        try:
            start = time.perf_counter()
            client.execute()          # raises CellExecutionError (the cell and its traceback) on any error
            seconds = time.perf_counter() - start
        finally:
            if km.has_kernel:
                km.shutdown_kernel(now=False)
            os.environ.clear()
            os.environ.update(saved)
    usage = None
    if measure:
        kib, child_kib, cpu = nb.cells.pop().outputs[0]["text"].split()
        # ru_maxrss is in KiB on Linux; for the children, the largest peak of any one of them (a command the
        # notebook runs). Linux keeps a process's high-water mark across exec, so a command forked from the
        # kernel reports at least the kernel's size at the fork: an upper bound, not the command's own peak
        # (measure that alone, e.g. with /usr/bin/time -v)
        usage = {"peak": int(kib) * 1024, "peak_child": int(child_kib) * 1024, "cpu": float(cpu)}
    cells = []
    for index, cell in enumerate(nb.cells):   # wall seconds per code cell; timestamps are not committed
        timing = cell.get("metadata", {}).pop("execution", None)
        if timing and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            from datetime import datetime

            start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            cells.append(((end - start).total_seconds(), index, cell.source.splitlines()[0][:60]))
    if usage is not None:
        usage["cells"] = sorted(cells, reverse=True)
    return nb, seconds, usage


def notebooks(names=()):
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if names:
        paths = [p for p in paths if p.stem in names or p.name in names or any(p.stem.startswith(n) for n in names)]
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="execute and store the outputs in the notebooks")
    mode.add_argument("--check", action="store_true", help="execute and compare with the committed outputs")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all), e.g. 04 or 04_generation")
    args = parser.parse_args(argv)
    import nbformat

    failed = False
    rows = []
    load = os.getloadavg()[0]
    for path in notebooks(args.names):
        fresh, seconds, usage = execute(path, measure=True)
        rows.append((path.name, seconds, usage))
        print(f"{path.name}: {seconds:.0f} s, {usage['cpu']:.0f} CPU s, peak {usage['peak'] / 2**30:.1f} GiB "
              f"(a child process, at most: {usage['peak_child'] / 2**30:.1f} GiB); "
              f"slowest cells: " + ", ".join(f"{i} ({t:.0f} s: {line!r})" for t, i, line in usage["cells"][:4]),
              file=sys.stderr)
        if args.write:
            tmp = path.with_name(path.name + ".tmp")
            nbformat.write(fresh, tmp)
            tmp.replace(path)          # whole or not at all
        else:
            problems = compare_notebooks(nbformat.read(path, as_version=4), fresh, path.name)
            for p in problems:
                print(p)
            failed |= bool(problems)
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| notebook | wall time | CPU time | peak memory (kernel) | peak memory (a command it runs, at most) |\n|---|---|---|---|---|")
    for name, seconds, usage in rows:
        child = f"{usage['peak_child'] / 2**30:.1f} GiB" if usage["peak_child"] > 2**28 else "-"
        print(f"| `{name}` | {seconds:.0f} s | {usage['cpu']:.0f} s | {usage['peak'] / 2**30:.1f} GiB | {child} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
