"""The `qwen2np` command line: one module per subcommand, each with `HELP`, `add_arguments` and `run`.

Subcommand modules are imported only when chosen, so `qwen2np tokenize` does not load the model code.
Any qwen2np error (bad flag value, missing file, checksum mismatch) prints one line and exits 1.
"""

import argparse
import importlib
import sys

from ..errors import Qwen2npError

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


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the command (exit status 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module(name):
    return importlib.import_module(f"qwen2np.cli.{name.replace('-', '_')}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="qwen2np", description="Qwen2 in pure NumPy.")
    from .. import __version__

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
    if args.command is None:
        parser.print_help()
        return 2
    from ..memory import apply_environment

    apply_environment(default=True)   # the command line owns its process: keep freed memory (memory.py)
    try:
        return _module(args.command).run(args) or 0
    except Qwen2npError as e:
        print(f"qwen2np {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
