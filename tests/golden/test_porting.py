"""docs/porting.md works as written: its dump writer in C compiles, runs, and writes a dump that qwen2np reads
back bit for bit and compares; its commands name real flags."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.golden.compare import compare_dumps
from qwen2np.golden.dump import read_dump
from qwen2np.golden.record import record_dump

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "porting.md"


def c_writer_source():
    """The C source between the guide's `<!-- dump_writer.c -->` markers."""
    text = GUIDE.read_text(encoding="utf-8")
    block = re.search(r"<!-- dump_writer\.c -->\s*```c\n(.*?)```\s*<!-- /dump_writer\.c -->", text, re.S)
    assert block, "docs/porting.md has no C block between <!-- dump_writer.c --> markers"
    return block.group(1)


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    require(compiler is not None, "no C compiler (cc or gcc) to build docs/porting.md's dump writer")
    folder = tmp_path_factory.mktemp("c")
    (folder / "dump_writer.c").write_text(c_writer_source())
    r = subprocess.run([compiler, "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-O2", "-Wall", "-Wextra", "-Werror",
                        "-o", str(folder / "dump_writer"), str(folder / "dump_writer.c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return folder / "dump_writer"


def test_the_c_writer_writes_a_dump_qwen2np_reads_back(writer, tmp_path):
    """A tiny model's every intermediate, prefill and two decode steps, through the C writer: the same
    manifest facts and the same values, bit for bit."""
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), seed=3)
    ids = [3, 4, 5, 6, 7, 8]
    golden = record_dump(model, [ids], decode_steps=2, fingerprint=None)
    args = []
    for _, entry in golden.entries():
        raw = tmp_path / f"{entry['key'].replace('@', '_')}.f32"
        np.ascontiguousarray(golden[entry["key"]], dtype="<f4").tofile(raw)
        args.append(f"{entry['key']}:{'x'.join(map(str, entry['shape']))}:{raw}")
    r = subprocess.run([str(writer), str(tmp_path / "mine"), ",".join(map(str, ids)), "2", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mine = read_dump(tmp_path / "mine")
    assert mine.manifest["input_ids"] == [ids] and mine.manifest["producer"] == "dump_writer.c (docs/porting.md)"
    assert [(p["start"], p["length"]) for p in mine.passes] == [(0, 4), (4, 1), (5, 1)]
    assert [e["key"] for _, e in mine.entries()] == [e["key"] for _, e in golden.entries()]
    c = compare_dumps(mine, golden)
    assert c.ok and all(t.max_abs == 0 for t in c.tensors) and len(c.tensors) == 3 * len(model.intermediate_names())


def test_the_guide_names_real_flags():
    """Every `--flag` the guide shows for qwen2np compare/dump and the dump scripts exists."""
    text = GUIDE.read_text(encoding="utf-8")
    helps = {
        "qwen2np compare": subprocess.run([sys.executable, "-m", "qwen2np", "compare", "--help"], capture_output=True,
                                          text=True, cwd=ROOT).stdout,
        "qwen2np dump": subprocess.run([sys.executable, "-m", "qwen2np", "dump", "--help"], capture_output=True,
                                       text=True, cwd=ROOT).stdout,
    }
    for command, help_text in helps.items():
        for line in re.findall(rf"^{command} .*$", text, re.M):
            for flag in re.findall(r"(--[a-z][a-z0-9-]*)", line):
                assert flag in help_text, f"docs/porting.md: `{command}` has no {flag}"
