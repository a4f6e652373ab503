"""Where each PEFT method touches the mini GPT: one ``Method`` per config type.

    LoRA           wraps each targeted Linear in ``lora.LoRALinear`` (slot ``lora``)
    prefix tuning  ``PrefixEncoder`` feeds keys/values to every attention layer
    prompt tuning  ``PromptEncoder`` prepends vectors to the token embeddings
    BitFit         makes the biases trainable; adds nothing
    full           makes everything trainable; adds nothing
    (IA)3, bottleneck adapters: ``ia3.py``, ``bottleneck.py``

Each is registered when this module is imported; ``peft_model`` imports it (and
``ia3``, ``bottleneck``), so importing ``peft_model`` registers every method.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from dora import DoRALayer
from lora import LoRALayer, LoRALinear
from nn import Linear
from peft_base import AdapterState, Method, bias_names, find_linear_targets, register, wrap_or_reuse
from peft_config import (BitFitConfig, FullFineTuningConfig, LoraConfig, PrefixTuningConfig,
                         PromptTuningConfig)
from soft_prompts import PrefixTuning, PromptTuning, prefix_grad_table
from trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper, token_targets


@register(LoraConfig)
class LoraMethod(Method):
    def inject(self, peft_model, config: LoraConfig, rng):
        model = peft_model.base_model
        state = AdapterState(config)
        paths = find_linear_targets(model, config.target_modules, config.layers_to_transform,
                                    LoRALinear)
        # each layer draws from its own stream, named by the adapter's seed and the layer's
        # path: its init does not depend on which other layers are targeted, or in what order
        seed = int(rng.integers(2**63))
        for path in paths:
            wrapper = wrap_or_reuse(model, path, LoRALinear, LoRALinear.around)
            layer_rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
            state.slots[path] = new_lora_layer(wrapper, config, layer_rng)
        if config.trainable_token_indices:
            inject_trainable_tokens(model, config.trainable_token_indices, state)
        if config.bias == "all":
            state.trainable = bias_names(model)
        elif config.bias == "lora_only":
            state.trainable = [f"{p}.base_layer.bias" for p in state.slots
                               if model.get_submodule(p).bias is not None]
        return state


def inject_trainable_tokens(model, trainable_token_indices, state):
    """LoRA's ``trainable_token_indices``: listed embedding rows train (trainable_tokens.py)."""
    for path, indices in token_targets(trainable_token_indices).items():
        wrapper = wrap_or_reuse(model, path, TrainableTokensWrapper, TrainableTokensWrapper)
        state.slots[path] = TrainableTokensLayer(indices, wrapper.base_layer.weight)


def new_lora_layer(wrapper, config: LoraConfig, rng):
    """The ``LoRALayer`` (``DoRALayer`` with ``use_dora``) for one wrapped linear."""
    cls = DoRALayer if config.use_dora else LoRALayer
    limit = min(wrapper.in_features, wrapper.out_features)
    if config.r > limit:                    # (the course's LoRALayer allows it: common mistake 5)
        raise ValueError(f"LoraConfig.r={config.r} is larger than the layer: a "
                         f"({wrapper.out_features}, {wrapper.in_features}) weight has rank at "
                         f"most {limit}, so r must be <= {limit}")
    layer = cls(wrapper.in_features, wrapper.out_features, config.r, config.lora_alpha,
                config.lora_dropout, config.init_lora_weights, config.use_rslora,
                rng=rng, dtype=wrapper.weight.dtype)
    if config.use_dora:
        layer.init_magnitude(wrapper.weight)
    return layer


# ------------------------------------------------------------------ prefix tuning
class PrefixEncoder(PrefixTuning):
    """The course's ``PrefixTuning`` table, optionally produced by an MLP.

    With ``prefix_projection`` (Li & Liang 2021, §4.3) the table is
    ``tanh(E W1^T + b1) W2^T + b2`` reshaped to ``(L, 2, P, H, d_head)``, where
    ``E (P, d_model)`` is a learned embedding. Optimising through the MLP is
    more stable than optimising the table directly; after training,
    ``collapse()`` evaluates the MLP once and keeps only the table.
    """

    param_names = ("prefix", "embedding")

    def __init__(self, model_config, config: PrefixTuningConfig, rng):
        c = model_config
        config.check_model(c)
        super().__init__(c.n_layers, c.n_heads, c.d_head, config.num_virtual_tokens, rng=rng,
                         dtype=c.dtype)
        self.position_convention = config.position_convention
        self.config = config                    # collapse() records itself here
        self.embedding = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or c.d_model
            self.embedding = (rng.standard_normal((config.num_virtual_tokens, c.d_model))
                              ).astype(c.dtype)
            self.mlp_in = Linear(c.d_model, hidden, rng=rng, dtype=c.dtype)
            self.mlp_out = Linear(hidden, c.n_layers * 2 * c.d_model, rng=rng, dtype=c.dtype)
            self.prefix = None

    def table(self):
        """``(L, 2, P, H, d_head)``: the stored table, or the MLP's output."""
        if self.embedding is None:
            return self.prefix
        self.hidden = np.tanh(self.mlp_in(self.embedding))           # (P, hidden)
        flat = self.mlp_out(self.hidden)                             # (P, L*2*D)
        P, L, H, dh = self.prefix_length, self.num_layers, self.num_heads, self.d_head
        return flat.reshape(P, L, 2, H, dh).transpose(1, 2, 0, 3, 4)  # (L, 2, P, H, dh)

    def layer_prefixes(self):
        """``[(keys, values)]`` per layer, each ``(P, H, d_head)``: what the attention layers read."""
        self._table = self.table()
        return [(self._table[i, 0], self._table[i, 1]) for i in range(self.num_layers)]

    def backward_from_layers(self, layers):
        """Gather each attention layer's ``prefix_grad`` and add it into the table's (or the
        MLP's) gradients (the model path: accumulates)."""
        layer_grads = [block.self_attn.prefix_grad for block in layers]
        if self.embedding is None:
            self.accumulate_backward(layer_grads)
            return
        grad = prefix_grad_table(layer_grads)                        # (L, 2, P, H, dh)
        dflat = grad.transpose(2, 0, 1, 3, 4).reshape(self.prefix_length, -1)   # (P, L*2*D)
        dhidden = self.mlp_out.backward(dflat) * (1.0 - self.hidden * self.hidden)
        dembed = self.mlp_in.backward(dhidden)
        if self.wants_grad("embedding"):
            self._accumulate("embedding", dembed)

    def collapse(self):
        """Replace the MLP by the table it currently produces (same outputs, fewer parameters).

        The adapter's config is updated to ``prefix_projection=False`` so that what
        ``save_pretrained`` writes (the table) is what ``from_pretrained`` expects.
        The table trains if the MLP did (a frozen, loaded encoder stays frozen).
        """
        if self.embedding is not None:
            trainable = self.wants_grad("embedding")
            self.prefix = np.ascontiguousarray(self.table())
            self.embedding, self.mlp_in, self.mlp_out = None, None, None
            self.requires_grad_(trainable, ["prefix"])
            self.config.prefix_projection = False


@register(PrefixTuningConfig)
class PrefixMethod(Method):
    encoder_attr = "prefix_encoder"

    def inject(self, peft_model, config, rng):
        return AdapterState(config, encoder=PrefixEncoder(peft_model.base_model.config, config, rng))


# ------------------------------------------------------------------ prompt tuning
class PromptEncoder(PromptTuning):
    """The course's ``PromptTuning`` plus the two position conventions.

    ``"keep"``: the real tokens keep positions ``0..T-1`` and the prompt vectors get
    no position embedding. ``"shift"`` (Hugging Face): the prompt sits at positions
    ``0..P-1`` (its vectors get those position embeddings) and the real tokens move
    to ``P..P+T-1``. A model pretrained only on sequences starting at position 0
    has never seen its task tokens at shifted positions, so we keep by default.
    """

    def __init__(self, model, config: PromptTuningConfig, rng):
        config.check_model(model.config)
        d, dtype = model.config.d_model, model.config.dtype
        table, context = model.embed_tokens.weight, model.config.context_length
        super().__init__(d, config.num_virtual_tokens, rng=rng, dtype=dtype)
        P = config.num_virtual_tokens
        if P >= context:
            raise ValueError(f"PromptTuningConfig.num_virtual_tokens={P} leaves no room for a "
                             f"real token in context_length={context}")
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            self.prompt = table[rng.integers(0, table.shape[0], P)].astype(dtype, copy=True)
        elif config.prompt_tuning_init == "TEXT":
            self.prompt = table[text_init_ids(config, table.shape[0], context)].astype(dtype, copy=True)
        else:
            self.prompt = (rng.standard_normal((P, d)) * float(table.std())).astype(dtype)
        self.position_convention = config.position_convention

    def embed_with_prompt(self, base, tokens, attention_mask):
        P, T = self.prompt_length, tokens.shape[1]     # (PeftModel checked that P + T fits)
        shift = self.position_convention == "shift"
        x = base.embed(tokens, np.arange(P, P + T) if shift else None)   # (B, T, D)
        full = self.forward(x)                                            # (B, P+T, D)
        if shift:
            full[:, :P] += base.embed_positions.weight[:P]
        if attention_mask is not None:
            ones = np.ones((tokens.shape[0], P), dtype=attention_mask.dtype)
            attention_mask = np.concatenate([ones, attention_mask], axis=1)
        return full, attention_mask

    def backward_with_prompt(self, base, dx):
        """Split dL/d(full input): prompt part into ``prompt_grad``; returns the tokens' part."""
        P = self.prompt_length
        if self.position_convention == "shift" and base.embed_positions.wants_grad("weight"):
            grad = np.zeros_like(base.embed_positions.weight)
            grad[:P] = dx[:, :P].sum(0)
            base.embed_positions._accumulate("weight", grad)
        return self.accumulate_backward(dx)


def text_init_ids(config: PromptTuningConfig, vocab_size, context_length):
    """The ``num_virtual_tokens`` ids a TEXT init copies: the given ids repeated, or cut.

    Cutting a longer text to ``num_virtual_tokens`` is what Hugging Face does. More
    ids than the model's context can hold cannot be a prompt for this model (most
    likely the wrong ids were passed), so that raises, as do ids outside the vocabulary.
    """
    ids, P = np.asarray(config.prompt_tuning_init_token_ids), config.num_virtual_tokens
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"PromptTuningConfig.prompt_tuning_init_token_ids contain an id outside "
                         f"0..{vocab_size - 1}: {ids.tolist()}")
    if len(ids) > context_length:
        raise ValueError(f"PromptTuningConfig.prompt_tuning_init_token_ids has {len(ids)} ids, "
                         f"more than context_length={context_length}")
    return np.tile(ids, math.ceil(P / len(ids)))[:P]       # (P,)


@register(PromptTuningConfig)
class PromptMethod(Method):
    encoder_attr = "prompt_encoder"

    def inject(self, peft_model, config, rng):
        return AdapterState(config, encoder=PromptEncoder(peft_model.base_model, config, rng))


# --------------------------------------------------- parameter-selection methods
@register(BitFitConfig)
class BitFitMethod(Method):
    def inject(self, peft_model, config, rng):
        return AdapterState(config, trainable=bias_names(peft_model.base_model,
                                                         include_layernorm=config.include_layernorm))


@register(FullFineTuningConfig)
class FullMethod(Method):
    def inject(self, peft_model, config, rng):
        return AdapterState(config, trainable=[n for n, _ in peft_model.base_model.named_parameters()])
