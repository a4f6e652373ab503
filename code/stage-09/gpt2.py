"""GPT-2 (Radford et al. 2019) under Hugging Face's module names, built from the mini GPT's parts.

    transformer.wte, transformer.wpe          token and position embeddings  (V, D), (n_positions, D)
    transformer.h.{i}.ln_1 -> attn            attn.c_attn: q|k|v fused, D -> 3D;  attn.c_proj: D -> D
    transformer.h.{i}.ln_2 -> mlp             mlp.c_fc: D -> F, GELU (tanh), mlp.c_proj: F -> D
    transformer.ln_f -> logits                tied to transformer.wte (lm_head when untied)

GPT-2 *is* the mini GPT's architecture (pre-LayerNorm blocks, learned positions,
tanh GELU, tied head); only the names differ, and query, key and value come out
of one fused projection. So each class here subclasses its mini-GPT counterpart
and renames its parts; the forward and backward passes are the mini GPT's, and
PEFT methods, optimizers and checkpoints treat the model as any other. What the
names buy: ``named_parameters()`` yields exactly Hugging Face's keys
(``transformer.h.0.attn.c_attn.weight``), so the course's
``LoraConfig(target_modules=["c_attn", "c_proj"])`` adapts the same layers as in
``peft``, and adapter files need no renaming.

Weights: Hugging Face stores GPT-2's projections as ``Conv1D`` with the weight
``(in, out)``; ``hf_import`` transposes each one once at load time into an
ordinary ``(out, in)`` ``nn.Linear``. ``peft`` meets the same layout from the other
side: its LoRA on a ``Conv1D`` sets ``fan_in_fan_out=True``, which transposes the
update when merging. The factors ``A (r, in)`` and ``B (out, r)`` have the same
shapes in both, so an adapter file moves between them unchanged.
"""
from __future__ import annotations

import math

import numpy as np

from minigpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, _normal_linear
from nn import ACTIVATIONS, Dropout, Embedding, LayerNorm, Module, ModuleList

# every linear of a GPT-2 block (peft's LoRA on GPT-2 commonly targets c_attn, c_proj)
GPT2_LINEARS = ("c_attn", "c_proj", "c_fc")


class GPT2Attention(CausalSelfAttention):
    """Causal self-attention with the fused ``c_attn`` projection: ``x -> [q | k | v]``.

    ``forward``: ``q, k, v = split(c_attn(x), 3)``, then the mini GPT's ``attend``.
    ``backward``: ``attend_backward`` gives ``dq, dk, dv`` ``(B, T, D)`` each, and
    ``c_attn`` takes them concatenated back, ``(B, T, 3D)``, in the same order.
    """

    def __init__(self, config: GPTConfig, rng):
        Module.__init__(self)
        D, dt, b = config.d_model, config.dtype, config.bias
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.c_attn = _normal_linear(D, 3 * D, rng, dt, bias=b)
        self.c_proj = _normal_linear(D, D, rng, dt, std=0.02 / math.sqrt(2 * config.n_layers), bias=b)
        self.prefix_grad = None

    def forward(self, x, attention_mask=None, prefix=None):
        q, k, v = np.split(self.c_attn(x), 3, axis=-1)      # (B, T, D) each
        return self.c_proj(self.attend(q, k, v, attention_mask, prefix))

    def backward(self, dout):
        dq, dk, dv = self.attend_backward(self.c_proj.backward(dout))   # (B, T, D) each
        return self.c_attn.backward(np.concatenate([dq, dk, dv], axis=-1))   # (B, T, D)


class GPT2MLP(MLP):
    """``c_proj(act(c_fc(x)))``; ``fc1``/``fc2`` are the mini GPT's names for the same layers."""

    def __init__(self, config: GPTConfig, rng):
        Module.__init__(self)
        D, F, dt, b = config.d_model, config.ffn_dim, config.dtype, config.bias
        self.c_fc = _normal_linear(D, F, rng, dt, bias=b)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = _normal_linear(F, D, rng, dt, std=0.02 / math.sqrt(2 * config.n_layers), bias=b)

    fc1 = property(lambda self: self.c_fc)
    fc2 = property(lambda self: self.c_proj)


class GPT2Block(Block):
    """The mini GPT's pre-LN block with ``attn`` for ``self_attn``."""

    def __init__(self, config: GPTConfig, rng):
        Module.__init__(self)
        D, eps, dt = config.d_model, config.layer_norm_eps, config.dtype
        self.ln_1 = LayerNorm(D, eps=eps, dtype=dt)
        self.attn = GPT2Attention(config, rng)
        self.drop_1 = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))
        self.ln_2 = LayerNorm(D, eps=eps, dtype=dt)
        self.mlp = GPT2MLP(config, rng)
        self.drop_2 = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))

    self_attn = property(lambda self: self.attn)


class GPT2Model(Module):
    """Hugging Face's ``transformer``: embeddings, blocks ``h`` and the final LayerNorm."""

    def __init__(self, config: GPTConfig, rng):
        super().__init__()
        D, dt = config.d_model, config.dtype
        self.wte = Embedding(config.vocab_size, D, rng=rng, dtype=dt)
        self.wpe = Embedding(config.context_length, D, rng=rng, dtype=dt, std=0.01)
        self.drop = Dropout(config.dropout, rng=np.random.default_rng(rng.integers(2**31)))
        self.h = ModuleList(GPT2Block(config, rng) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(D, eps=config.layer_norm_eps, dtype=dt)


class GPT2LMHeadModel(GPT):
    """GPT-2 with a language-model head: the mini GPT's ``forward``/``backward``/``generate``.

    ``GPT`` reaches its parts as ``embed_tokens``, ``embed_positions``, ``layers``,
    ``ln_f`` and ``drop``; here those are views of ``transformer.*`` (properties, so
    each parameter has one name, Hugging Face's).
    """

    hf_names = True                     # parameter names are Hugging Face's state-dict keys
    conv1d_modules = GPT2_LINEARS       # what Hugging Face stores (in, out): peft's fan_in_fan_out
    hf_blocks = ("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))

    def __init__(self, config: GPTConfig, seed: int = 0):
        Module.__init__(self)
        self.config = config
        rng = np.random.default_rng(seed)
        self.transformer = GPT2Model(config, rng)
        self.lm_head = None if config.tie_word_embeddings else _normal_linear(
            config.d_model, config.vocab_size, rng, config.dtype, bias=False)

    embed_tokens = property(lambda self: self.transformer.wte)
    embed_positions = property(lambda self: self.transformer.wpe)
    drop = property(lambda self: self.transformer.drop)
    layers = property(lambda self: self.transformer.h)
    ln_f = property(lambda self: self.transformer.ln_f)
