"""qwen2np: the Qwen2 language-model family in pure NumPy.

A from-scratch, readable implementation of what Hugging Face transformers 5.24.0 calls Qwen2: the
byte-level BPE tokenizer, the model with its heads, generation and chat templates, exact against
transformers and able to name and dump every intermediate tensor.

>>> import qwen2np
>>> tok = qwen2np.Qwen2Tokenizer.from_pretrained()
>>> tok("Hello world")["input_ids"]
[9707, 1879]

The public names are imported lazily, so ``qwen2np tokenize`` does not pay for loading the model code.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Qwen2Config": "qwen2np.config",
    "Qwen2Tokenizer": "qwen2np.tokenizer",
    "Qwen2TokenizerFast": "qwen2np.tokenizer",
    "IncrementalDecoder": "qwen2np.tokenizer",
    "BatchEncoding": "qwen2np.tokenizer",
    "AddedToken": "qwen2np.tokenizer",
    "Qwen2Model": "qwen2np.model.modeling",
    "Qwen2ForCausalLM": "qwen2np.model.modeling",
    "Qwen2ForSequenceClassification": "qwen2np.model.modeling",
    "Qwen2ForTokenClassification": "qwen2np.model.modeling",
    "DynamicCache": "qwen2np.model.cache",
    "GenerationConfig": "qwen2np.generation",
    "TextStreamer": "qwen2np.generation",
    "TextIteratorStreamer": "qwen2np.generation",
    "trace": "qwen2np.inspection.tracing",
    "Trace": "qwen2np.inspection.tracing",
    "zero_head": "qwen2np.inspection.edits",
    "patch_from": "qwen2np.inspection.edits",
    "keep_freed_memory": "qwen2np.weights.system",
    "value_and_grad": "qwen2np.grad.model",
    "AdamW": "qwen2np.grad.optim",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen2np' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__
