"""The `qwen2np` command line: one module per subcommand, each with `HELP`, `add_arguments` and `run`.

Subcommand modules are imported only when chosen, so `qwen2np tokenize` does not load the model code.

Every failure a user can cause ends in one line on stderr, `qwen2np COMMAND: error: ...`, never a
traceback. The exit status says which kind of outcome it was; 0 and 1 are verdicts, and only a verdict
is 0 or 1, so that a CI job that reads `compare`'s status never takes a failure to run for a numerical one:

* 0: done (`compare`: every tensor within tolerance);
* 1: `compare` only: a tensor (or, with `--isolate`, an operation) out of tolerance;
* 2: bad input or environment: a usage error (an unknown flag, a malformed flag value, reported by
  argparse), any qwen2np error (a missing file, a corrupt checkpoint or dump, bad `--ids`), an OS error
  (no permission, a full disk, `--out` naming a file, stdout closed, full or a broken pipe), running out
  of memory;
* 3: an internal error, a bug: one line naming the exception's type (with QWEN2NP_DEBUG=1, its traceback
  instead);
* 130: Ctrl-C (`qwen2np COMMAND: interrupted`); 143: SIGTERM (`qwen2np COMMAND: terminated`), as sent by a
  timeout or a cancelled CI job. Both stop the command as an exception would, so a folder being written
  (`convert`, `dump`) is removed and the old one is left as it was.

What the command line changes for its own process (a library call never does): while a command runs,
`sys.stdout` is wrapped so that a failed write says it was stdout; after such a failure, file
descriptor 1 is pointed at /dev/null so that Python's exit-time flush does not print "Exception
ignored ... BrokenPipeError"; SIGTERM raises `Terminated` in the main thread, as SIGINT raises
KeyboardInterrupt (the previous handler is restored when the command returns); a standard stream closed at start (`>&-`, `<&-`) gets /dev/null in its
place so that no file the command opens takes its descriptor.
"""

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import traceback

from .. import __version__
from ..errors import Qwen2npError
from ..weights.system import apply_environment

# subcommand -> one-line help; the module qwen2np.cli.<name> implements it
COMMANDS = {
    "tokenize": "show how the tokenizer splits a text: pieces and ids",
    "generate": "generate text from a prompt with a checkpoint",
    "chat": "talk to a checkpoint through its chat template",
    "convert": "convert a GGUF file into a Hugging Face folder",
    "fetch": "download, verify and assemble the test checkpoint",
    "dump": "write named intermediate tensors of a forward pass (golden values)",
    "compare": "compare two dumps tensor by tensor and name the first divergence",
}
# the commands whose result is what they print on stdout: they refuse to run with stdout closed
_WRITES_STDOUT = {"tokenize", "generate", "chat", "fetch", "compare"}
# exit statuses (the module docstring): 0 and 1 are verdicts, the others say why there is none
OK, OUT_OF_TOLERANCE, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED, TERMINATED = 0, 1, 2, 3, 130, 143


class CommandLineError(Qwen2npError, ValueError):
    """An argument or a standard stream the command cannot use: text that is not valid UTF-8, stdin or
    stdout closed, stdout unable to encode the output."""


class Terminated(BaseException):
    """SIGTERM arrived: raised like KeyboardInterrupt, so that every `finally` and `with` block runs."""


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises `Terminated` in the main thread (where signals arrive)."""
    def terminate(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the command (exit status 2), not a usage block."""

    def error(self, message):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):  # argparse would drop a failed write of --help silently
        if message:
            (file or sys.stderr).write(message)


class _Stdout:
    """`sys.stdout` while a command runs: a failed write raises an error that says it was stdout."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            try:
                return self._stream.write(text)
            except UnicodeEncodeError as e:
                if "\udc80" <= e.object[e.start] <= "\udcff" and hasattr(self._stream, "buffer"):
                    # bytes of argv that were not UTF-8 (a path, say), given back as they came
                    self._stream.flush()
                    self._stream.buffer.write(text.encode(self._stream.encoding, "surrogateescape"))
                    return len(text)
                raise
        except OSError as e:
            raise _stdout_error(e) from None
        except UnicodeEncodeError as e:
            raise CommandLineError(
                f"cannot write to stdout: its encoding ({self._stream.encoding}) cannot represent "
                f"{e.object[e.start:e.end]!r}; set PYTHONIOENCODING=utf-8") from None

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            raise _stdout_error(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_error(e):
    error = OSError(e.errno, f"cannot write to stdout: {e.strerror or e}")  # OSError(EPIPE, ...): a BrokenPipeError
    error.from_stdout = True
    return error


def check_text(value, what):
    """`value` itself, or a CommandLineError when it came from bytes that are not UTF-8 (Python keeps such
    bytes of argv and stdin as lone surrogates, U+DC80..U+DCFF).

    >>> check_text("héllo", "TEXT")
    'héllo'
    >>> check_text("ab\\udcff", "TEXT")
    Traceback (most recent call last):
    ...
    qwen2np.cli.CommandLineError: TEXT is not valid UTF-8: byte 0xff at character 2; give UTF-8 text
    """
    for i, ch in enumerate(value):
        if "\ud800" <= ch <= "\udfff":
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"U+{ord(ch):04X}"
            raise CommandLineError(f"{what} is not valid UTF-8: {byte} at character {i}; give UTF-8 text")
    return value


def decode_utf8(data, what):
    """`data` (bytes) as text, or a CommandLineError naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CommandLineError(f"{what} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start} "
                               f"({e.reason}); give UTF-8 text") from None


def _module(name):
    return importlib.import_module(f"qwen2np.cli.{name.replace('-', '_')}")


def _say(line):
    """One line on stderr; a stderr that cannot be written to is given up on quietly."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _describe_os_error(e):
    text = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        text = f"{e.filename}: {text}" if e.filename2 is None else f"{e.filename} -> {e.filename2}: {text}"
    return text


def _plug_closed_fd(fd, mode):
    """Open /dev/null on `fd` if it is closed, so that no file the command opens takes that number."""
    try:
        os.fstat(fd)
    except OSError:
        try:
            opened = os.open(os.devnull, mode)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
        except OSError:
            pass


def _silence_stdout():
    """After stdout failed: point fd 1 at /dev/null, so that the exit-time flush of what is still
    buffered does not fail again with an "Exception ignored" message."""
    if sys.__stdout__ is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv=None):
    """Run one command; return its exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    real_stdout = sys.stdout
    command = None
    prefix = "qwen2np"
    if real_stdout is None:
        _plug_closed_fd(1, os.O_WRONLY)
    if sys.stdin is None:
        _plug_closed_fd(0, os.O_RDONLY)
    sys.stdout = _Stdout(real_stdout) if real_stdout is not None else None
    try:
        try:
            parser, args = _parse(argv)
            command = args.command
            if command is None:
                parser.print_help()
                return BAD_INPUT
            prefix = f"qwen2np {command}"
            if real_stdout is None and command in _WRITES_STDOUT:
                raise CommandLineError("stdout is closed: this command prints its result there; "
                                       "redirect it to a file or /dev/null instead of closing it")

            apply_environment(default=True)   # the command line owns its process: keep freed memory (weights/system.py)
            with _sigterm_raises():
                status = _module(command).run(args) or OK
            if sys.stdout is not None:
                sys.stdout.flush()  # a full disk or a closed pipe shows here, not at exit
            return status
        except Qwen2npError as e:
            _say(f"{prefix}: error: {e}")
            return BAD_INPUT
        except OSError as e:
            _say(f"{prefix}: error: {_describe_os_error(e)}")
            if getattr(e, "from_stdout", False):
                _silence_stdout()
            return BAD_INPUT
        except MemoryError as e:
            _say(f"{prefix}: error: out of memory{f' ({e})' if str(e) else ''}")
            return BAD_INPUT
        except KeyboardInterrupt:
            _say(f"{prefix}: interrupted")
            return INTERRUPTED
        except Terminated:
            _say(f"{prefix}: terminated")
            return TERMINATED
        except Exception as e:  # a bug: still one line, unless asked for the traceback
            if os.environ.get("QWEN2NP_DEBUG") == "1":
                traceback.print_exc()
            else:
                _say(f"{prefix}: internal error: {type(e).__name__}: {e} (QWEN2NP_DEBUG=1 shows the traceback)"[:2000])
            return INTERNAL_ERROR
    except SystemExit:  # argparse: --help, --version (0) or a usage error (2); what it printed must reach stdout
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
        except OSError as e:
            _say(f"{prefix}: error: {_describe_os_error(e)}")
            _silence_stdout()
            raise SystemExit(BAD_INPUT) from None
        raise
    except KeyboardInterrupt:  # Ctrl-C while reporting
        return INTERRUPTED
    except Terminated:
        return TERMINATED
    finally:
        if sys.stdout is not None and isinstance(sys.stdout, _Stdout):
            sys.stdout = real_stdout


def _parse(argv):
    parser = _Parser(prog="qwen2np", description="Qwen2 in pure NumPy.")

    parser.add_argument("--version", action="version", version=f"qwen2np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    subparsers = {}
    for name, help_text in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            _module(name).add_arguments(subparsers[name])
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would report a subcommand's unknown flags as the top-level command's
        (subparsers.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return parser, args
