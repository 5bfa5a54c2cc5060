"""The tokenizer a GGUF file carries in its metadata, read the way transformers 5.24 reads it.

A GGUF has no vocab.json: llama.cpp stores the tokenizer as metadata::

    tokenizer.ggml.model        "gpt2"  (byte-level BPE)
    tokenizer.ggml.pre          "qwen2" (which pre-tokenization regex)
    tokenizer.ggml.tokens       every token string, id = position (151,936 for Qwen2.5 0.5B)
    tokenizer.ggml.token_type   1 normal, 3 control, 4 user-defined, 5 unused, ...
    tokenizer.ggml.merges       "a b" strings, best first
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id
    tokenizer.chat_template

transformers (`integrations/gguf/gguf_tokenizer_mapping.py`) turns this into:

* a BPE vocabulary of *every* token, including the 22 added ones and the 271 `[PAD151665]`..
  `[PAD151935]` fillers (type 5, unused). subtle: the fillers stay plain vocabulary entries, not added
  tokens: text never encodes to them, decoding their id gives the literal text "[PAD151665]", and
  `len(tokenizer)` is 151,936;
* control tokens (type 3) as added tokens with special=True -- this includes the FIM and repo tokens,
  which the original Qwen2.5 tokenizer_config.json marks special=False;
* user-defined tokens (type 4: `<tool_call>`, `</tool_call>`) as added tokens with special=False;
* bos/eos/pad/unk as the token strings of their ids (unset ones None); no model_max_length limit
  (transformers' VERY_LARGE_INTEGER, 10**30 as a float rounded to int).

subtle: transformers builds this tokenizer with *no* NFC normalizer (a tokenizer loaded from the
original vocab.json/merges.txt has one), so non-NFC input ("cafe" + U+0301) encodes differently from
the Hugging Face tokenizer of the same model. `gguf_tokenizer_kwargs` asks for the same with
`normalization=None`.
"""

import json
import os
from pathlib import Path

from ..errors import CheckpointError
from ..io.gguf_header import read_gguf_header
from .bytes_level import bytes_to_unicode

__all__ = ["gguf_tokenizer_kwargs", "write_tokenizer_files", "VERY_LARGE_INTEGER", "QWEN2_PRE_TOKENIZERS"]

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
CONTROL, USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values transformers maps to the Qwen2 pre-tokenization regex
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")
_TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def gguf_tokenizer_kwargs(path, header=None):
    """The `Qwen2Tokenizer(...)` constructor arguments for the tokenizer in the GGUF file at `path`.

    Returns a dict with vocab ({token: id}), merges ([(a, b)]), added_tokens_decoder ({id: dict with
    content/special/lstrip/rstrip/single_word/normalized}), bos/eos/pad/unk_token (str or None),
    chat_template, model_max_length, and `normalization` (None: this tokenizer does not NFC-normalize).
    """
    header = read_gguf_header(path, string_arrays=_TOKENIZER_KEYS) if header is None else header
    md = header.metadata

    def need(key):
        if key not in md:
            raise CheckpointError(f"{header.path}: metadata key {key!r} is missing; it is needed to build the "
                                  "tokenizer")
        return md[key]

    model = need("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{header.path}: tokenizer.ggml.model is {model!r}; qwen2np reads byte-level BPE "
                              "tokenizers ('gpt2')")
    pre = md.get("tokenizer.ggml.pre")
    if pre not in QWEN2_PRE_TOKENIZERS:
        raise CheckpointError(f"{header.path}: tokenizer.ggml.pre is {pre!r}; qwen2np implements the Qwen2 "
                              f"pre-tokenizer ({', '.join(QWEN2_PRE_TOKENIZERS)})")
    tokens = need("tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type") or []
    if types and len(types) != len(tokens):
        raise CheckpointError(f"{header.path}: tokenizer.ggml.token_type has {len(types)} entries, expected one per "
                              f"token ({len(tokens)})")
    merges = []
    for i, merge in enumerate(need("tokenizer.ggml.merges")):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise CheckpointError(f"{header.path}: tokenizer.ggml.merges[{i}] is {merge!r}; expected two tokens "
                                  "separated by one space")
        merges.append(pair)

    # subtle: a token written outside the byte-level alphabet is re-spelled byte by byte, as transformers does
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = i

    added = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        # a "control" token outside the alphabet is a llama.cpp mislabel; transformers skips it
        if (kind == CONTROL and set(token) <= alphabet) or (kind == USER_DEFINED and token in vocab):
            added[i] = {"content": token, "special": kind == CONTROL, "lstrip": False, "rstrip": False,
                        "single_word": False, "normalized": False}

    def token_of(key):
        token_id = md.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise CheckpointError(f"{header.path}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary "
                                  f"(0..{len(tokens) - 1})")
        return tokens[token_id]

    return {
        "vocab": vocab,
        "merges": merges,
        "added_tokens_decoder": added,
        "bos_token": token_of("bos_token_id"),
        "eos_token": token_of("eos_token_id"),
        "pad_token": token_of("padding_token_id"),
        "unk_token": token_of("unknown_token_id"),
        "chat_template": md.get("tokenizer.chat_template"),
        "model_max_length": VERY_LARGE_INTEGER,
        "normalization": None,
    }


def write_tokenizer_files(folder, kwargs):
    """Write vocab.json, merges.txt and tokenizer_config.json (with the chat template) for `kwargs`
    as returned by `gguf_tokenizer_kwargs`, in the layout transformers 4.x and 5.x both read.

    vocab.json holds every token of the GGUF vocabulary (added tokens and `[PAD…]` fillers included),
    so ids and `len(tokenizer)` are the GGUF's. Returns the list of files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(kwargs["vocab"], ensure_ascii=False, separators=(",", ":"))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kwargs["merges"])
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): t for i, t in sorted(kwargs["added_tokens_decoder"].items())},
        "bos_token": kwargs["bos_token"],
        "chat_template": kwargs["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": kwargs["eos_token"],
        "errors": "replace",
        "model_max_length": kwargs["model_max_length"],
        "pad_token": kwargs["pad_token"],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": kwargs["unk_token"],
    }
    if config["chat_template"] is None:
        del config["chat_template"]
    files = {
        "vocab.json": vocab_text,
        "merges.txt": merges_text,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }
    for name, text in files.items():
        tmp = folder / f"{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, folder / name)
    return sorted(files)

