"""`qwen2np generate --model PATH "prompt"`: stream a checkpoint's answer to stdout.

By default the prompt goes through the tokenizer's chat template as one user message (after `--system`
if given), as an instruct model expects; `--no-chat` continues the raw text instead, as a base model
expects (and as happens when the tokenizer has no template). `-` as the prompt reads it from stdin.
The answer streams to stdout; the load progress and a closing speed line go to stderr.
"""

import sys

from ..errors import GenerationError
from . import CommandLineError, check_text, decode_utf8
from .common import add_common_arguments, encode_prompt, generate_streaming, generation_kwargs, load, speed_line

HELP = "generate text from a prompt with a checkpoint"


def add_arguments(parser):
    parser.add_argument("prompt", help="the prompt text (`-` reads it from stdin)")
    parser.add_argument("--no-chat", action="store_true",
                        help="continue the raw prompt text instead of answering it through the chat template")
    add_common_arguments(parser)


def read_stdin(what):
    """All of stdin as text (UTF-8; an error names the first byte that is not)."""
    if sys.stdin is None:
        raise CommandLineError(f"{what}: stdin is closed; pipe the text in, or give it as an argument")
    buffer = getattr(sys.stdin, "buffer", None)
    return decode_utf8(buffer.read(), what) if buffer is not None else check_text(sys.stdin.read(), what)


def run(args):
    kwargs = generation_kwargs(args)
    prompt = read_stdin("the prompt on stdin") if args.prompt == "-" else check_text(args.prompt, "PROMPT")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.no_chat and args.system is not None:
        raise GenerationError("--system needs the chat template; drop --no-chat or --system")
    if args.no_chat and not prompt:
        raise GenerationError("the prompt is empty: with --no-chat there is no text to continue")
    model, tokenizer = load(args)
    if args.no_chat or tokenizer.chat_template is None:
        if args.system is not None:
            raise GenerationError(f"--system: the tokenizer of {args.model} has no chat template")
        input_ids = encode_prompt(tokenizer, text=prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        input_ids = encode_prompt(tokenizer, messages=messages + [{"role": "user", "content": prompt}])

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    _, streamer = generate_streaming(model, tokenizer, input_ids, kwargs, write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if streamer.interrupted:
        print("(interrupted)", file=sys.stderr)
    print(speed_line(input_ids.shape[1], streamer), file=sys.stderr)
    return 130 if streamer.interrupted else 0
