"""Soft prompts and prefixes, the course's way: pure forward/backward pairs and the classes.

    prompt tuning (Lester et al. 2021)   [p_1 .. p_P, e(x_1) .. e(x_T)] -> the blocks
    prefix tuning (Li & Liang 2021)      every attention layer l reads keys [K_l^prefix; K]
                                         and values [V_l^prefix; V]

``prompt_forward`` / ``prompt_backward`` prepend the prompt and split the
gradient back; ``prefix_grad_table`` gathers what each attention layer's backward
left for its prefix keys and values into one ``(L, 2, P, H, d_head)`` gradient.
The attention that reads a prefix is the mini GPT's own (``minigpt.py``).

Gradients. The standalone ``PromptTuning.backward`` and ``PrefixTuning.backward``
*set* ``prompt_grad`` / ``prefix_grad`` (the course's loop never zeroes them).
Inside a model (``peft_methods.PromptEncoder`` / ``PrefixEncoder``) they
*accumulate*, as every module of the model does.
"""
from __future__ import annotations

import numpy as np

from nn import Module
from validate import positive_int


# ----------------------------------------------------------- the maths, pure
def prompt_forward(prompt, input_embeds):
    """``[prompt; x]`` for every sequence: prompt ``(P, d)``, input_embeds ``(B, T, d)``
    -> ``(B, P + T, d)``, cache."""
    B = input_embeds.shape[0]
    tiled = np.broadcast_to(prompt, (B,) + prompt.shape)   # (B, P, d), no copy
    out = np.concatenate([tiled.astype(input_embeds.dtype), input_embeds], axis=1)
    return out, prompt.shape[0]


def prompt_backward(dout, cache):
    """dout ``(B, P + T, d)`` -> ``(d_input (B, T, d), d_prompt (P, d))``.

    The first ``P`` positions were the prompt; one prompt serves every sequence,
    so its gradient is the *sum* over the batch.
    """
    P = cache
    return dout[:, P:], dout[:, :P].sum(0)


def prefix_grad_table(layer_grads):
    """``[(dK_0, dV_0), (dK_1, dV_1), ...]``, each ``(P, H, d_head)`` -> ``(L, 2, P, H, d_head)``."""
    return np.stack([np.stack([dk, dv]) for dk, dv in layer_grads])


# ------------------------------------------------------------------ prompts
class PromptTuning(Module):
    """A soft prompt: ``prompt_length`` learned vectors prepended to the input
    embeddings. With ``init_from_vocab`` (the ``(vocab, d_model)`` embedding table)
    the prompt starts as copies of random vocabulary rows, which §3 of the paper
    found better than random vectors.
    """

    param_names = ("prompt",)

    def __init__(self, d_model, prompt_length=20, init_from_vocab=None, rng=None,
                 dtype=np.float32, std=0.5):
        super().__init__()
        positive_int(prompt_length, "prompt_length")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.d_model, self.prompt_length = d_model, prompt_length
        if init_from_vocab is not None:
            vocab = np.asarray(init_from_vocab)
            if vocab.ndim != 2 or vocab.shape[1] != d_model:
                raise ValueError(f"init_from_vocab must be (vocab, {d_model}), got {vocab.shape}")
            rows = rng.integers(0, vocab.shape[0], prompt_length)
            self.prompt = vocab[rows].astype(dtype, copy=True)
        else:
            self.prompt = (rng.standard_normal((prompt_length, d_model)) * std).astype(dtype)

    def forward(self, input_embeds):
        """``(batch, seq, d_model)`` -> ``(batch, prompt_length + seq, d_model)``, prompt first."""
        if input_embeds.ndim != 3 or input_embeds.shape[-1] != self.d_model:
            raise ValueError(f"input_embeds must be (batch, seq, {self.d_model}), "
                             f"got {input_embeds.shape}")
        out, self.cache = prompt_forward(self.prompt, input_embeds)
        return out

    def accumulate_backward(self, grad_output):
        """The model's backward: adds into ``prompt_grad``; returns the input's part ``(B, T, d)``."""
        d_input, d_prompt = prompt_backward(grad_output, self.cache)
        if self.wants_grad("prompt"):
            self._accumulate("prompt", d_prompt)
        return d_input

    def backward(self, grad_output):
        """The course's backward: *sets* ``prompt_grad`` (summed over the batch) and
        returns the gradient for the original input ``(batch, seq, d_model)``."""
        self.clear_grads()
        return self.accumulate_backward(grad_output)


# ----------------------------------------------------------------- prefixes
class PrefixTuning(Module):
    """Learned keys and values prepended in every attention layer.

    ``prefix`` has shape ``(num_layers, 2, prefix_length, num_heads, d_head)``;
    index 0 holds keys, 1 values. Every query may attend to every prefix slot:
    the prefix acts like ``prefix_length`` virtual tokens that the model can read
    but never has to produce. ``get_prefix(l)`` is what attention layer ``l``
    reads; ``backward(layer_grads)`` takes what each layer's backward gave for
    its prefix keys and values.
    """

    param_names = ("prefix",)

    def __init__(self, num_layers, num_heads, d_head, prefix_length=10, rng=None,
                 dtype=np.float32, std=0.5):
        super().__init__()
        positive_int(prefix_length, "prefix_length")
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_layers, self.num_heads, self.d_head = num_layers, num_heads, d_head
        self.prefix_length = prefix_length
        shape = (num_layers, 2, prefix_length, num_heads, d_head)
        self.prefix = (rng.standard_normal(shape) * std).astype(dtype)

    def get_prefix(self, layer_idx):
        """``(prefix_k, prefix_v)``, each ``(prefix_length, num_heads, d_head)``."""
        return self.prefix[layer_idx, 0], self.prefix[layer_idx, 1]

    def accumulate_backward(self, layer_grads):
        """The model's backward: adds ``prefix_grad_table(layer_grads)`` into ``prefix_grad``."""
        if self.wants_grad("prefix"):
            self._accumulate("prefix", prefix_grad_table(layer_grads))

    def backward(self, layer_grads):
        """The course's backward: *sets* ``prefix_grad`` ``(L, 2, P, H, d_head)`` from one
        ``(dK, dV)`` pair per layer, each ``(prefix_length, num_heads, d_head)``."""
        self.clear_grads()
        self.accumulate_backward(layer_grads)
