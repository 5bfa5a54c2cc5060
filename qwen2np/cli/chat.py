"""`qwen2np chat --model PATH`: talk to a checkpoint, one turn after another, through its chat template.

Type a message and press Enter; the answer streams back. The whole history is sent each turn.
`/reset` forgets the history, `/exit` (or Ctrl-D) ends the session with status 0, Ctrl-C during an
answer stops that answer (what was said so far stays in the history). Input can also be piped in, one
message per line.

A turn that fails (a line that is not UTF-8, a history grown past the model's context, a chat template
error, any qwen2np error) is reported on one line, `qwen2np chat: error: ...`, and the session goes on
with its history as it was before that turn. Only what makes going on pointless ends it: stdout or
stdin failing (a broken pipe, a full disk), Ctrl-C at the prompt (status 130).
"""

import sys

from ..errors import GenerationError, Qwen2npError
from . import CommandLineError, check_text
from .common import add_common_arguments, encode_prompt, generate_streaming, generation_kwargs, load, speed_line

HELP = "talk to a checkpoint through its chat template"


def add_arguments(parser):
    add_common_arguments(parser)


def _read_line(interactive):
    """The next message, or None at end of input (Ctrl-D). Bytes that are not UTF-8 arrive as lone
    surrogates (stdin decodes with surrogateescape, see run) and are reported by the turn."""
    try:
        if interactive:
            return input(">>> ")
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    except EOFError:
        return None


def _turn_error(e):
    """The one line a failed turn prints."""
    if isinstance(e, Qwen2npError):
        return f"qwen2np chat: error: {e}"
    if isinstance(e, MemoryError):
        return "qwen2np chat: error: out of memory in this turn; /reset shortens the history"
    return f"qwen2np chat: error: {type(e).__name__}: {e}"[:2000]


def run(args):
    if sys.stdin is None:
        raise CommandLineError("stdin is closed; type the messages, or pipe them in one per line")
    if args.system is not None:
        check_text(args.system, "--system")
    kwargs = generation_kwargs(args)
    model, tokenizer = load(args)
    if tokenizer.chat_template is None:
        raise GenerationError(f"the tokenizer of {args.model} has no chat template; use `qwen2np generate --no-chat`")
    errors = getattr(sys.stdin, "errors", None)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 fails its turn, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return _session(args, model, tokenizer, kwargs)
    finally:
        if hasattr(sys.stdin, "reconfigure") and errors is not None:
            try:
                sys.stdin.reconfigure(errors=errors)
            except (OSError, ValueError):
                # subtle: once a stream has been read, Python refuses to change its error handler (an
                # io.UnsupportedOperation): the rest of this process reads stdin with surrogateescape
                pass


def _session(args, model, tokenizer, kwargs):
    """The turns, until the end of input or /exit."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("/reset forgets the conversation, /exit or Ctrl-D ends it, Ctrl-C stops an answer.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = []

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    number = 0
    while True:
        line = _read_line(interactive)
        if line is None:
            if interactive:
                print(file=sys.stderr)
            return 0
        number += 1
        try:
            check_text(line, f"line {number}")
            message = line.strip()
            if not message:
                continue
            if message in ("/exit", "/quit"):
                return 0
            if message == "/reset":
                history = []
                print("(conversation reset)", file=sys.stderr)
                continue
            turn = history + [{"role": "user", "content": line}]
            input_ids = encode_prompt(tokenizer, messages=system + turn)
            answer, streamer = generate_streaming(model, tokenizer, input_ids, kwargs, write)
        except OSError:  # stdout or stdin failed: nothing more can be said
            raise
        except Exception as e:  # this turn failed; the history is as it was before it
            print(_turn_error(e), file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if streamer.interrupted:
            print("(answer stopped)", file=sys.stderr)
        history = turn + [{"role": "assistant", "content": answer}]
        print(speed_line(input_ids.shape[1], streamer), file=sys.stderr)
