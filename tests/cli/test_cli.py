"""The dispatcher (qwen2np/cli/__init__.py): whatever goes wrong in any command is one line on stderr and a
status that is not a verdict (0 and 1 are `compare`'s): 2 for bad input or environment, 3 for a bug, never a
traceback. Each case runs `python -m qwen2np` in a subprocess, the way a
user meets it; cases that need a failure the machine cannot make on demand (a full disk for a file, no
permission as root) patch the library inside the child with `python -c`."""

import errno
import os
import subprocess
import sys

import pytest

QWEN2NP = [sys.executable, "-m", "qwen2np"]


def run(args, env_extra=None, stdin=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "QWEN2NP_DEBUG"}
    env.update(env_extra or {})
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(args, stdin=stdin, stderr=subprocess.PIPE, env=env, timeout=300, **kwargs)


def one_line(r, code=2):
    """The stderr of a failed command: exactly one line, no traceback, the status `code` (2: bad input or
    environment)."""
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def patched(script, *args):
    """`qwen2np ARGS` in a child that first runs `script` (which patches the library)."""
    code = f"import sys\n{script}\nfrom qwen2np.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *args]


def test_a_closed_stdout_is_one_line():
    # the child's fd 1 is closed before Python starts (`qwen2np tokenize hi >&-`)
    r = run(QWEN2NP + ["tokenize", "hi"], stdout=None, preexec_fn=lambda: os.close(1))
    assert "stdout is closed" in one_line(r)


def test_a_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        r = run(QWEN2NP + ["tokenize", "hi"], stdout=full)
    assert one_line(r) == "qwen2np tokenize: error: cannot write to stdout: No space left on device"
    with open("/dev/full", "w") as full:  # what argparse prints counts too
        r = run(QWEN2NP + ["tokenize", "--help"], stdout=full)
    assert "cannot write to stdout: No space left on device" in one_line(r)


def test_a_broken_pipe_is_one_line():
    """`qwen2np tokenize ... | head -c1`, made deterministic: the reading end is closed before any write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = run(QWEN2NP + ["tokenize", "hi"], stdout=write_end)
    finally:
        os.close(write_end)
    assert one_line(r) == "qwen2np tokenize: error: cannot write to stdout: Broken pipe"


def test_a_stdout_that_cannot_encode_the_output_is_one_line():
    r = run(QWEN2NP + ["tokenize", "é"], env_extra={"PYTHONIOENCODING": "ascii"})
    assert "cannot write to stdout: its encoding (ascii) cannot represent" in one_line(r)


def test_text_that_is_not_utf8_is_one_line():
    r = run(QWEN2NP + [b"tokenize", b"ab\xffcd"])
    assert one_line(r) == "qwen2np tokenize: error: TEXT is not valid UTF-8: byte 0xff at character 2; give UTF-8 text"
    # the prompt is read before the model loads, so no model is needed to see the error
    r = run(QWEN2NP + ["generate", "--model", "/nonexistent", "-"], input=b"ok \xc3(")
    assert "the prompt on stdin is not valid UTF-8: byte 0xc3 at byte 3" in one_line(r)
    r = run(QWEN2NP + [b"generate", b"--model", b"/nonexistent", b"\xfe"])
    assert "PROMPT is not valid UTF-8: byte 0xfe" in one_line(r)
    r = run(QWEN2NP + [b"chat", b"--model", b"/nonexistent", b"--system", b"\xfe"])
    assert "--system is not valid UTF-8: byte 0xfe" in one_line(r)


def test_a_closed_stdin_is_one_line():
    for args in (["generate", "--model", "/nonexistent", "-"], ["chat", "--model", "/nonexistent"]):
        r = run(QWEN2NP + args, preexec_fn=lambda: os.close(0))
        assert "stdin is closed" in one_line(r)


def test_bad_paths_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in [
        (["fetch", "--cache-dir", str(a_file)], "Not a directory"),
        (["convert", str(a_file), str(tmp_path / "out")], "truncated: expected a GGUF header"),
        (["convert", str(tmp_path / "none.gguf"), str(tmp_path / "out")], "none.gguf"),
        (["tokenize", "--model", str(tmp_path), "hi"], "found no tokenizer files"),
        (["compare", str(tmp_path), str(tmp_path)], "not a dump"),
    ]:
        line = one_line(run(QWEN2NP + args))
        assert line.startswith(f"qwen2np {args[0]}: error:") and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_no_permission_is_one_line_naming_the_folder(tmp_path):
    # root ignores permission bits, so the refusal is made in the child: mkdir answers EACCES
    script = (f"import errno, os\n"
              f"def refuse(path, *a): raise PermissionError(errno.EACCES, 'Permission denied', str(path))\n"
              f"os.mkdir = refuse\n")
    r = run(patched(script, "dump", "--model", "/nonexistent", "--ids", "1", "--out", str(tmp_path / "out")))
    # the model is looked up first; with a model the failure is the folder's
    assert one_line(r).startswith("qwen2np dump: error:")
    r = run(patched(script + "import qwen2np.io.hub as h\nh.resolve_model_path = lambda p: p\n"
                    "import qwen2np.model.modeling as m\nfrom qwen2np import Qwen2Config\n"
                    "m.Qwen2ForCausalLM.from_pretrained = classmethod(lambda cls, p, **k: cls(Qwen2Config("
                    "vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,"
                    " num_key_value_heads=1)))\n",
                    "dump", "--model", "x", "--ids", "1", "--out", str(tmp_path / "out")))
    assert one_line(r) == f"qwen2np dump: error: cannot write {tmp_path / 'out'}: Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_status_130():
    script = "import qwen2np.cli.tokenize as t\ndef stop(args): raise KeyboardInterrupt\nt.run = stop\n"
    assert one_line(run(patched(script, "tokenize", "hi")), code=130) == "qwen2np tokenize: interrupted"


def test_an_unexpected_error_is_one_line_unless_debugging():
    """A bug is status 3, never 1: a port's CI reads 1 from `compare` as "out of tolerance"."""
    script = "import qwen2np.cli.tokenize as t\ndef bug(args): raise IndexError('a bug')\nt.run = bug\n"
    line = one_line(run(patched(script, "tokenize", "hi")), code=3)
    assert line == "qwen2np tokenize: internal error: IndexError: a bug (QWEN2NP_DEBUG=1 shows the traceback)"
    r = run(patched(script, "tokenize", "hi"), env_extra={"QWEN2NP_DEBUG": "1"})
    assert r.returncode == 3 and b"Traceback" in r.stderr and b"IndexError: a bug" in r.stderr
    script = "import qwen2np.cli.tokenize as t\ndef big(args): raise MemoryError\nt.run = big\n"
    assert one_line(run(patched(script, "tokenize", "hi"))) == "qwen2np tokenize: error: out of memory"


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "No space left on device"),
                                           (errno.EISDIR, "Is a directory"), (errno.EROFS, "Read-only file system")])
def test_os_errors_in_any_command_are_one_line(code, message):
    script = (f"import errno, os\nimport qwen2np.cli.tokenize as t\n"
              f"def fail(args): raise OSError({code}, os.strerror({code}), '/some/file')\nt.run = fail\n")
    assert one_line(run(patched(script, "tokenize", "hi"))) == f"qwen2np tokenize: error: /some/file: {message}"


def test_usage_errors_are_status_2():
    for args in (["tokenize"], ["nosuchcommand"], ["dump", "--out", "x"], ["convert", "a", "b", "--dtype", "int3"]):
        assert one_line(run(QWEN2NP + args), code=2).startswith("qwen2np")


def test_bytes_of_argv_that_are_not_utf8_are_printed_back_as_they_came():
    """A path given in bytes that are not UTF-8 (legal on Linux) comes back on stdout byte for byte."""
    script = "import qwen2np.cli.fetch as f\ndef run(args): print(args.cache_dir)\nf.run = run\n"
    r = run(patched(script, b"fetch", b"--cache-dir", b"/tmp/caf\xe9"))
    assert r.returncode == 0 and r.stdout == b"/tmp/caf\xe9\n" and r.stderr == b""


def test_only_compare_gives_a_verdict_of_1():
    """Whatever a command returns or raises, the dispatcher gives 0 and 1 only as verdicts: an error of any
    kind is 2 (bad input, an OS error, out of memory) or 3 (a bug)."""
    cases = {"raise DumpError('bad')": 2, "raise OSError(errno.EIO, 'I/O error')": 2, "raise MemoryError": 2,
             "raise ValueError('slice step cannot be zero')": 3, "raise RecursionError('deep')": 3,
             "raise OverflowError('Python int too large')": 3}
    for body, code in cases.items():
        script = ("import errno\nfrom qwen2np.errors import DumpError\nimport qwen2np.cli.compare as c\n"
                  f"def fail(args): {body}\nc.run = fail\n")
        assert one_line(run(patched(script, "compare", "a", "b")), code=code).startswith("qwen2np compare: ")
