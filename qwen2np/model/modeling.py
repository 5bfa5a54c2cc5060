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
from contextlib import nullcontext

import numpy as np

from ..errors import ModelInputError
from ..generation import GenerationConfig
from ..generation.utils import GenerationMixin
from ..inspection.names import intermediate_names
from ..inspection.tracing import tap
from ..weights.backend import to_numpy
from ..weights.parameters import base_parameter_shapes, random_parameters
from .attention import maps_traced_whole, self_attention
from .inputs import as_labels, as_logits_to_keep, batch_and_length, forward_arguments, one_of
from .layers import ACT2FN, linear, rms_norm, swiglu_mlp
from .losses import (causal_lm_loss, check_sequence_labels, sequence_classification_loss,
    token_classification_loss)
from .masks import layer_masks
from .outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast,
    TokenClassifierOutput)
from .pretrained import Qwen2PreTrainedModel, model_forward
from .rope import RotaryEmbedding


def decoder_layer(x, w, cos, sin, mask, cache_layer, config, scope, output_attentions=True):
    """One Qwen2 block: attention, then MLP, each on a normalised copy of x and added back.

    x [B, T, D] -> [B, T, D], and the attention probabilities [B, H, T, S].
    `w` maps the layer's checkpoint names (`input_layernorm.weight`, `self_attn.q_proj.bias`, …) to arrays.
    """
    eps = config.rms_norm_eps
    h = tap(scope, "input_layernorm", rms_norm(x, w["input_layernorm.weight"], eps))      # [B, T, D]
    attn, probs = self_attention(h, w["self_attn"], cos, sin, mask, cache_layer, config,
                                 scope=f"{scope}.self_attn", need_probs=output_attentions)   # -> [B, T, D]
    x = tap(scope, "resid_mid", x + attn)                          # residual: the stream after attention
    h = tap(scope, "post_attention_layernorm", rms_norm(x, w["post_attention_layernorm.weight"], eps))
    x = x + swiglu_mlp(h, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"],
                       ACT2FN[config.hidden_act], f"{scope}.mlp")  # residual: [B, T, D] -> [B, T, F] -> [B, T, D]
    return tap(scope, None, x), probs


class Qwen2Model(Qwen2PreTrainedModel):
    """The decoder stack without a head: input ids -> final hidden states [B, T, D]."""

    base_model_prefix = ""

    def __init__(self, config, *, scope="", **kwargs):
        """`Qwen2Model(config, dtype=, seed=)` as every model (pretrained.py); `scope` prefixes the names of
        its intermediates (docs/intermediates.md): "model" inside a head."""
        self.scope = scope
        super().__init__(config, **kwargs)

    @classmethod
    def inside(cls, head, params):
        """The base model of `head`: `params`, the head's arrays under `model.` (shared, not copied), with
        the head's config, dtype and weight plan; its intermediates are named `model.…`."""
        return cls(head.config, dtype=head.dtype, params=params, weight_plan=head.weight_plan,
                   mapped_files=head._mapped_files, scope=head.base_model_prefix)

    @classmethod
    def parameter_shapes(cls, config):
        return base_parameter_shapes(config)

    def _set_params(self, params):
        self.params = params
        self.embed_tokens = params["embed_tokens.weight"]   # [V, D]: an array, or a weights.store.StoredWeight
        prefix = f"{self.scope}." if self.scope else ""
        self.layers = []   # per layer: its weights under their in-layer names, its trace scope, its type
        for i, kind in enumerate(self.config.layer_types):
            name = f"layers.{i}."
            w = {k[len(name):]: v for k, v in params.items() if k.startswith(name)}
            w["self_attn"] = {k[len("self_attn."):]: v for k, v in w.items() if k.startswith("self_attn.")}
            self.layers.append((w, f"{prefix}layers.{i}", kind))
        self.rotary_emb = RotaryEmbedding(self.config, self.dtype, self.xp)

    def intermediate_names(self):
        """Every name `tap` uses in a forward pass, in order (docs/intermediates.md)."""
        return intermediate_names(self.config.num_hidden_layers, self.scope, head=())

    @model_forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                 return_dict=None, cache=None, *, head_rows=0):
        """input_ids [B, T] (or inputs_embeds [B, T, D]) -> the final hidden states [B, T, D], and the cache.
        (`head_rows`: for a head, the rows of logits it makes after this pass, counted in the memory check.)"""
        config, scope = self.config, self.scope
        args = forward_arguments(config, self.dtype, self.xp, input_ids, inputs_embeds, attention_mask, position_ids,
                                 past_key_values, cache, use_cache, output_attentions, output_hidden_states)
        whole = maps_traced_whole([f"{s}.self_attn" for _, s, _ in self.layers], args.length)
        self.check_can_run(args, head_rows, whole)   # files unchanged, the cache fits, memory suffices
        masks = layer_masks(config, args.attention_mask, args.position_ids, args.cache, args.batch, args.length,
                            self.dtype, self.xp)                  # layer type -> AttentionMask [B, 1, T, S]
        x = self.embed_tokens[args.ids] if args.embeds is None else args.embeds    # [B, T] -> [B, T, D]
        x = tap(scope, "embed_tokens", x)
        cos, sin = self.rotary_emb(args.positions)                # [B or 1, T] -> [B or 1, T, HD]
        cos, sin = tap(scope, "rotary_emb.cos", cos), tap(scope, "rotary_emb.sin", sin)
        hidden_states = [x] if args.output_hidden_states else None
        attentions = [] if args.output_attentions else None
        with nullcontext() if args.cache is None else args.cache.rollback_on_error():   # a failure: cache as it was
            for (w, layer_scope, kind), cache_layer in zip(self.layers, args.cache_layers):
                x, probs = decoder_layer(x, w, cos, sin, masks[kind], cache_layer, config, layer_scope,
                                         args.output_attentions)            # [B, T, D] -> [B, T, D]
                if hidden_states is not None:
                    hidden_states.append(x)
                if attentions is not None:
                    attentions.append(probs)
        x = tap(scope, "norm", rms_norm(x, self.params["norm.weight"], config.rms_norm_eps))   # [B, T, D]
        # subtle: as in transformers, the last hidden state is the one *after* the final norm
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=args.cache if args.use_cache else None,
                                       hidden_states=None if hidden_states is None else (*hidden_states[:-1], x),
                                       attentions=None if attentions is None else tuple(attentions))


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
        self.model = Qwen2Model.inside(self, {n[len("model."):]: a for n, a in params.items() if n.startswith("model.")})

    def intermediate_names(self):
        return self.model.intermediate_names() + self.head_intermediate_names

    def _base(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
              output_attentions, output_hidden_states, head_rows=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          head_rows=head_rows)

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

    @model_forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, logits_to_keep=0, cache=None):
        """Logits [B, T, V] (only the last `logits_to_keep` positions when it is > 0), and the shifted
        next-token loss when `labels` [B, T] are given (-100 is ignored)."""
        B, T = batch_and_length(input_ids, inputs_embeds)
        keep = as_logits_to_keep(logits_to_keep, T)
        rows = None if keep is None else [r % T for r in range(T)[keep]] if isinstance(keep, slice) else \
            [r % T for r in keep]                                     # the positions whose logits are made
        if labels is not None:   # checked before the forward pass touches the cache
            labels = as_labels(labels, self.config.vocab_size, (B, T if keep is None else len(rows)))
        out = self._base(input_ids, attention_mask, position_ids, one_of(past_key_values, cache),
                         inputs_embeds, use_cache, output_attentions, output_hidden_states,
                         head_rows=B * (T if rows is None else len(rows)))
        h = out.last_hidden_state                                     # [B, T, D]
        if keep is not None:                                          # the last k positions, or listed ones
            h = h[:, keep if isinstance(keep, slice) else self.xp.asarray(keep)]   # -> [B, k, D]
        logits = tap(None, "logits", linear(h, self.lm_head), rows)  # [B, k, D] -> [B, k, V]
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


class Qwen2ForSequenceClassification(_WithBaseModel):
    """Qwen2Model plus a linear `score` read at each row's last non-padding token: [B, num_labels]."""

    head_shapes = {"score.weight": lambda c: (c.num_labels, c.hidden_size)}
    head_intermediate_names = ["score", "logits"]

    @model_forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, cache=None):
        B, _ = batch_and_length(input_ids, inputs_embeds)
        if self.config.pad_token_id is None and B != 1:
            raise ModelInputError("Cannot handle batch sizes > 1 if no padding token is defined.")
        problem_type = None if labels is None else check_sequence_labels(labels, B, self.config)
        out = self._base(input_ids, attention_mask, position_ids, one_of(past_key_values, cache),
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
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states, attentions=out.attentions)


class Qwen2ForTokenClassification(_WithBaseModel):
    """Qwen2Model plus a linear `score` (with bias) at every position: [B, T, num_labels]."""

    head_shapes = {"score.weight": lambda c: (c.num_labels, c.hidden_size),
                   "score.bias": lambda c: (c.num_labels,)}
    head_intermediate_names = ["logits"]

    @model_forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                 output_hidden_states=None, return_dict=None, cache=None):
        if labels is not None:   # checked before the forward pass touches the cache
            labels = as_labels(labels, self.config.num_labels, batch_and_length(input_ids, inputs_embeds))
        out = self._base(input_ids, attention_mask, position_ids, one_of(past_key_values, cache),
                         inputs_embeds, use_cache, output_attentions, output_hidden_states)
        # the dropout before `score` is inactive at inference, as in transformers' eval mode
        logits = tap(None, "logits", linear(out.last_hidden_state, self.params["score.weight"],
                                            self.params["score.bias"]))   # [B, T, D] -> [B, T, C]
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels, self.config.num_labels)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions)

