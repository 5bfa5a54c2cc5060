"""Opening a qwen2 GGUF file (llama.cpp's format) as a Hugging Face checkpoint: config and tensors.

Three steps, each as transformers 5.24 does them (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`):

1. the config dict from the metadata (`gguf_config`): `qwen2.block_count` -> num_hidden_layers, ...;
2. the tensors: names mapped to Hugging Face names (gguf_names.py), shapes reversed to NumPy order
   (gguf_header.py), quantized blocks (Q4_K, Q5_0, Q6_K, Q8_0, ...) dequantized to float32 with
   `gguf.quants.dequantize`, the same function transformers calls, so the weights are bitwise equal;
3. the tokenizer from the metadata (qwen2np/tokenizer/gguf.py, `Qwen2Tokenizer.from_pretrained(path)`).

Memory: `open_gguf` reads the header only and maps the file; each tensor stays as its quantized blocks
until qwen2np/weights/store.py converts it, a group of rows at a time, letting the file's pages go after
converting them (so a model converted ahead of time holds its float32 weights, not also the quantized
bytes), or at each use (docs/weights.md).

The tensor part needs the optional `gguf` package (`pip install 'qwen2np[gguf]'`).
"""

import math
import re
from pathlib import Path

from ..errors import CheckpointError, MissingDependencyError
from .gguf_header import read_gguf_header
from .gguf_names import hf_name
from .stored import Checkpoint, MappedFile, StoredTensor

__all__ = ["open_gguf", "gguf_config", "import_gguf", "dequantize_rows"]


_REQUIRED = object()
_BLOCK_INDEX = re.compile(r"blk\.(\d+)\.")
# Qwen2Config's defaults (transformers 5.24) for what a GGUF does not state, so the dict reads like the
# config.json transformers writes for the model it loads from the same file
_QWEN2_DEFAULTS = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_window_layers": 28,
    "sliding_window": None,
    "use_cache": True,
    "use_sliding_window": False,
}


def import_gguf():
    """The `gguf` package, or a MissingDependencyError saying how to install it."""
    try:
        import gguf   # optional (the `gguf` extra): imported only when a GGUF's tensors are read
    except ImportError as e:
        raise MissingDependencyError(
            "reading GGUF tensors needs the gguf package: pip install 'qwen2np[gguf]' (or pip install gguf)"
        ) from e
    return gguf


def gguf_config(header, vocab_rows=None):
    """The config.json dict transformers 5.24 builds from this GGUF header (`GGUF_CONFIG_MAPPING["qwen2"]`).

    subtle: float metadata is stored as float32, so rms_norm_eps comes out as 9.999999974752427e-07, not
    1e-06, exactly as in transformers (which reads it the same way).
    """
    md = header.metadata
    arch = md.get("general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"{header.path}: general.architecture is {arch!r}; qwen2np reads 'qwen2' GGUF files")

    def get(key, default=_REQUIRED, kind=int):
        """The metadata value `key`, checked to be a `kind` (int, or float for float and int values)."""
        if key not in md:
            if default is _REQUIRED:
                raise CheckpointError(f"{header.path}: metadata key {key!r} is missing")
            return default
        value = md[key]
        kinds = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise CheckpointError(f"{header.path}: metadata key {key!r} should be a number ({kind.__name__}), "
                                  f"found {value!r}"[:300])
        return value

    names = {t.name for t in header.tensors}
    heads = get("qwen2.attention.head_count")
    layers = get("qwen2.block_count")
    blocks = {int(m.group(1)) for name in names if (m := _BLOCK_INDEX.match(name))}
    if len(blocks) != layers or blocks != set(range(layers)):  # (len first: a corrupt count can be huge)
        raise CheckpointError(f"{header.path}: qwen2.block_count is {layers}, but the file has tensors for "
                              f"{len(blocks)} layers (blk.0 .. blk.{max(blocks, default=-1)})")
    # vocab_size: the metadata's, else the number of tokens (transformers), else the embedding's rows
    vocab_size = get("qwen2.vocab_size", header.array_lengths.get("tokenizer.ggml.tokens", vocab_rows))
    config = {
        "_model_name_or_path": md.get("general.name"),
        "model_type": "qwen2",
        "hidden_size": get("qwen2.embedding_length"),
        "intermediate_size": get("qwen2.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("qwen2.attention.head_count_kv", heads),
        "max_position_embeddings": get("qwen2.context_length", 32768),
        "rms_norm_eps": get("qwen2.attention.layer_norm_rms_epsilon", 1e-6, float),
        "rope_parameters": {"rope_theta": float(get("qwen2.rope.freq_base", 10000.0, float)),
                            "rope_type": "default"},
        "vocab_size": vocab_size,
        # llama.cpp writes output.weight only when the output projection is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", None),
        **_QWEN2_DEFAULTS,
        "layer_types": ["full_attention"] * layers,  # no sliding window: every layer attends fully
    }
    if "tokenizer.ggml.unknown_token_id" in md:
        config["unk_token_id"] = get("tokenizer.ggml.unknown_token_id")
    if config["_model_name_or_path"] is None:
        del config["_model_name_or_path"]
    return dict(sorted(config.items()))


def open_gguf(path):
    """The `Checkpoint` of a qwen2 GGUF file: HF names, NumPy shapes, each tensor a StoredTensor of its own
    ggml type ("Q4_K", "Q8_0", "F32", …), its blocks left as they are in the memory-mapped file.

    Unknown tensor names are an error (transformers would silently drop them and initialise the
    missing weights at random).
    """
    gguf = import_gguf()
    header = read_gguf_header(path)
    if not header.tensors:
        raise CheckpointError(f"{header.path}: holds no tensors (a vocabulary-only GGUF?)")
    plan = []  # (info, HF name, ggml type name, bytes in the file)
    for info in header.tensors:
        name = hf_name(info.name)
        if name is None:
            raise CheckpointError(f"{header.path}: tensor {info.name!r} is not part of a qwen2 model "
                                  "(expected token_embd, blk.N.attn_*/ffn_*, output_norm, output)")
        plan.append((info, name, *_stored_bytes(gguf, header, info)))
    embed = next((info for info, name, *_ in plan if name == "model.embed_tokens.weight"), None)
    config = gguf_config(header, vocab_rows=embed.shape[0] if embed is not None else None)
    if embed is not None and embed.shape[0] != config["vocab_size"]:
        raise CheckpointError(f"{header.path}: token_embd.weight has {embed.shape[0]} rows but the vocabulary "
                              f"has {config['vocab_size']} tokens")
    file = MappedFile(header.path)
    base = Path(header.path).name
    tensors, origin = {}, {}
    for info, name, kind, nbytes in plan:
        origin[name] = f"{base} ({info.name})"
        tensors[name] = StoredTensor(name, tuple(info.shape), kind, file, info.start, nbytes, origin[name])
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if config[k] is not None}
    return Checkpoint(config, tensors, origin, generation_config or None, Path(header.path))


def _stored_bytes(gguf, header, info):
    """(ggml type name, bytes the tensor takes in the file); checks that its type is known and that it fits
    in the file."""
    sizes = gguf.GGML_QUANT_SIZES
    try:
        kind = gguf.GGMLQuantizationType(info.ggml_type)
        block_size, type_size = sizes[kind]
    except (ValueError, KeyError):
        raise CheckpointError(f"{header.path}: tensor {info.name!r} has ggml type {info.ggml_type}, which the "
                              "installed gguf package does not know") from None
    if kind.name not in ("F32", "F16") and _block_type(gguf, kind) is None:
        raise CheckpointError(f"{header.path}: tensor {info.name!r} has type {kind.name}, which the gguf "
                              "package cannot dequantize")
    row = info.shape[-1] if info.shape else 1
    if row % block_size:
        raise CheckpointError(f"{header.path}: tensor {info.name!r} of type {kind.name} has rows of {row} "
                              f"values, not a multiple of its block size {block_size}")
    nbytes = math.prod(info.shape) // block_size * type_size  # Python ints: no overflow on a corrupt shape
    if info.start + nbytes > header.file_size:
        raise CheckpointError(f"{header.path}: tensor {info.name!r} ends at byte {info.start + nbytes}, past the "
                              f"end of the file ({header.file_size} bytes): the file is truncated")
    return kind.name, nbytes


def dequantize_rows(gguf, raw, kind):
    """`[n, row_bytes]` uint8 blocks of ggml type `kind` -> `[n, C]` float32, with the gguf package's code.

    This is what `gguf.quants.dequantize` does, minus its split into groups of 16 rows: we call the
    same per-type `dequantize_rows` on our own (bigger) groups, which is 1.4-3x faster and gives the
    same bits, since every value is computed on its own block (tests/io/test_gguf_oracle.py checks).
    """
    quant = _block_type(gguf, kind)
    if quant is None:  # F32 and F16 are plain values, not blocks
        return gguf.quants.dequantize(raw, kind)
    quant.init_grid()  # the IQ* types build a lookup grid on first use
    return quant.dequantize_rows(raw)


def _block_type(gguf, kind):
    """The gguf.quants class that dequantizes blocks of `kind`, or None for F32/F16."""
    quant = getattr(gguf.quants, kind.name, None)
    return quant if hasattr(quant, "dequantize_rows") else None

