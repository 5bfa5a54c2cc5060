"""`qwen2np chat --model PATH`: talk to a checkpoint, one turn after another, through its chat template.

Type a message and press Enter; the answer streams back. The whole history is sent each turn.
`/reset` forgets the history, `/exit` (or Ctrl-D) ends the session with status 0, Ctrl-C during an
answer stops that answer (what was said so far stays in the history). Input can also be piped in, one
message per line. A problem with one turn (say the history outgrew the model's context) is reported on
one line and the session goes on.
"""

import sys

from ..errors import GenerationError
from .common import add_common_arguments, encode_prompt, generate_streaming, generation_kwargs, load, speed_line

HELP = "talk to a checkpoint through its chat template"


def add_arguments(parser):
    add_common_arguments(parser)


def _read_line(interactive):
    """The next message, or None at end of input (Ctrl-D)."""
    try:
        if interactive:
            return input(">>> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def run(args):
    kwargs = generation_kwargs(args)
    model, tokenizer = load(args)
    if tokenizer.chat_template is None:
        raise GenerationError(f"the tokenizer of {args.model} has no chat template; use `qwen2np generate --no-chat`")
    interactive = sys.stdin.isatty()
    if interactive:
        print("/reset forgets the conversation, /exit or Ctrl-D ends it, Ctrl-C stops an answer.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = []

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        line = _read_line(interactive)
        if line is None:
            if interactive:
                print(file=sys.stderr)
            return 0
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
        try:
            input_ids = encode_prompt(tokenizer, messages=system + turn)
            answer, streamer = generate_streaming(model, tokenizer, input_ids, kwargs, write)
        except GenerationError as e:
            print(f"qwen2np chat: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if streamer.interrupted:
            print("(answer stopped)", file=sys.stderr)
        history = turn + [{"role": "assistant", "content": answer}]
        print(speed_line(input_ids.shape[1], streamer), file=sys.stderr)
