"""What `qwen2np generate` and `qwen2np chat` share: the flags, loading with a progress bar, one generation
with its streamed output, and the closing speed line.

Sampling flags follow one rule: `--greedy` decodes greedily; otherwise any of `--temperature`, `--top-p`,
`--top-k`, `--min-p` or `--seed` turns sampling on; with none of them the checkpoint's
generation_config.json decides (greedy when it has none, as for the GGUF test checkpoint).
"""

import argparse
import sys
import time

from .. import Qwen2ForCausalLM, Qwen2Tokenizer
from ..errors import CheckpointError, GenerationError
from ..generation import GenerationConfig, TextStreamer
from ..generation.utils import validate_generation_config
from ..io.hub import resolve_model_path
from ..weights.plan import parse_memory
from .progress import ProgressBar

DEFAULT_MAX_NEW_TOKENS = 512


def add_common_arguments(parser):
    """The flags of both commands (a bad one is reported on one line by the dispatcher, qwen2np.cli)."""
    parser.add_argument("--model", default="test", metavar="PATH",
                        help="a Hugging Face folder, a .gguf file, `test` (the fetched test checkpoint) or a "
                             "hub id (default: test)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"stop after N new tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--temperature", type=float, metavar="T", help="sample with temperature T > 0")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest top set of mass >= P")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (0: all)")
    parser.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the best probability")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise seen tokens (1.0: off)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of reproducible sampling (docs/sampling.md)")
    parser.add_argument("--system", metavar="TEXT", help="a system message (through the chat template)")


DTYPES = ["float32", "float64", "bfloat16", "float16"]


def add_model_arguments(parser):
    """--dtype and --max-memory: how a command that loads a model computes, and within what memory."""
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="compute dtype: float32 (default), float64 (the reference mode), or bfloat16/float16 "
                             "as transformers computes in half precision")
    parser.add_argument("--max-memory", metavar="SIZE", type=memory_size,
                        help="memory the model may use, e.g. 6GB or 5.5GiB (default: what the machine has "
                             "available); weights that do not fit are converted at each use (docs/weights.md)")


def memory_size(text):
    """argparse type of --max-memory: a size such as 6GB (a bad one is a one-line usage error)."""
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("max_memory", "--max-memory")) from None


def load_model(cls, path, args, progress=None):
    """`cls.from_pretrained` with the --dtype and --max-memory of `args`."""
    return cls.from_pretrained(path, dtype=args.dtype, progress=progress, max_memory=args.max_memory)


def weights_line(model):
    """How the weights are held, for the line a command prints after loading (kept, converted per use, …)."""
    plan = getattr(model, "weight_plan", None)
    return "" if plan is None else f"; weights: {plan.description}"


def generation_kwargs(args):
    """The generate() keyword arguments the flags ask for, checked before the model is loaded."""
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "min_p")}
    kw = {k: v for k, v in sampling.items() if v is not None}
    if args.greedy:
        if kw or args.seed is not None:
            given = sorted(kw) + (["seed"] if args.seed is not None else [])
            raise GenerationError(f"--greedy contradicts the sampling flags {given}")
        kw["do_sample"] = False
    elif kw or args.seed is not None:
        kw["do_sample"] = True
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    kw["max_new_tokens"] = args.max_new_tokens
    validate_generation_config(GenerationConfig(**kw).with_defaults())  # fail before a slow load
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise GenerationError(f"--seed must be in [0, 2**64), found {args.seed}")
    return kw


def load(args):
    """(model, tokenizer) for `--model`, with a progress bar on stderr while the weights load."""
    path = resolve_model_path(args.model)
    started = time.perf_counter()
    try:
        model = load_model(Qwen2ForCausalLM, path, args, progress=ProgressBar())
        tokenizer = Qwen2Tokenizer.from_pretrained(path)
    except (OSError, KeyError, IndexError) as e:  # anything the loaders did not already explain
        raise CheckpointError(f"cannot load {args.model!r} ({path}): {type(e).__name__}: {e}") from e
    print(f"loaded {path} in {time.perf_counter() - started:.1f} s{weights_line(model)}", file=sys.stderr)
    return model, tokenizer


def encode_prompt(tokenizer, messages=None, text=None):
    """Token ids [1, T] of a chat (through the chat template, with the assistant prompt) or a raw text."""
    if messages is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np")["input_ids"]
    return tokenizer([text], return_tensors="np")["input_ids"]


class TimedStreamer:
    """A TextStreamer that also times the prompt (until the first new token) and the generation after it."""

    def __init__(self, tokenizer, write):
        self.text = []
        self.write = write
        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, on_text=self._on_text)
        self.started = self.first_token = self.finished = None
        self.new_tokens = 0
        self.interrupted = False

    def _on_text(self, text):
        self.text.append(text)
        if text:
            self.write(text)

    def put(self, value):
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        else:
            self.new_tokens += 1
            if self.first_token is None:
                self.first_token = now
        self.inner.put(value)

    def end(self):
        self.finished = time.perf_counter()
        self.inner.end()


def generate_streaming(model, tokenizer, input_ids, kwargs, write):
    """Generate from `input_ids` [1, T], writing text as it comes; return (answer text, streamer).

    A KeyboardInterrupt (Ctrl-C) stops the answer: the text so far is returned, `streamer.interrupted`
    is set. Another error ends the line of text already written, then propagates.
    """
    streamer = TimedStreamer(tokenizer, write)
    try:
        model.generate(input_ids, streamer=streamer, **kwargs)
    except KeyboardInterrupt:
        streamer.finished = time.perf_counter()
        streamer.interrupted = True
    except Exception as e:
        if any(streamer.text) and not isinstance(e, OSError):  # end the answer's line before the error's
            write("\n")
        raise
    return "".join(streamer.text), streamer


def speed_line(prompt_tokens, streamer):
    """`N prompt tokens at X tok/s; M new tokens at Y tok/s` (the first new token counts in the prompt's time)."""
    if streamer.first_token is None:
        return f"{prompt_tokens} prompt tokens; no new token"
    prefill = streamer.first_token - streamer.started
    decode = (streamer.finished or time.perf_counter()) - streamer.first_token
    rest = streamer.new_tokens - 1
    line = f"{prompt_tokens} prompt tokens at {prompt_tokens / prefill:.1f} tok/s; {streamer.new_tokens} new tokens"
    if rest > 0 and decode > 0:
        line += f" at {rest / decode:.1f} tok/s"
    return line
