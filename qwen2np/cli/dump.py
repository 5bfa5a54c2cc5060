"""`qwen2np dump --model PATH --prompt "..." --out DIR`: write named intermediate tensors (golden values).

    $ qwen2np dump --model test --prompt "def add(a, b):" --include "model.layers.5.*" logits --out dumps/q
    wrote 17 tensors (12.3 MB) of 1 forward pass to dumps/q

The folder gets tensors.safetensors and manifest.json (docs/dump-format.md). Several `--prompt`s make a
left-padded batch; `--ids` gives token ids directly (`1,2,3`, or JSON `[[1, 2], [3, 4]]` for a batch);
`--chat` wraps each prompt in the chat template as one user message. `--decode-steps N` feeds the last
N tokens one at a time through the KV cache, one forward pass each. `--grad` adds a backward pass of the
causal-LM loss (labels = the input ids, -100 at the padding): each intermediate's gradient as
`name.grad` and each parameter's as `{parameter}.grad` (docs/gradients.md). scripts/dump_transformers.py
takes the same flags and writes the same format from transformers; `qwen2np compare` compares two dumps.
"""

import json
import sys
import time

import numpy as np

from .. import Qwen2ForCausalLM, Qwen2Tokenizer
from ..errors import DumpError
from ..golden.dump import plan_passes
from ..golden.record import record_dump, record_gradient_dump, select_positions
from ..grad import value_and_grad
from ..io.folders import check_target
from ..io.hub import resolve_model_path
from . import check_text
from .common import add_model_arguments, load_model, weights_line

HELP = "write named intermediate tensors of a forward pass (golden values)"


def add_arguments(parser):
    """The flags `qwen2np dump` and scripts/dump_transformers.py share."""
    parser.add_argument("--model", default="test", metavar="PATH",
                        help="a Hugging Face folder, a .gguf file, `test` (the fetched test checkpoint) or a hub id "
                             "(default: test)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT",
                        help="the text to run; repeat for a left-padded batch")
    source.add_argument("--ids", metavar="IDS", help="token ids: 1,2,3 or JSON [[1, 2], [3, 4]] for a batch")
    parser.add_argument("--attention-mask", metavar="MASK", help="with --ids: 1 = token, 0 = padding, as --ids")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt in the chat template as a user message, ready for the answer")
    parser.add_argument("--include", action="append", nargs="+", metavar="GLOB",
                        help="the names to dump, as globs (default: all; docs/intermediates.md lists them)")
    add_model_arguments(parser)
    parser.add_argument("--positions", metavar="SEL",
                        help="keep only these positions of the prompt's tensors (along T): a slice such as -16: "
                             "or 0:8, or a list such as 0,5,-1 (decode steps are kept whole)")
    parser.add_argument("--decode-steps", type=int, default=0, metavar="N",
                        help="feed the last N tokens one at a time through the KV cache (N forward passes)")
    parser.add_argument("--tokenizer", metavar="PATH", help="where the tokenizer is, if not with the model")
    parser.add_argument("--fingerprint", default="full", choices=["full", "sampled", "none"],
                        help="hash all the weights (default), 16 blocks of each, or none (docs/dump-format.md)")
    parser.add_argument("--grad", action="store_true",
                        help="also run the backward pass of the causal-LM loss (labels = the input ids) and dump the "
                             "gradients as NAME.grad: of the intermediates, and of the parameters the --include "
                             "globs name (e.g. '*.weight.grad'); docs/gradients.md")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write (refused if it holds files, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out whole if it holds files (an old dump), once the new dump is written")


FINGERPRINT_METHODS = {"full": "sha256-f32", "sampled": "sha256-f32-sampled", "none": None}


def parse_ids(text, flag="--ids"):
    """Token ids from the command line: `1,2,3` or `1 2 3` (one row) or JSON (a list or a list of lists).
    An error names the bad item.

    >>> parse_ids("1, 2,3").tolist(), parse_ids("[[1, 2], [3, 4]]").tolist()
    ([[1, 2, 3]], [[1, 2], [3, 4]])
    >>> parse_ids("1,x,3")
    Traceback (most recent call last):
    ...
    qwen2np.errors.DumpError: --ids: item 2 ('x') is not an integer; expected ids like 1,2,3 or JSON [[1, 2], [3, 4]]
    """
    def fail(problem):
        raise DumpError(f"{flag}: {problem}; expected ids like 1,2,3 or JSON [[1, 2], [3, 4]]")

    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            fail(f"not valid JSON ({e})"[:200])
        if not isinstance(value, list):
            fail(f"expected a JSON list, found {type(value).__name__}")
        nested = bool(value) and all(isinstance(r, list) for r in value)
        rows = value if nested else [value]
    else:
        rows, nested = [[]], False
        for i, item in enumerate(text.replace(",", " ").split()):
            try:
                rows[0].append(int(item))
            except ValueError:
                fail(f"item {i + 1} ({item[:40]!r}) is not an integer")
    if not rows or not rows[0]:
        fail("no ids")
    for r, row in enumerate(rows):
        where = f"row {r + 1} item" if nested else "item"
        for i, item in enumerate(row):
            if not isinstance(item, int) or isinstance(item, bool):
                fail(f"{where} {i + 1} ({json.dumps(item)[:40]}) is not an integer")
            if not 0 <= item < 2**63:
                fail(f"{where} {i + 1} ({item}) is not a token id (expected 0 <= id < 2**63)")
        if len(row) != len(rows[0]):
            fail(f"row {r + 1} has {len(row)} ids, row 1 has {len(rows[0])} (rows must be of equal length)")
    return np.array(rows, dtype=np.int64)


def inputs_from_args(args, tokenizer_loader):
    """(input_ids [B, N], attention_mask [B, N] or None, prompt or None) from --prompt / --ids."""
    if args.ids is not None:
        ids = parse_ids(args.ids)
        mask = None if args.attention_mask is None else parse_ids(args.attention_mask, "--attention-mask")
        if mask is not None and (mask.shape != ids.shape or not np.isin(mask, (0, 1)).all()):
            raise DumpError(f"--attention-mask: expected zeros and ones of the shape of --ids {list(ids.shape)}, "
                            f"found {mask.tolist()}")
        if args.chat:
            raise DumpError("--chat applies to --prompt text, not to --ids")
        return ids, mask, None
    if args.attention_mask is not None:
        raise DumpError("--attention-mask goes with --ids; with --prompt the tokenizer makes the mask")

    prompts = [check_text(p, "--prompt") for p in args.prompt]
    tokenizer = tokenizer_loader()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts] if args.chat else prompts
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    mask = np.asarray(encoded["attention_mask"], dtype=np.int64) if len(prompts) > 1 else None
    if ids.shape[1] == 0:
        raise DumpError("--prompt: the prompt has no tokens")
    return ids, mask, prompts[0] if len(prompts) == 1 else prompts


def include_patterns(args):
    return [p for group in args.include or [] for p in group] or ["*"]


def run(args):
    path = resolve_model_path(args.model)
    ids, mask, prompt = inputs_from_args(
        args, lambda: Qwen2Tokenizer.from_pretrained(resolve_model_path(args.tokenizer or args.model)))
    if args.grad and args.decode_steps:
        raise DumpError("--grad runs one forward and backward pass over the whole prompt; it takes no --decode-steps")
    plan = plan_passes(ids.shape[1], args.decode_steps)  # refuse a bad --decode-steps before the slow load
    select_positions(args.positions, ids.shape[1], plan[0][1])   # and a bad --positions
    check_target(args.out, args.overwrite)  # and an --out that holds files (or is a file)
    started = time.perf_counter()
    model = load_model(Qwen2ForCausalLM, path, args)
    outside = np.argwhere(ids >= model.config.vocab_size)
    if len(outside):
        r, c = outside[0]
        raise DumpError(f"--ids: id {ids[r, c]} (row {r + 1}, item {c + 1}) is not a token id of this model "
                        f"(vocab_size {model.config.vocab_size})")
    # each tensor is written as the forward pass produces it: a dump of a big model is never in memory whole
    if args.grad:
        dump = record_gradients(model, ids, mask, prompt, path, args)
    else:
        dump = record_dump(model, ids, mask, include_patterns(args), args.decode_steps, prompt, args.chat, path,
                           FINGERPRINT_METHODS[args.fingerprint], positions=args.positions, out=args.out,
                           overwrite=args.overwrite)
    folder = dump.folder
    size, count = sum(a.nbytes for a in dump.tensors.values()), len(dump.tensors)
    print(f"wrote {count} tensor{'s' * (count != 1)} ({size / 1e6:.1f} MB) of {len(dump.passes)} forward "
          f"pass{'es' * (len(dump.passes) != 1)} to {folder} in {time.perf_counter() - started:.1f} s"
          f"{weights_line(model)}",
          file=sys.stderr)
    return 0


def gradient_labels(ids, mask):
    """The labels of `dump --grad`: the input ids, -100 at the padding (the usual causal-LM recipe).

    >>> gradient_labels(np.array([[5, 6, 7]]), np.array([[0, 1, 1]])).tolist()
    [[-100, 6, 7]]
    """
    return ids if mask is None else np.where(mask == 1, ids, -100)


def record_gradients(model, ids, mask, prompt, path, args):
    """`dump --grad`: the forward and backward pass of the causal-LM loss, streamed to --out."""
    def backward(model, ids, mask, params):
        return value_and_grad(model, ids, labels=gradient_labels(ids, mask), attention_mask=mask, params=params)

    return record_gradient_dump(model, ids, mask, include_patterns(args), backward, prompt, args.chat, path,
                                FINGERPRINT_METHODS[args.fingerprint], positions=args.positions, out=args.out,
                                overwrite=args.overwrite)
