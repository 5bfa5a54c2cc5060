"""Write a Hugging Face checkpoint of any Qwen2 shape with random weights, for tests and benchmarks at sizes
that cannot be downloaded here (no model hub): Qwen2-7B-Instruct's shape by default, in bfloat16.

    python scripts/make_synthetic_checkpoint.py OUT                      # 7.6 B parameters, 15.2 GB
    python scripts/make_synthetic_checkpoint.py OUT --preset qwen2-72b   # 72.7 B parameters, 145 GB
    python scripts/make_synthetic_checkpoint.py OUT --preset qwen2-7b --set num_hidden_layers=4

Weights are drawn as transformers initialises them (`Qwen2PreTrainedModel._init_weights`): linear and
embedding weights from N(0, initializer_range²), biases 0, norm weights 1; NumPy's PCG64 seeded per
tensor from `--seed` and the tensor's name, so a tensor's values do not depend on which others are
written. Each weight is drawn and written a chunk at a time: writing 7B takes a few hundred MB of memory.
The folder (config.json, generation_config.json, shards of at most `--shard-size` with their index, and
the bundled Qwen2 tokenizer) is written whole: it appears when complete. Never committed: it is big.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2np import Qwen2Config, Qwen2Tokenizer  # noqa: E402
from qwen2np.weights.plan import parse_memory  # noqa: E402
from qwen2np.io.folders import write_folder  # noqa: E402
from qwen2np.io.hf_folder import write_hf_files  # noqa: E402
from qwen2np.weights.parameters import base_parameter_shapes  # noqa: E402

# config.json of the published models (docs: ../shared/reference/hf-qwen2-behavior.md, section 12)
_COMMON = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False,
               attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02,
               rope_theta=1000000.0, max_position_embeddings=32768, architectures=["Qwen2ForCausalLM"])
PRESETS = {
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
                       max_window_layers=24),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
                       max_window_layers=28),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, sliding_window=131072,
                     max_window_layers=28),
    "qwen2.5-14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False,
                        sliding_window=131072, max_window_layers=70),
    "qwen2.5-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False,
                        sliding_window=131072, max_window_layers=70),
    "qwen2-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False, sliding_window=131072,
                      max_window_layers=80),
}
# generation_config.json of Qwen2-7B-Instruct (and the other instruct models)
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                     "top_p": 0.8, "top_k": 20}
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


class RandomWeight:
    """A weight drawn as transformers initialises it, produced a chunk at a time as it is written
    (write_safetensors asks `chunks(n)`), never whole in memory."""

    def __init__(self, name, shape, std, seed):
        self.name, self.shape, self.std = name, tuple(shape), np.float32(std)
        self.dtype = np.dtype(np.float32)
        digest = hashlib.sha256(name.encode()).digest()
        self.seed = np.random.SeedSequence([seed, int.from_bytes(digest[:8], "little")])

    def chunks(self, n):
        size = int(np.prod(self.shape))
        if self.name.endswith("norm.weight"):
            yield np.ones(size, np.float32)
        elif self.name.endswith(".bias"):
            yield np.zeros(size, np.float32)
        else:
            rng = np.random.default_rng(self.seed)
            for start in range(0, size, n):
                yield rng.standard_normal(min(n, size - start), dtype=np.float32) * self.std


def config_from(args):
    values = {**_COMMON, **PRESETS[args.preset]}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. num_hidden_layers=4")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    config = Qwen2Config.from_dict(values)        # checked as any config.json would be
    return config, values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder to write (refused if it holds files, unless --overwrite)")
    parser.add_argument("--preset", default="qwen2-7b", choices=sorted(PRESETS), help="the shape (default qwen2-7b)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored dtype (bfloat16)")
    parser.add_argument("--shard-size", default="4GB", type=parse_memory, help="largest shard (default 4GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that holds files")
    args = parser.parse_args(argv)

    config, values = config_from(args)
    shapes = {f"model.{n}": s for n, s in base_parameter_shapes(config).items()}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    std = config.initializer_range
    tensors = {n: RandomWeight(n, s, std, args.seed) for n, s in shapes.items()}
    count = sum(int(np.prod(s)) for s in shapes.values())
    size = count * DTYPES[args.dtype]
    print(f"{args.out}: {count / 1e9:.2f} B parameters, {size / 1e9:.1f} GB of {args.dtype}", file=sys.stderr)
    started = time.perf_counter()
    with write_folder(args.out, overwrite=args.overwrite) as tmp:
        write_hf_files(tmp, {**values, "dtype": args.dtype}, tensors, GENERATION_CONFIG,
                       max_shard_bytes=args.shard_size, dtype=args.dtype)
        Qwen2Tokenizer.from_pretrained().save_pretrained(tmp)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
