"""Exercise 9.17 (suggested) -- LoRA and prompt tuning together, on the mini GPT.

Methods that touch different parts of the model combine freely: a soft prompt
acts at the *input* (before the blocks), LoRA *inside* the linear layers. Here
you attach both to the library's mini GPT and write the forward and backward
that route around them::

    tokens (B, T) ─ model.embed ─> x (B, T, D)          positions 0..T-1, as pretrained
    [prompt (P, D) ; x]          ─> (B, P + T, D)        the prompt gets no position embedding
    model.forward_embeds         ─> logits (B, P + T, V) blocks with LoRA on the targets
    drop the first P positions   ─> logits (B, T, V)     the prompt predicts nothing

and backwards: pad ``dlogits`` with zeros for the prompt positions,
``model.backward_embeds`` (which fills every LoRA gradient), split the result at
``P``: the first ``P`` rows, summed over the batch, are the prompt's gradient.

Library pieces you use: ``peft.LoRALinear(linear, lora_rank=..., lora_alpha=..., rng=...)``
wraps a frozen ``nn.Linear`` (its factors are ``wrapper.lora.A`` / ``.B``, their
gradients ``.A_grad`` / ``.B_grad``); ``model.freeze()``, ``model.zero_grad()``,
``model.embed(tokens)``, ``model.forward_embeds(x)``, ``model.backward_embeds(dlogits)``.
A block's linears are ``model.layers[i].self_attn.{q_proj, k_proj, v_proj, out_proj}``
and ``model.layers[i].mlp.{fc1, fc2}``.

Check your work:  ``python exercises/check.py 9.17``
"""
import sys
from pathlib import Path

import numpy as np

for _parent in Path(__file__).resolve().parents:      # the library: code/stage-09 of the repository
    if (_parent / "code" / "stage-09").is_dir():
        sys.path.insert(0, str(_parent / "code" / "stage-09"))
        break
from peft import LoRALinear  # noqa: E402  (the library's)

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
FEED_FORWARD = ("fc1", "fc2")


class LoRAPromptModel:
    def __init__(self, model, prompt_length=4, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"),
                 rng=None):
        """Freeze ``model``; wrap each targeted linear of every block in a ``LoRALinear``;
        create the prompt. Attributes to set:

            model, prompt_length
            lora_layers  ``{dotted path: LoRALinear}``, e.g. ``"layers.0.self_attn.q_proj"``
            prompt       ``(prompt_length, d_model)``: a copy of random rows of the token
                         embedding table ``model.embed_tokens.weight`` (pick them with
                         ``rng.integers``)
        ``ValueError`` for a target that is none of the six linear names.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        # BEGIN SOLUTION freeze; wrap the targets block by block (setattr on the parent); prompt rows
        unknown = [t for t in target_modules if t not in ATTENTION + FEED_FORWARD]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose among {ATTENTION + FEED_FORWARD}")
        self.model = model.freeze()
        self.prompt_length = prompt_length
        self.lora_layers = {}
        for i, block in enumerate(model.layers):
            for name in target_modules:
                parent_name = "self_attn" if name in ATTENTION else "mlp"
                parent = getattr(block, parent_name)
                wrapper = LoRALinear(getattr(parent, name), lora_rank=rank, lora_alpha=alpha, rng=rng)
                setattr(parent, name, wrapper)
                self.lora_layers[f"layers.{i}.{parent_name}.{name}"] = wrapper
        table = model.embed_tokens.weight                                  # (V, D)
        self.prompt = table[rng.integers(0, table.shape[0], prompt_length)].copy()
        # END SOLUTION

    def forward(self, tokens):
        """``tokens (B, T)`` -> logits ``(B, T, vocab)`` (the prompt positions dropped)."""
        # BEGIN SOLUTION embed, prepend the prompt, run the blocks, drop the prompt's logits
        x = self.model.embed(tokens)                                       # (B, T, D)
        P, (B, _, D) = self.prompt_length, x.shape
        prompt = np.broadcast_to(self.prompt, (B, P, D))
        logits = self.model.forward_embeds(np.concatenate([prompt, x], axis=1))   # (B, P+T, V)
        return logits[:, P:]                                               # (B, T, V)
        # END SOLUTION

    def backward(self, dlogits):
        """``dlogits (B, T, vocab)``: fill every LoRA gradient and ``self.prompt_grad``
        ``(P, D)``. Start with ``self.model.zero_grad()``: the library *adds* gradients."""
        # BEGIN SOLUTION zero, pad dlogits for the prompt, backward through the blocks, split at P
        self.model.zero_grad()
        B, T, V = dlogits.shape
        P = self.prompt_length
        padded = np.concatenate([np.zeros((B, P, V)), dlogits], axis=1)    # (B, P+T, V)
        dx = self.model.backward_embeds(padded)                            # (B, P+T, D)
        self.prompt_grad = dx[:, :P].sum(axis=0)                           # (P, D)
        # END SOLUTION

    def trainable_parameters(self):
        """``{"prompt": prompt, "<path>.lora.A": A, "<path>.lora.B": B, ...}``."""
        # BEGIN SOLUTION the prompt, then both factors of every wrapped layer
        params = {"prompt": self.prompt}
        for path, layer in self.lora_layers.items():
            params[f"{path}.lora.A"], params[f"{path}.lora.B"] = layer.lora.A, layer.lora.B
        return params
        # END SOLUTION
