"""Where a tokenizer comes from and where it goes: the bundled files, a Hugging Face folder, a GGUF
file, and `save_pretrained`.

Loading follows transformers 5.24's ``from_pretrained``:

* tokenizer.json is preferred to vocab.json + merges.txt when both are present;
* tokenizer_config.json gives the constructor's keyword arguments; its ``added_tokens_decoder`` wins.
  Without one, special_tokens_map.json fills in the special tokens and tokenizer.json's
  ``added_tokens`` gives the added tokens;
* chat_template.jinja beside them overrides the config's ``chat_template``;
* keyword arguments given to ``from_pretrained`` override everything read from files.
"""

import os
import threading
from importlib import resources

from ..errors import TokenizerFileError, TokenizerTypeError
from ..io.hub import resolve_model_path
from .files import (SPECIAL_TOKEN_KEYS, added_token_from_json, find_tokenizer_files, json_text, merges_txt_text,
    read_json, read_text, read_tokenizer_config, vocab_json_text)
from .gguf import gguf_tokenizer_kwargs


def bundled_tokenizer_dir():
    """The folder of the tokenizer files shipped with qwen2np (Qwen2.5's, see its NOTICE).

    >>> sorted(os.listdir(bundled_tokenizer_dir()))
    ['NOTICE', 'merges.txt', 'tokenizer_config.json', 'vocab.json']
    """
    return str(resources.files("qwen2np") / "data" / "tokenizer")


def _drop_internal_keys(cfg):
    for key in ("tokenizer_class", "init_inputs", "auto_map", "processor_class", "name_or_path",
                "vocab_file", "merges_file", "tokenizer_file", "special_tokens_map_file"):
        cfg.pop(key, None)
    return cfg


def constructor_kwargs_from_folder(folder, tokenizer_json=None):
    """The keyword arguments that build the tokenizer saved in `folder` (see the module docstring).

    `tokenizer_json` forces that file (a path given directly to ``from_pretrained``).
    """
    files = find_tokenizer_files(folder)
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json
    if "tokenizer.json" not in files and not ("vocab.json" in files and "merges.txt" in files):
        present = sorted(files) or "no tokenizer files"
        raise TokenizerFileError(
            f"{folder}: expected tokenizer.json, or vocab.json and merges.txt, found {present}")
    kwargs = {}
    if "tokenizer_config.json" in files:
        kwargs = _drop_internal_keys(read_tokenizer_config(files["tokenizer_config.json"]))
    if "tokenizer.json" in files:
        kwargs["tokenizer_file"] = files["tokenizer.json"]
        # transformers ignores add_bos_token/add_eos_token from the config when tokenizer.json is there
        kwargs.pop("add_bos_token", None)
        kwargs.pop("add_eos_token", None)
    else:
        kwargs["vocab_file"] = files["vocab.json"]
        kwargs["merges_file"] = files["merges.txt"]
    if "added_tokens_decoder" not in kwargs and "special_tokens_map.json" in files:
        path = files["special_tokens_map.json"]
        stm = read_json(path)
        if not isinstance(stm, dict):
            raise TokenizerFileError(f"{path}: expected a JSON object, found {type(stm).__name__}")
        for key, value in stm.items():
            if key in SPECIAL_TOKEN_KEYS and value is not None:
                kwargs[key] = added_token_from_json(value, f"{path}: key {key!r}")
            elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                kwargs[key] = [added_token_from_json(t, f"{path}: key {key!r}[{k}]") for k, t in enumerate(value)]
    if "chat_template.jinja" in files:
        kwargs["chat_template"] = read_text(files["chat_template.jinja"])
    kwargs["name_or_path"] = str(folder)
    return kwargs


_SETTABLE = {"model_max_length", "padding_side", "truncation_side", "split_special_tokens", "chat_template",
             "clean_up_tokenization_spaces", "errors", "bos_token", "eos_token", "unk_token", "pad_token",
             "add_prefix_space", "normalization"}


def load_tokenizer(cls, path, kwargs):
    """Build `cls` from `path` (None: the bundled files; a folder; a tokenizer.json; a .gguf file)."""
    if path is None:
        path = bundled_tokenizer_dir()
    path = os.fspath(path)
    if not os.path.exists(path):  # `test` (the fetched test checkpoint) or a Hub id, as for the model
        path = os.fspath(resolve_model_path(path))
    if os.path.isdir(path):
        found = constructor_kwargs_from_folder(path)
    elif os.path.isfile(path) and path.lower().endswith(".gguf"):
        tok = cls(**gguf_tokenizer_kwargs(path))    # gguf.py: the tokenizer a GGUF carries in its metadata
        for key, value in kwargs.items():  # overrides of plain settings; the tables come from the file
            if key not in _SETTABLE:
                raise TokenizerFileError(
                    f"{path}: from_pretrained({key}=...): a .gguf tokenizer accepts overrides of {sorted(_SETTABLE)} only")
            setattr(tok, key, value)
        return tok
    elif os.path.isfile(path) and path.lower().endswith(".json"):
        found = constructor_kwargs_from_folder(os.path.dirname(os.path.abspath(path)), tokenizer_json=path)
    elif os.path.exists(path):
        raise TokenizerFileError(
            f"{path}: expected a tokenizer folder, a tokenizer.json or a .gguf file, found another kind of file")
    found.update(kwargs)
    return cls(**found)


def save_tokenizer(tok, folder):
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`.

    Whole or not at all: every file is written beside its target first and renamed into place only when
    all four are written, so a failure (a full disk) leaves the folder as it was."""
    if not (isinstance(folder, str) or hasattr(folder, "__fspath__")):
        raise TokenizerTypeError(f"save_pretrained: expected a folder path, found {type(folder).__name__}")
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        raise TokenizerFileError(f"{folder}: expected a folder to save the tokenizer in, found a file")
    specials = {key: getattr(tok, key) for key in SPECIAL_TOKEN_KEYS}
    extra = [str(t) for t in tok._extra_special_tokens]
    config = {
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": tok.add_eos_token,
        "add_prefix_space": tok.add_prefix_space,
        "added_tokens_decoder": {str(i): t.__getstate__() for i, t in tok.added_tokens_decoder.items()},
        "additional_special_tokens": extra,
        **{k: v for k, v in specials.items() if v is not None or k in ("bos_token", "unk_token")},
        "chat_template": tok.chat_template,
        "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces,
        "errors": tok.errors,
        "model_max_length": tok.model_max_length,
        "padding_side": tok.padding_side,
        "split_special_tokens": tok.split_special_tokens,
        "tokenizer_class": "Qwen2Tokenizer",
        "truncation_side": tok.truncation_side,
    }
    if config["chat_template"] is None:
        del config["chat_template"]
    # qwen2np's own keys (transformers ignores them): a GGUF's tokenizer has no NFC step; a tokenizer.json
    # may ask for ignore_merges
    if tok.normalization is None:
        config["normalization"] = None
    if tok.ignore_merges:
        config["ignore_merges"] = True
    special_map = {k: v for k, v in specials.items() if v is not None}
    if extra:
        special_map["additional_special_tokens"] = extra
    texts = {"tokenizer_config.json": json_text(config), "special_tokens_map.json": json_text(special_map),
             "vocab.json": vocab_json_text(tok._vocab), "merges.txt": merges_txt_text(tok._merges)}
    paths = {name: os.path.join(folder, name) for name in texts}
    temporary = {name: f"{path}.tmp-{os.getpid()}-{threading.get_ident()}" for name, path in paths.items()}
    try:
        os.makedirs(folder, exist_ok=True)
        for name, text in texts.items():
            with open(temporary[name], "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        for name in texts:
            os.replace(temporary[name], paths[name])
    except OSError as e:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        raise TokenizerFileError(f"{folder}: cannot save the tokenizer there ({e.strerror or e})") from None
    return tuple(paths.values())
