"""Qwen2Model and its heads: causal LM, sequence classification, token classification.

The forward pass, in the legend of docs/dimensions.md (B batch, T new positions, S key positions,
D hidden, V vocabulary):

    x = embed_tokens[input_ids]                                     # [B, T, D]
    for each of the L layers:                                       # decoder_layer, below
        x = x + self_attn(input_layernorm(x))                       # RoPE, grouped-query attention
        x = x + mlp(post_attention_layernorm(x))                    # SwiGLU
    h = norm(x)                                                     # [B, T, D]
    logits = h @ lm_headᵀ                                           # [B, T, V]

Every intermediate passes through `tap` under its name (docs/intermediates.md), so `qwen2np.trace` can
record or edit it.

>>> import numpy as np
>>> from qwen2np import Qwen2Config, Qwen2ForCausalLM
>>> config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                      num_attention_heads=4, num_key_value_heads=2)
>>> model = Qwen2ForCausalLM(config, seed=0)
>>> out = model(np.array([[1, 2, 3]]))
>>> out.logits.shape, out.logits.dtype, out.past_key_values.get_seq_length()
((1, 3, 32), dtype('float32'), 3)
"""
import warnings

import numpy as np

from ..errors import ModelInputError, ModelInputTypeError
from ..generation import GenerationConfig
from ..generation.utils import GenerationMixin
from ..inspection.names import intermediate_names
from ..inspection.tracing import forward_pass, tap
from ..weights.backend import to_numpy
from ..weights.parameters import base_parameter_shapes, random_parameters
from ..weights.plan import check_forward
from ..weights.store import take_rows
from .attention import self_attention
from .cache import DynamicCache
from .inputs import as_attention_mask, as_embeddings, as_position_ids, as_token_ids
from .layers import ACT2FN, linear, rms_norm, swiglu_mlp
from .losses import (causal_lm_loss, check_labels, check_sequence_labels, sequence_classification_loss,
    token_classification_loss)
from .masks import AttentionMask, CausalSpan, build_attention_bias, packed_sequence_ids
from .outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast,
    TokenClassifierOutput)
from .pretrained import Qwen2PreTrainedModel
from .rope import RotaryEmbedding


def decoder_layer(x, w, cos, sin, mask, cache_layer, config, scope, output_attentions=True):
    """One Qwen2 block: attention, then MLP, each on a normalised copy of x and added back.

    x [B, T, D] -> [B, T, D], and the attention probabilities [B, H, T, S].
    `w` maps the layer's checkpoint names (`input_layernorm.weight`, `self_attn.q_proj.bias`, …) to arrays.
    """
    eps = config.rms_norm_eps
    h = tap(scope, "input_layernorm", rms_norm(x, w["input_layernorm.weight"], eps))
    attn, probs = self_attention(
        h, w["self_attn"], cos, sin, mask, cache_layer,
        config.num_attention_heads, config.num_key_value_heads, config.head_dim, f"{scope}.self_attn",
        need_probs=output_attentions,
    )
    x = tap(scope, "resid_mid", x + attn)                          # residual: the stream after attention
    h = tap(scope, "post_attention_layernorm", rms_norm(x, w["post_attention_layernorm.weight"], eps))
    x = x + swiglu_mlp(h, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"],
                       ACT2FN[config.hidden_act], f"{scope}.mlp")  # residual
    return tap(scope, None, x), probs


class Qwen2Model(Qwen2PreTrainedModel):
    """The decoder stack without a head: input ids -> final hidden states [B, T, D]."""

    base_model_prefix = ""

    @classmethod
    def parameter_shapes(cls, config):
        return base_parameter_shapes(config)

    def _set_params(self, params, scope=""):
        self.params = params
        self.scope = scope
        prefix = f"{scope}." if scope else ""
        self.layers = []   # per layer: its weights under their in-layer names, and its trace scope
        for i in range(self.config.num_hidden_layers):
            name = f"layers.{i}."
            w = {k[len(name):]: v for k, v in params.items() if k.startswith(name)}
            w["self_attn"] = {k[len("self_attn."):]: v for k, v in w.items() if k.startswith("self_attn.")}
            self.layers.append((w, f"{prefix}layers.{i}"))
        self.rotary_emb = RotaryEmbedding(self.config, self.dtype, self.xp)

    def intermediate_names(self):
        """Every name `tap` uses in a forward pass, in order (docs/intermediates.md)."""
        return intermediate_names(self.config.num_hidden_layers, self.scope, head=())

    @forward_pass
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                 return_dict=None, cache=None):
        config, xp = self.config, self.xp
        for file in self._mapped_files:   # weights read from files that changed under the model: refuse
            file.check()
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _one_of(past_key_values, cache)
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states

        if inputs_embeds is None:
            ids = as_token_ids(input_ids, config.vocab_size)
            x = take_rows(self.params["embed_tokens.weight"], xp.asarray(ids))   # [B, T] -> [B, T, D]
        else:
            x = as_embeddings(inputs_embeds, config.hidden_size, self.dtype, xp)
        x = tap(self.scope, "embed_tokens", x)
        B, T, _ = x.shape
        if cache is None and use_cache:
            cache = DynamicCache.from_config(config)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ModelInputTypeError(f"past_key_values: expected a qwen2np DynamicCache, found {type(cache).__name__}")
        if cache is not None:
            cache.check_fits(config, B, self.dtype)
        past = cache.get_seq_length() if cache is not None else 0
        check_forward(self.weight_plan, config, B, T, past)   # temporaries within the memory budget (weights/plan.py)
        attention_mask = as_attention_mask(attention_mask, B, past + T)
        positions = as_position_ids(position_ids, B, T, past)              # [B or 1, T]
        masks = self._masks(attention_mask, positions if position_ids is not None else None, cache, B, T, past)
        cos, sin = self.rotary_emb(positions)                               # [B or 1, T, HD]
        cos, sin = tap(self.scope, "rotary_emb.cos", cos), tap(self.scope, "rotary_emb.sin", sin)

        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        # subtle: everything above checked the call; a failure from here on (a trace edit that raises,
        # Ctrl-C, out of memory) hands the cache back as it was, not with some layers one step ahead
        before = cache.state() if cache is not None else None
        try:
            for i, (w, scope) in enumerate(self.layers):
                cache_layer = cache.layers[i] if cache is not None else None
                x, probs = decoder_layer(x, w, cos, sin, masks[config.layer_types[i]], cache_layer, config, scope,
                                         output_attentions)
                if output_hidden_states:
                    hidden_states.append(x)
                if output_attentions:
                    attentions.append(probs)
        except BaseException:
            if cache is not None:
                cache.restore(before)
            raise
        x = tap(self.scope, "norm", rms_norm(x, self.params["norm.weight"], config.rms_norm_eps))
        if output_hidden_states:
            # subtle: as in transformers, the last hidden state is the one *after* the final norm
            hidden_states[-1] = x
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict in (None, True) else out.to_tuple()

    forward = __call__

    def _masks(self, attention_mask, position_ids, cache, B, T, past):
        """layer type -> AttentionMask: the additive bias [B, 1, T, S], and its causal span when no key is
        padding (then attention may skip the hidden triangle)."""
        if attention_mask is not None and attention_mask.ndim == 4:   # a custom mask, used as given
            S = past + T
            if attention_mask.shape not in ((B, 1, T, S), (1, 1, T, S)):
                raise ModelInputError(f"attention_mask: a 4D mask must have shape [B, 1, T, S] = ({B}, 1, {T}, {S}), "
                                 f"found {attention_mask.shape}")
            bias = self.xp.asarray(attention_mask).astype(self.dtype, copy=False)
            return {kind: AttentionMask(bias) for kind in set(self.config.layer_types)}
        # subtle: packed sequences (positions restart inside a row) are only detected without a mask or a
        # cache, as in transformers (docs/masks.md)
        packed = None
        if position_ids is not None and attention_mask is None and cache is None:
            packed = packed_sequence_ids(np.broadcast_to(position_ids, (B, T)))
        masks = {}
        for kind in set(self.config.layer_types):
            window = self.config.sliding_window if kind == "sliding_attention" else None
            if cache is not None:
                layer_idx = self.config.layer_types.index(kind)
                kv_len, kv_start = cache.get_mask_sizes(T, layer_idx)
            else:
                kv_len, kv_start = T, 0
            bias = build_attention_bias(
                B, past, T, kv_start, kv_len, attention_mask,
                None if packed is None else np.broadcast_to(position_ids, (B, T)),
                window, self.dtype, packed, self.xp,
            )
            no_padding = packed is None and (attention_mask is None or attention_mask.all())
            masks[kind] = AttentionMask(bias, CausalSpan(past, kv_start, window) if no_padding else None)
        return masks


class _WithBaseModel(Qwen2PreTrainedModel):
    """A head on top of `self.model`, a Qwen2Model sharing this model's arrays."""

    head_shapes = {}  # name -> shape function of the config

    @classmethod
    def parameter_shapes(cls, config):
        shapes = {f"model.{n}": s for n, s in base_parameter_shapes(config).items()}
        shapes.update({n: f(config) for n, f in cls.head_shapes.items()})
        return shapes

    def _set_params(self, params):
        self.params = params
        base = {n[len("model."):]: a for n, a in params.items() if n.startswith("model.")}
        self.model = Qwen2Model.__new__(Qwen2Model)
        self.model.config, self.model.dtype, self.model.xp = self.config, self.dtype, self.xp
        self.model.generation_config = None
        self.model.weight_plan, self.model._mapped_files = self.weight_plan, self._mapped_files
        self.model._set_params(base, scope="model")

    def intermediate_names(self):
        return self.model.intermediate_names() + self.head_intermediate_names

    def _base(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
              output_attentions, output_hidden_states):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states)

    @classmethod
    def _complete_head(cls, config, params, expected, path, dtype):
        """A classifier loaded from a language-model checkpoint gets a fresh random head, as transformers
        does (and says so)."""
        missing = {n: expected[n] for n in cls.head_shapes if n in expected and n not in params}
        if missing and cls is not Qwen2ForCausalLM:
            warnings.warn(f"{', '.join(missing)} not in {path}: initialised at random for {cls.__name__}",
                          stacklevel=4)
            params = {**params, **random_parameters(missing, config, dtype)}
        return params


class Qwen2ForCausalLM(_WithBaseModel, GenerationMixin):
    """Qwen2Model plus the language-model head: next-token logits over the vocabulary."""

    head_shapes = {"lm_head.weight": lambda c: (c.vocab_size, c.hidden_size)}
    head_intermediate_names = ["logits"]

    @classmethod
    def parameter_shapes(cls, config):
        shapes = super().parameter_shapes(config)
        if config.tie_word_embeddings:  # lm_head *is* the embedding matrix
            del shapes["lm_head.weight"]
        return shapes

    def _set_params(self, params):
        super()._set_params(params)
        self.lm_head = params.get("lm_head.weight", params["model.embed_tokens.weight"])   # [V, D]

    def _attach_generation_config(self, generation_config):
        self.generation_config = (GenerationConfig.from_dict(generation_config) if generation_config
                                  else GenerationConfig.from_model_config(self.config))

    def _setup(self, config, dtype, params, plan=None, files=()):
        super()._setup(config, dtype, params, plan, files)
        self._attach_generation_config(None)

    @forward_pass
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, logits_to_keep=0, cache=None):
        """Logits [B, T, V] (only the last `logits_to_keep` positions when it is > 0), and the shifted
        next-token loss when `labels` [B, T] are given (-100 is ignored)."""
        B, T = _batch_and_length(input_ids, inputs_embeds)
        keep = _logits_to_keep(logits_to_keep, T)
        if labels is not None:   # checked before the forward pass touches the cache
            labels = check_labels(labels, self.config.vocab_size, "labels")
            kept = T if keep is None else len(range(T)[keep])
            if labels.shape != (B, kept):
                raise ModelInputError(f"labels: expected shape (B, T) = {(B, kept)}, found {labels.shape}")
        out = self._base(input_ids, attention_mask, position_ids, _one_of(past_key_values, cache),
                         inputs_embeds, use_cache, output_attentions, output_hidden_states)
        h = out.last_hidden_state                                     # [B, T, D]
        if keep is not None:                                          # the last k positions, or listed ones
            h = h[:, keep if isinstance(keep, slice) else self.xp.asarray(keep)]   # -> [B, k, D]
        logits = tap(None, "logits", linear(h, self.lm_head))         # [B, k, D] -> [B, k, V]
        loss = None if labels is None else causal_lm_loss(logits, labels)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict in (None, True) else result.to_tuple()

    forward = __call__


class Qwen2ForSequenceClassification(_WithBaseModel):
    """Qwen2Model plus a linear `score` read at each row's last non-padding token: [B, num_labels]."""

    head_shapes = {"score.weight": lambda c: (c.num_labels, c.hidden_size)}
    head_intermediate_names = ["score", "logits"]

    @forward_pass
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, cache=None):
        B, _ = _batch_and_length(input_ids, inputs_embeds)
        if self.config.pad_token_id is None and B != 1:
            raise ModelInputError("Cannot handle batch sizes > 1 if no padding token is defined.")
        problem_type = None if labels is None else check_sequence_labels(labels, B, self.config)
        out = self._base(input_ids, attention_mask, position_ids, _one_of(past_key_values, cache),
                         inputs_embeds, use_cache, output_attentions, output_hidden_states)
        scores = tap(None, "score", linear(out.last_hidden_state, self.params["score.weight"]))  # [B, T, C]
        B, T = scores.shape[:2]
        pad = self.config.pad_token_id
        if pad is None or input_ids is None:
            last = np.full(B, T - 1)
        else:
            # subtle: the rightmost token that is not padding (transformers >= 4.50), which handles left
            # and right padding; a row of padding only pools position 0
            not_pad = to_numpy(input_ids) != pad            # on the host, as the ids were checked
            last = np.argmax(np.arange(T) * not_pad, axis=-1)
        logits = tap(None, "logits", scores[self.xp.arange(B), self.xp.asarray(last)])   # -> [B, C]
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config, problem_type)
        result = SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                                  hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict in (None, True) else result.to_tuple()

    forward = __call__


class Qwen2ForTokenClassification(_WithBaseModel):
    """Qwen2Model plus a linear `score` (with bias) at every position: [B, T, num_labels]."""

    head_shapes = {"score.weight": lambda c: (c.num_labels, c.hidden_size),
                   "score.bias": lambda c: (c.num_labels,)}
    head_intermediate_names = ["logits"]

    @forward_pass
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, cache=None):
        if labels is not None:
            labels = check_labels(labels, self.config.num_labels, "labels")
            if labels.shape != _batch_and_length(input_ids, inputs_embeds):
                raise ModelInputError(f"labels: expected shape (B, T) = {_batch_and_length(input_ids, inputs_embeds)}, "
                                 f"found {labels.shape}")
        out = self._base(input_ids, attention_mask, position_ids, _one_of(past_key_values, cache),
                         inputs_embeds, use_cache, output_attentions, output_hidden_states)
        # the dropout before `score` is inactive at inference, as in transformers' eval mode
        logits = tap(None, "logits", linear(out.last_hidden_state, self.params["score.weight"],
                                            self.params["score.bias"]))   # [B, T, D] -> [B, T, C]
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels, self.config.num_labels)
        result = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                       attentions=out.attentions)
        return result if return_dict in (None, True) else result.to_tuple()

    forward = __call__


def _one_of(past_key_values, cache):
    """transformers 5.24 renamed `past_key_values` to `cache`; accept either, not both."""
    if past_key_values is not None and cache is not None:
        raise ModelInputTypeError("pass the cache as past_key_values or as cache, not both")
    return past_key_values if past_key_values is not None else cache


def _batch_and_length(input_ids, inputs_embeds):
    """(B, T) of a call, from whichever input it was given (checked in full by the base model)."""
    given = input_ids if input_ids is not None else inputs_embeds
    shape = tuple(getattr(given, "shape", None) or np.shape(given)) if given is not None else ()
    if len(shape) < 2:
        return (1, 1) if not shape else (shape[0], 0)   # the base model explains the bad shape
    return shape[0], shape[1]


def _logits_to_keep(logits_to_keep, T):
    """None (every position), a slice of the last k positions, or a checked list of position indices."""
    if isinstance(logits_to_keep, (bool, np.bool_)):
        raise ModelInputTypeError(f"logits_to_keep: expected an int or a list of positions, found {logits_to_keep!r}")
    if isinstance(logits_to_keep, (int, np.integer)):
        if logits_to_keep < 0:
            raise ModelInputError(f"logits_to_keep: expected an int >= 0 (0 keeps every position), found {logits_to_keep}")
        return slice(-int(logits_to_keep), None) if logits_to_keep > 0 else None
    positions = to_numpy(logits_to_keep)
    if positions.ndim != 1 or not (np.issubdtype(positions.dtype, np.integer) or positions.size == 0):
        raise ModelInputTypeError(f"logits_to_keep: expected an int or a 1D list of integer positions, found "
                        f"{type(logits_to_keep).__name__} of shape {positions.shape} and dtype {positions.dtype}")
    bad = (positions < -T) | (positions >= T)
    if bad.any():
        raise ModelInputError(f"logits_to_keep: position {int(positions[bad][0])} is outside [-{T}, {T}) for T = {T}")
    return positions.astype(np.int64).tolist()
