"""`qwen2np dump --model PATH --prompt "..." --out DIR`: write named intermediate tensors (golden values).

    $ qwen2np dump --model test --prompt "def add(a, b):" --include "model.layers.5.*" logits --out dumps/q
    wrote 17 tensors (12.3 MB) of 1 forward pass to dumps/q

The folder gets tensors.safetensors and manifest.json (docs/dump-format.md). Several `--prompt`s make a
left-padded batch; `--ids` gives token ids directly (`1,2,3`, or JSON `[[1, 2], [3, 4]]` for a batch);
`--chat` wraps each prompt in the chat template as one user message. `--decode-steps N` feeds the last
N tokens one at a time through the KV cache, one forward pass each. scripts/dump_transformers.py takes
the same flags and writes the same format from transformers; `qwen2np compare` compares two dumps.
"""

import json
import sys
import time

import numpy as np

from ..errors import DumpError

HELP = "write named intermediate tensors of a forward pass (golden values)"


def add_arguments(parser):
    """The flags `qwen2np dump` and scripts/dump_transformers.py share."""
    parser.add_argument("--model", default="test", metavar="PATH",
                        help="a Hugging Face folder, a .gguf file, `test` (the fetched test checkpoint) or a hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT",
                        help="the text to run; repeat for a left-padded batch")
    source.add_argument("--ids", metavar="IDS", help="token ids: 1,2,3 or JSON [[1, 2], [3, 4]] for a batch")
    parser.add_argument("--attention-mask", metavar="MASK", help="with --ids: 1 = token, 0 = padding, as --ids")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt in the chat template as a user message, ready for the answer")
    parser.add_argument("--include", action="append", nargs="+", metavar="GLOB",
                        help="the names to dump, as globs (default: all; docs/intermediates.md lists them)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    parser.add_argument("--decode-steps", type=int, default=0, metavar="N",
                        help="feed the last N tokens one at a time through the KV cache (N forward passes)")
    parser.add_argument("--tokenizer", metavar="PATH", help="where the tokenizer is, if not with the model")
    parser.add_argument("--fingerprint", default="full", choices=["full", "sampled", "none"],
                        help="hash all the weights (default), 16 blocks of each, or none (docs/dump-format.md)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")


FINGERPRINT_METHODS = {"full": "sha256-f32", "sampled": "sha256-f32-sampled", "none": None}


def parse_ids(text, flag="--ids"):
    """Token ids from the command line: `1,2,3` or `1 2 3` (one row) or JSON (a list or a list of lists).

    >>> parse_ids("1, 2,3").tolist(), parse_ids("[[1, 2], [3, 4]]").tolist()
    ([[1, 2, 3]], [[1, 2], [3, 4]])
    """
    try:
        value = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.replace(",", " ").split()]
        rows = value if value and isinstance(value[0], list) else [value]
        if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
            raise ValueError("rows of different lengths, or no ids")
        ids = np.array(rows, dtype=np.int64)
        if not all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r):
            raise ValueError("not all integers")
    except (ValueError, TypeError, OverflowError) as e:
        raise DumpError(f"{flag} {text[:80]!r}: expected integers like 1,2,3 or JSON [[1, 2], [3, 4]] (rows of "
                        f"equal length) ({e})") from None
    return ids


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
    tokenizer = tokenizer_loader()
    prompts = list(args.prompt)
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
    from .. import Qwen2ForCausalLM, Qwen2Tokenizer
    from ..golden.dump import plan_passes, write_dump
    from ..golden.record import record_dump
    from ..hub import resolve_model_path

    path = resolve_model_path(args.model)
    ids, mask, prompt = inputs_from_args(
        args, lambda: Qwen2Tokenizer.from_pretrained(resolve_model_path(args.tokenizer or args.model)))
    plan_passes(ids.shape[1], args.decode_steps)  # refuse a bad --decode-steps before the slow load
    started = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=args.dtype)
    dump = record_dump(model, ids, mask, include_patterns(args), args.decode_steps, prompt, args.chat, path,
                       FINGERPRINT_METHODS[args.fingerprint])
    folder = write_dump(dump, args.out)
    size = sum(a.nbytes for a in dump.tensors.values())
    print(f"wrote {len(dump.tensors)} tensors ({size / 1e6:.1f} MB) of {len(dump.passes)} forward "
          f"pass{'es' * (len(dump.passes) != 1)} to {folder} in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0
