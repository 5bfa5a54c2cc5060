"""`qwen2np convert` on a tiny GGUF built in the test (the real file is in tests/io/test_gguf_oracle.py), and the
one-line errors of the io commands. `qwen2np fetch` is tested in test_fetch.py."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from qwen2np.cli import main
from qwen2np.weights.store import load_checkpoint
from qwen2np.io.gguf_header import minimal_gguf_bytes
from qwen2np.io.safetensors_file import is_memory_mapped
from support.tiny_gguf import qwen2_metadata, tiny_tensors


@pytest.fixture(scope="module")
def tiny(gguf, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    path.write_bytes(minimal_gguf_bytes(qwen2_metadata(**{"tokenizer.chat_template": "{{ messages }}"}),
                                        tiny_tensors(gguf)))
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_convert_writes_a_hugging_face_folder(tiny, tmp_path, dtype):
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out), "--dtype", dtype]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "merges.txt",
                                                      "model.safetensors", "tokenizer_config.json", "vocab.json"]
    source = load_checkpoint(tiny)
    converted = load_checkpoint(out)
    assert converted.config == {**source.config, "architectures": ["Qwen2ForCausalLM"], "dtype": dtype}
    assert converted.generation_config == source.generation_config
    for name, w in source.tensors.items():
        rounded = w if dtype == "float32" else w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        np.testing.assert_array_equal(converted.tensors[name], rounded.astype(np.float32))
        assert is_memory_mapped(converted.tensors[name]) == (dtype == "float32")


def test_converted_tokenizer_files(tiny, tmp_path):
    from qwen2np.tokenizer import Qwen2Tokenizer

    main(["convert", str(tiny), str(tmp_path)])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages }}" and config["eos_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"]["39"] == {"content": "<tool_call>", "special": False, "lstrip": False,
                                                    "rstrip": False, "single_word": False, "normalized": False}
    assert (tmp_path / "merges.txt").read_text() == "#version: 0.2\na a\nb b\n"
    from_folder = Qwen2Tokenizer.from_pretrained(tmp_path)
    from_gguf = Qwen2Tokenizer.from_pretrained(tiny)
    assert from_folder.get_vocab() == from_gguf.get_vocab() and len(from_folder) == len(from_gguf) == 40
    assert from_folder.encode("aab<tool_call>") == from_gguf.encode("aab<tool_call>")


def test_convert_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(tmp_path / "no.gguf"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "qwen2np convert: error:" in result.stderr
    assert "no.gguf" in result.stderr


def test_convert_rejects_a_bad_dtype(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", str(tiny), str(tmp_path), "--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


def test_convert_never_mixes_old_and_new_files(tiny, tmp_path):
    """An old folder's tokenizer.json (which takes precedence over vocab.json) must not survive a convert."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "chat_template.jinja").write_text("old template")
    r = subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(tiny), str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the folder holds files (chat_template.jinja, tokenizer.json); pass overwrite=True (--overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "tokenizer.json"]
    assert main(["convert", str(tiny), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "merges.txt",
                                                      "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_convert_that_fails_while_writing_leaves_the_old_folder(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = ("import errno, sys, qwen2np.tokenizer.gguf as g\n"
              "def full(folder, kwargs):\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "g.write_tokenizer_files = full\n"  # the weights are written by then, the tokenizer fails
              "from qwen2np.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "convert", str(tiny), str(out), "--dtype", "float16",
                        "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        f"qwen2np convert: error: cannot write {out}: No space left on device"] and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_onto_a_file_is_one_line(tiny, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    r = subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(tiny), str(target), "--overwrite"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "expected a folder to write into, found a file" in r.stderr and target.read_text() == "x"


def test_convert_refuses_what_is_not_a_file(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    for source, found in ((fifo, "not a regular file"), (tmp_path, "a folder"), (tmp_path / "none.gguf", "no such file")):
        r = subprocess.run([sys.executable, "-m", "qwen2np", "convert", str(source), str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr == f"qwen2np convert: error: {source}: expected a GGUF file, found {found}\n"


@pytest.mark.parametrize("command", ["convert", "dump"])
def test_sigterm_while_writing_leaves_no_temporary_folder(tiny, tmp_path, command):
    """A timeout or a cancelled CI job sends SIGTERM: the command stops as Ctrl-C stops it, with one line
    and exit status 143, the half-written folder removed and an existing one untouched."""
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    folder = tmp_path / "model"
    assert main(["convert", str(tiny), str(folder)]) == 0
    # every file is written into the temporary folder; the command waits (for the signal) before the swap
    script = ("import sys, time, qwen2np.io.folders as folders\n"
              "def slow(*a, **k):\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n"
              "folders._swap_in = slow\n"
              "from qwen2np.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    args = (["convert", str(tiny), str(out)] if command == "convert" else
            ["dump", "--model", str(folder), "--ids", "1,2,3", "--out", str(out)]) + ["--overwrite"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.splitlines()[-1] == f"qwen2np {command}: terminated", err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
