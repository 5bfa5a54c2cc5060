"""What every qwen2np model shares: construction, loading and saving weights, moving between backends.

A model is its config plus a dict of arrays named as in the checkpoint. `Model(config)` draws random
weights as transformers does; `Model.from_pretrained(path)` reads a Hugging Face folder or a GGUF file.
"""

import functools
import inspect
import warnings

import numpy as np

from ..config import Qwen2Config
from ..errors import CheckpointError, ConfigTypeError
from ..inspection.tracing import forward_pass
from ..io.checkpoint import open_checkpoint
from ..io.hf_folder import save_hf_folder
from ..io.hub import resolve_model_path
from ..io.stored import StoredTensor
from ..weights.backend import backend as array_backend
from ..weights.backend import COMPUTE_DTYPES, array_module, resolve_dtype, to_numpy
from ..weights.parameters import check_memory, check_shapes, random_parameters
from ..weights.plan import check_forward, parse_memory, plan_weights, replan
from ..weights.store import StoredWeight, convert_rows, convert_whole, hold_weights, reads_file, row_chunks
from ..weights.system import apply_environment as apply_memory_environment
from ..weights.system import default_budget


class Qwen2PreTrainedModel:
    """Base of Qwen2Model and the heads.

    `self.params` maps checkpoint names to arrays (a tied lm_head is not stored twice). Subclasses
    define `parameter_shapes(config)` and `_set_params(params)`, which keeps the dict and indexes it, and
    a `__call__` decorated with `model_forward`; `model.forward` is the same call, as in transformers.
    """

    base_model_prefix = "model"
    # heads of the other classes, dropped (with a warning) when a checkpoint of one class is loaded in another
    foreign_heads = ("lm_head.weight", "score.weight", "score.bias")

    def __init__(self, config, *, dtype="float32", seed=0, params=None, weight_plan=None, mapped_files=None):
        """A model of `config` computing in `dtype`, with random weights drawn from `seed` as transformers'
        `Model(config)` draws them; or, when given, with `params` ({checkpoint name: array or StoredWeight},
        used as they are), as `from_pretrained` makes it: `weight_plan` says how they are held
        (weights.plan.WeightPlan), `mapped_files` ({name: io.stored.MappedFile}) the files they are read
        from while the model runs.

        The memory random weights need is checked first: a config too big for this machine is refused
        with the figures (e.g. the 11-billion-parameter default `Qwen2Config()`).
        """
        if not isinstance(config, Qwen2Config):
            raise ConfigTypeError(f"{type(self).__name__} needs a Qwen2Config, got {type(config).__name__}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        if params is None:
            shapes = self.parameter_shapes(config)
            check_memory(shapes, self.dtype, f"{type(self).__name__}({_describe(config)})")
            params = random_parameters(shapes, config, self.dtype, seed)
        apply_memory_environment(default=False)   # malloc left alone unless QWEN2NP_KEEP_FREED_MEMORY=1 (weights/system.py)
        self.xp = array_module(*params.values())  # the module of the arrays: numpy, or cupy after to("cupy")
        self.weight_plan = weight_plan            # None when built in memory
        self._mapped_files = dict(mapped_files or {})   # weight name -> the file it is read from
        self._set_params(params)
        self._attach_generation_config(None)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls):
            cls.forward = cls.__call__   # transformers' name for the forward pass

    @classmethod
    def from_config(cls, config, *, dtype="float32", seed=0):
        return cls(config, dtype=dtype, seed=seed)

    @classmethod
    def _from_params(cls, config, params, dtype, plan=None, files=None):
        """`cls(config, dtype=, params=, weight_plan=, mapped_files=)`, positionally."""
        return cls(config, dtype=dtype, params=params, weight_plan=plan, mapped_files=files)

    def check_can_run(self, args, logits=0, whole_scores=False):
        """Refuse, before anything is read or written, a forward pass that cannot run: weights read from a
        file that changed on disk since loading (io/stored.py), a cache made for another model or another
        batch (cache.py), temporaries beyond the memory budget (weights/plan.py). `args` are the pass's
        inputs.ForwardArguments, `logits` the rows of logits the head will make after it, `whole_scores`
        whether a trace makes some layer's [B, H, T, S] attention maps whole."""
        for file in set(self._mapped_files.values()):
            file.check()
        past = 0
        if args.cache is not None:
            args.cache.check_fits(self.config, args.batch, self.dtype)
            past = args.cache.get_seq_length()
        mask = args.attention_mask
        check_forward(self.weight_plan, self.config, args.batch, args.length, past, logits=logits,
                      padded=mask is not None and (mask.ndim == 4 or not mask.all()),
                      output_attentions=args.output_attentions, output_hidden_states=args.output_hidden_states,
                      whole_scores=whole_scores)

    # -- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype="float32", progress=None, max_memory=None, **config_overrides):
        """Load a Hugging Face folder (model.safetensors or shards), a .safetensors file or a .gguf file.

        `dtype` is the compute dtype: "float32", "float64", or "bfloat16"/"float16" (computed as
        transformers does in half precision). Weights stay in the file, memory-mapped, in the format it
        stores them in; within `max_memory` (bytes, or "6GB"; by default the memory available) those that
        fit are converted ahead of time and kept, the rest are converted at each use (docs/weights.md).
        `model.weight_plan.description` says what was chosen. `config_overrides` set config fields, e.g.
        `num_labels=3` for a classifier.
        """
        dtype = resolve_dtype(dtype)
        budget = default_budget() if max_memory is None else parse_memory(max_memory)
        checkpoint = open_checkpoint(resolve_model_path(path))
        config = Qwen2Config.from_dict({**checkpoint.config, **config_overrides})
        tensors = cls._params_from_checkpoint(config, checkpoint.tensors, checkpoint.origin, checkpoint.path,
                                              dtype)
        stored = {n: t for n, t in tensors.items() if isinstance(t, StoredTensor)}
        plan = plan_weights(stored, dtype, config, budget, what=f"{cls.__name__} from {checkpoint.path}")
        params = hold_weights(tensors, plan, progress)
        files = {n: t.file for n, t in stored.items() if reads_file(params[n])}   # not converted copies
        model = cls(config, dtype=dtype, params=params, weight_plan=plan, mapped_files=files)
        model._attach_generation_config(checkpoint.generation_config)
        return model

    def _attach_generation_config(self, generation_config):
        self.generation_config = None   # the causal LM keeps one

    @classmethod
    def _params_from_checkpoint(cls, config, tensors, origin, path, dtype=np.float32):
        """Match a checkpoint's tensors to this class: add or strip the `model.` prefix, drop the heads of
        other classes, tie the embeddings, and check every name and shape."""
        prefix = cls.base_model_prefix + "." if cls.base_model_prefix else ""
        tensors = {n: t for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}  # old buffers
        expected = cls.parameter_shapes(config)
        heads = [n for n in cls.foreign_heads if n in tensors]
        base = {n: t for n, t in tensors.items() if n not in heads}
        if prefix and base and not any(n.startswith(prefix) for n in base):  # a bare Qwen2Model checkpoint
            base = {prefix + n: t for n, t in base.items()}
            origin = {**origin, **{prefix + n: o for n, o in origin.items()}}
        if not prefix and any(n.startswith("model.") for n in base):       # a head's checkpoint into Qwen2Model
            base = {n[len("model."):]: t for n, t in base.items() if n.startswith("model.")}
            origin = {**origin, **{n[len("model."):]: o for n, o in origin.items()}}
        params = dict(base)
        for name in heads:
            tied = name == "lm_head.weight" and config.tie_word_embeddings and "lm_head.weight" not in expected
            if name in expected:
                params[name] = tensors[name]
            elif tied and cls.__name__ == "Qwen2ForCausalLM":  # the embedding serves as lm_head
                if not _same_values(tensors[name], params.get(f"{prefix}embed_tokens.weight")):
                    warnings.warn(f"lm_head.weight in {origin.get(name, path)} differs from the embedding; "
                                  "tie_word_embeddings is true, so the embedding is used", stacklevel=3)
            else:
                warnings.warn(f"{name} in {origin.get(name, path)} is not used by {cls.__name__}", stacklevel=3)
        params = cls._complete_head(config, params, expected, path, dtype)
        check_shapes(params, expected, origin, path)
        return params

    @classmethod
    def _complete_head(cls, config, params, expected, path, dtype):
        return params

    # -- the weights --------------------------------------------------------------------------------

    def state_dict(self):
        """name -> array, with the checkpoint's names (a tied lm_head appears, as in transformers)."""
        tensors = dict(self.params)
        if getattr(self, "lm_head", None) is not None and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = self.lm_head
        return tensors

    def load_state_dict(self, tensors, strict=True):
        """Replace weights by name (e.g. to perturb one). Shapes must match; with strict, every weight.

        A weight replaced by an array no longer comes from the checkpoint: the model stops checking its
        file (a file it no longer reads may change), and its weight plan says it is kept in memory."""
        current = self.state_dict()
        expected = {n: tuple(a.shape) for n, a in current.items()}
        unknown = [n for n in tensors if n not in expected]
        if unknown:
            raise CheckpointError(f"{unknown[0]}: not a parameter of {type(self).__name__}")
        if strict:
            check_shapes(tensors, expected, {}, "load_state_dict")
        for name, array in tensors.items():
            if tuple(array.shape) != expected[name]:
                raise CheckpointError(f"{name}: expected shape {expected[name]}, found {tuple(array.shape)}")
        merged = {**current, **{n: self.xp.asarray(a).astype(self.dtype, copy=False) for n, a in tensors.items()}}
        if getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" in merged:
            if "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors:
                merged["model.embed_tokens.weight"] = merged["lm_head.weight"]
            merged.pop("lm_head.weight")
        replaced = {n for n, a in merged.items() if a is not current.get(n)}
        plan = self.weight_plan
        if plan is not None and replaced:   # checked before anything changes: the arrays must fit the budget
            plan = replan(plan, _holding(merged), self.dtype, self.config,
                          f"{type(self).__name__} after load_state_dict")
        self.weight_plan = plan
        self._mapped_files = {n: f for n, f in self._mapped_files.items() if n not in replaced}
        self._set_params(merged)

    def num_parameters(self):
        seen = {id(a): a.size for a in self.state_dict().values()}  # a tied weight counts once
        return sum(seen.values())

    def save_pretrained(self, folder, max_shard_bytes=None, overwrite=None):
        """Write config.json and model.safetensors (a tied lm_head is left out, as transformers does).

        The folder is written whole; `overwrite` (None: replace the model files of a Hugging Face folder and
        keep its tokenizer files; True: replace the folder whole; False: refuse a folder that holds files)
        is `save_hf_folder`'s."""
        tensors = self.state_dict()
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        # a weight converted per use is written a block at a time (never whole), the others as arrays
        tensors = {n: a if isinstance(a, StoredWeight) else np.ascontiguousarray(to_numpy(a))
                   for n, a in tensors.items()}
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        generation = self.generation_config.to_diff_dict() if self.generation_config is not None else None
        save_hf_folder(folder, config, tensors, generation_config=generation, max_shard_bytes=max_shard_bytes,
                       overwrite=overwrite)

    def to(self, name):
        """Convert the weights to another compute dtype ("float32", "float64"), or move them to another
        backend ("numpy", "cupy"), in place like torch's `module.to`; returns self.

        float32 weights convert to float64 exactly, so `model.to("float64")` gives the model that
        `from_pretrained(..., dtype="float64")` gives, without reading the file again. Converting kept
        weights needs memory for the new arrays: that is checked first, and a conversion that cannot fit
        is refused with the figures (load with `from_pretrained(..., dtype=, max_memory=)` instead).
        """
        if name in COMPUTE_DTYPES:
            dtype = resolve_dtype(name)
            # a weight converted per use stays so (in the new dtype); a kept one is converted now, after
            # checking that the new arrays fit the machine and the budget, and the plan says so
            kept = {n: a for n, a in self.params.items() if not isinstance(a, StoredWeight)}
            what = f"{type(self).__name__}.to({name!r})"
            check_memory({n: a.shape for n, a in kept.items() if a.dtype != dtype}, dtype, what)
            plan = None if self.weight_plan is None else replan(self.weight_plan, _holding(self.params), dtype,
                                                                 self.config, what)
            params = {n: StoredWeight(a.stored, dtype, a.stream) if isinstance(a, StoredWeight)
                      else a.astype(dtype, copy=False) for n, a in self.params.items()}
            # a kept memory map converted to another dtype is a copy: its file is no longer read
            self._mapped_files = {n: f for n, f in self._mapped_files.items() if reads_file(params[n])}
            self.dtype, self.weight_plan = dtype, plan
        else:
            xp = array_backend(name)
            # subtle: back to NumPy with to_numpy: np.asarray refuses a cupy array (no implicit copies); a
            # weight converted per use is converted whole on the way to the device
            move = to_numpy if xp is np else xp.asarray
            if xp is np and self.weight_plan is not None:   # weights converted per use are kept from now on
                self.weight_plan = replan(self.weight_plan, {n: ("kept",) + h[1:] for n, h in
                                                             _holding(self.params).items()}, self.dtype,
                                          self.config, f"{type(self).__name__}.to({name!r})")
            params = {n: move(np.asarray(a) if isinstance(a, StoredWeight) else a) for n, a in self.params.items()}
            self._mapped_files = {n: f for n, f in self._mapped_files.items() if reads_file(params[n])}
            self.xp = xp
        self._set_params(params)
        return self

    def __repr__(self):
        c = self.config
        return (f"{type(self).__name__}({c.num_hidden_layers} layers, D={c.hidden_size}, H={c.num_attention_heads}, "
                f"KV={c.num_key_value_heads}, HD={c.head_dim}, F={c.intermediate_size}, V={c.vocab_size}, "
                f"{self.dtype.name})")


def _holding(params):
    """{name: (how, size, ndim)}: how each weight of `params` is held now ("kept", "mapped", "streamed")."""
    return {n: ("kept" if not isinstance(a, StoredWeight) else "streamed" if a.stream else "mapped", a.size, a.ndim)
            for n, a in params.items()}


def _same_values(a, b):
    """Whether two checkpoint tensors (StoredTensors or arrays) hold the same values, compared a block of
    rows at a time so that two big stored matrices are never converted whole."""
    if b is None or tuple(a.shape) != tuple(b.shape):
        return False
    if not isinstance(a, StoredTensor) or not isinstance(b, StoredTensor):
        return bool(np.array_equal(np.asarray(_whole(a)), np.asarray(_whole(b))))
    for r0, r1 in row_chunks(a, row_bytes=a.num_columns * 8):    # the store's chunks, of float64 rows
        if not np.array_equal(convert_rows(a, r0, r1, np.float64), convert_rows(b, r0, r1, np.float64)):
            return False
    a.release()
    b.release()
    return True


def _whole(t):
    return convert_whole(t, np.float64) if isinstance(t, StoredTensor) else t


def _describe(config):
    return (f"hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, "
            f"vocab_size={config.vocab_size}")



def model_forward(call):
    """Decorates a model class's `__call__`: it runs as a forward pass (`forward_pass`: the traces opened
    on the model see its intermediates) and returns its output record, or, with `return_dict=False`, the
    record's tuple, as transformers. The decorated `__call__` keeps `return_dict` in its signature (so
    that a positional call binds as transformers'), and leaves it to this decorator."""
    position = list(inspect.signature(call).parameters).index("return_dict") - 1   # among args, after self

    @forward_pass
    @functools.wraps(call)
    def forward(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        return_dict = args[position] if len(args) > position else kwargs.get("return_dict")
        return out if return_dict in (None, True) else out.to_tuple()

    return forward
