"""Reading tokenizer.json, the `tokenizers` library's single file: the BPE model, the added tokens, and
the pipeline around them, each field honoured or refused.

A field that changes the ids or the decoded text is never silently ignored. What Qwen2 tokenizers use is
honoured, as ``tokenizers.Tokenizer.from_file`` reads it; anything else raises a TokenizerFileError
naming the file, the field, the value found and what qwen2np supports:

* ``normalizer``: ``{"type": "NFC"}`` or null (no normalisation; a Sequence of those too);
* ``pre_tokenizer``: the Qwen2 ``Split`` regex (``Isolated``, not inverted) then ``ByteLevel`` with
  ``use_regex: false``; its ``add_prefix_space`` is honoured (``trim_offsets`` changes offsets only);
* ``decoder``: ``ByteLevel``;
* ``post_processor``: null, ``ByteLevel`` (offsets only), or a ``TemplateProcessing`` that adds no token
  (sequence A, and A then B with type ids 0 and 1);
* ``truncation``, ``padding``: null (truncate and pad with the call's arguments);
* ``model``: ``BPE`` with ``dropout`` null or 0, ``continuing_subword_prefix`` and ``end_of_word_suffix``
  empty, and ``ignore_merges`` honoured (true: a piece that is itself a vocabulary token is emitted whole,
  without merging). ``unk_token``, ``fuse_unk`` and ``byte_fallback`` act only on a symbol missing from
  the vocabulary, so they are accepted when the vocabulary has all 256 byte-level symbols (Qwen's has).

subtle: transformers 5.24's ``Qwen2Tokenizer`` takes only ``model.vocab`` and ``model.merges`` (and the
post-processor) from tokenizer.json and rebuilds the rest itself (NFC, the Qwen2 regex, no
``ignore_merges``). For Qwen's own files the two readings agree; for a file that says otherwise qwen2np
follows the file, as ``tokenizers`` does (docs/tokenizer.md, "tokenizer.json").
"""

import json
from collections import namedtuple

from ..errors import TokenizerFileError
from .bytes_level import bytes_to_unicode
from .files import added_token_from_json, check_vocab, normalize_merges, read_json
from .pretokenize import PRETOKENIZE_REGEX

# What tokenizer.json says about the stages around BPE (None for a tokenizer not made from one).
Pipeline = namedtuple("Pipeline", "normalization add_prefix_space ignore_merges")

_SUPPORTED = {
    "normalizer": '{"type": "NFC"} or null',
    "pre_tokenizer": ('{"type": "Sequence", "pretokenizers": [the Qwen2 Split regex (behavior "Isolated", invert '
                      'false), {"type": "ByteLevel", "use_regex": false, ...}]}'),
    "decoder": '{"type": "ByteLevel", ...}',
    "post_processor": 'null, {"type": "ByteLevel", ...} or a TemplateProcessing that adds no token',
}


def _refuse(where, field, value, supported=None):
    raise TokenizerFileError(
        f"{where}: key {field!r}: found {_short(value)}; qwen2np supports {supported or _SUPPORTED[field]}")


def _short(value):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 160 else text[:157] + "..."


def _normalization(value, where):
    """'NFC' or None from the ``normalizer`` field (NFC, or a Sequence of NFC steps, or nothing)."""
    if value is None:
        return None
    steps = value.get("normalizers") if isinstance(value, dict) and value.get("type") == "Sequence" else [value]
    if isinstance(steps, list) and all(isinstance(step, dict) and step.get("type") == "NFC" for step in steps):
        return "NFC" if steps else None  # (NFC twice is NFC once)
    _refuse(where, "normalizer", value)


def _is_qwen2_split(step):
    return (isinstance(step, dict) and step.get("type") == "Split" and step.get("pattern") == {"Regex": PRETOKENIZE_REGEX}
            and step.get("behavior") == "Isolated" and step.get("invert") is False)


def _add_prefix_space(value, where):
    """The ByteLevel pre-tokenizer's ``add_prefix_space`` from the ``pre_tokenizer`` field, once the
    field is checked to be the Qwen2 split followed by a ByteLevel without its own (GPT-2) regex."""
    steps = value.get("pretokenizers") if isinstance(value, dict) and value.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2 and _is_qwen2_split(steps[0])):
        _refuse(where, "pre_tokenizer", value)
    byte_level = steps[1]
    if not (isinstance(byte_level, dict) and byte_level.get("type") == "ByteLevel"
            and byte_level.get("use_regex") is False and isinstance(byte_level.get("add_prefix_space"), bool)):
        _refuse(where, "pre_tokenizer", value)
    return byte_level["add_prefix_space"]


def _check_decoder(value, where):
    if not (isinstance(value, dict) and value.get("type") == "ByteLevel"):
        _refuse(where, "decoder", value)


def _adds_no_token(template, pair):
    """A TemplateProcessing template that is just the sequence(s): [A] or [A (type 0), B (type 1)]."""
    want = [("A", 0), ("B", 1)] if pair else [("A", 0)]
    found = [(p.get("Sequence", {}).get("id"), p.get("Sequence", {}).get("type_id"))
             if isinstance(p, dict) and isinstance(p.get("Sequence"), dict) else None for p in template or []]
    return found == want


def _check_post_processor(value, where):
    if value is None or (isinstance(value, dict) and value.get("type") == "ByteLevel"):
        return
    if isinstance(value, dict) and value.get("type") == "Sequence" and isinstance(value.get("processors"), list):
        for step in value["processors"]:
            if not isinstance(step, dict) or step.get("type") == "Sequence":
                _refuse(where, "post_processor", value)
            _check_post_processor(step, where)
        return
    if (isinstance(value, dict) and value.get("type") == "TemplateProcessing"
            and _adds_no_token(value.get("single"), False) and _adds_no_token(value.get("pair"), True)):
        return
    _refuse(where, "post_processor", value)


def _check_model_options(model, vocab, where):
    """Check the BPE model's options (see the module doc); return its ``ignore_merges``."""

    def refuse(key, supported):
        raise TokenizerFileError(f"{where}: key 'model.{key}': found {_short(model[key])}; qwen2np supports {supported}")

    dropout = model.get("dropout")
    if dropout is not None and (type(dropout) not in (int, float) or dropout != 0):
        refuse("dropout", "null or 0 (BPE dropout makes encoding random)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            refuse(key, 'null or "" (byte-level BPE has no word markers)')
    # these three act only on a symbol that is not in the vocabulary: with all 256 byte-level symbols there
    # is none, and any value gives the same ids
    full_alphabet = set(bytes_to_unicode().values()).issubset(vocab)
    for key, inert, inert_json in (("unk_token", None, "null"), ("fuse_unk", False, "false"),
                                   ("byte_fallback", False, "false")):
        value = model.get(key, inert)
        if value is not inert and not full_alphabet:
            refuse(key, f"{inert_json} when the vocabulary lacks some of the 256 byte-level symbols, as this one does")
        if key != "unk_token" and type(value) is not bool:
            refuse(key, "true or false")
        if key == "unk_token" and value is not None and type(value) is not str:
            refuse(key, "a token string or null")
    ignore = model.get("ignore_merges", False)
    if type(ignore) is not bool:
        refuse("ignore_merges", "true or false")
    return ignore


def read_tokenizer_json(path):
    """Read tokenizer.json: ``(vocab, merges, {id: AddedToken}, Pipeline)``; errors name the key."""
    where = str(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{where}: expected a JSON object, found {type(data).__name__}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise TokenizerFileError(f"{where}: key 'model': expected an object, found {model!r}")
    if model.get("type", "BPE") != "BPE":
        raise TokenizerFileError(f"{where}: key 'model.type': expected 'BPE', found {model.get('type')!r}")
    if "vocab" not in model:
        raise TokenizerFileError(f"{where}: key 'model.vocab' is missing")
    vocab = check_vocab(model["vocab"], f"{where}: model.vocab")
    merges = normalize_merges(model.get("merges", []), f"{where}: model.merges")
    if not merges:
        raise TokenizerFileError(f"{where}: key 'model.merges': expected at least one merge, found none")
    pipeline = Pipeline(
        normalization=_normalization(data.get("normalizer"), where),
        add_prefix_space=_add_prefix_space(data.get("pre_tokenizer"), where),
        ignore_merges=_check_model_options(model, vocab, where),
    )
    _check_decoder(data.get("decoder"), where)
    _check_post_processor(data.get("post_processor"), where)
    for key in ("truncation", "padding"):
        if data.get(key) is not None:
            _refuse(where, key, data[key], "null (qwen2np truncates and pads with the call's arguments)")
    added = {}
    tokens = data.get("added_tokens", [])
    if not isinstance(tokens, list):
        raise TokenizerFileError(f"{where}: key 'added_tokens': expected a list, found {type(tokens).__name__}")
    for k, entry in enumerate(tokens):
        at = f"{where}: added_tokens[{k}]"
        if not isinstance(entry, dict) or type(entry.get("id")) is not int or not 0 <= entry["id"] < 2**32:
            raise TokenizerFileError(f"{at}: expected an object with an integer 'id' from 0 to 2**32 - 1, found {entry!r:.120}")
        if entry["id"] in added:
            raise TokenizerFileError(f"{at}: id {entry['id']} appears twice")
        added[entry["id"]] = added_token_from_json({k2: v for k2, v in entry.items() if k2 != "id"}, at)
    return vocab, merges, added, pipeline
