"""Adapter weights and the base's: merge, unmerge, unload, disable, combine.

The part of ``PeftModel`` that does arithmetic with the weights rather than
routing inputs through adapters, as a mixin (``PeftModel(MergeMixin, Module)``):

    merge_adapter()        W0 <- W0 + delta (the active adapters; no inference overhead)
    unmerge_adapter()      W0 <- W0 - delta
    merge_and_unload()     the plain base model with the update folded in
    unload()               the plain base model, adapters dropped, nothing merged
    disable_adapter()      a block computing exactly the base model's outputs
    add_weighted_adapter   a new LoRA adapter equal to sum_i w_i delta_i

Every operation on several layers is all or nothing: each wrapper is asked first
(``check_merge``), and a failure half-way puts back the weights written so far
from copies (``_apply_all``) -- exactly, never by subtracting the update again,
which would leave rounding error in the frozen weights. What each method's
wrapper does to its own layer (``merge_in_place``, ``merge_and_unload_module``)
lives with the method; this file only walks the wrappers.

It uses the host's ``wrappers()``, ``adapters``, ``active_adapters``,
``base_model``, ``add_adapter`` and ``_disabled`` (``peft_model.PeftModel``).
"""
from __future__ import annotations

import contextlib

import numpy as np

from nn import set_submodule
from peft_base import method_for
from peft_config import LoraConfig


def _base_weights(wrapper):
    """Copies of the wrapped layer's ``(weight, bias or None)``, to put back exactly."""
    bias = getattr(wrapper.base_layer, "bias", None)
    return wrapper.base_layer.weight.copy(), None if bias is None else bias.copy()


class MergeMixin:
    """Merging, unloading, disabling and combining adapters (mixed into ``PeftModel``)."""

    # ---- combining LoRA adapters ---------------------------------------------
    def add_weighted_adapter(self, adapters, weights, adapter_name):
        """A new LoRA adapter whose update is ``sum_i weights[i] * delta_i`` exactly.

        The factors are concatenated along the rank: ``A = [A_1; A_2; ...]`` and
        ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`` with scaling 1, so ``B A`` equals
        the weighted sum of the updates (Hugging Face calls this ``"cat"``). The
        rank of the result is the sum of the ranks.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, "
                             f"{len(weights)} weights")
        for n in adapters:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter {n!r}; known adapters: {sorted(self.adapters)}")
            cfg = self.adapters[n].config
            if cfg.peft_type != "LORA" or cfg.use_dora:
                raise ValueError(f"add_weighted_adapter combines plain LoRA adapters; "
                                 f"{n!r} is {cfg.peft_type}{' with DoRA' if cfg.use_dora else ''}")
        states = [self.adapters[n] for n in adapters]
        paths = sorted({p for s in states for p in s.slots})
        rank = sum(s.config.r for s in states)
        self.add_adapter(adapter_name, LoraConfig(r=rank, lora_alpha=rank, target_modules=paths))
        for path in paths:
            new = self.adapters[adapter_name].slots[path]
            blocks_A, blocks_B = [], []
            for s, w in zip(states, weights):
                layer = s.slots.get(path)
                if layer is None:
                    blocks_A.append(np.zeros((s.config.r, new.in_features), new.A.dtype))
                    blocks_B.append(np.zeros((new.out_features, s.config.r), new.B.dtype))
                else:
                    blocks_A.append(layer.A)
                    blocks_B.append(w * layer.scaling * layer.B)
            new.A[...] = np.concatenate(blocks_A, axis=0)       # (sum r, in)
            new.B[...] = np.concatenate(blocks_B, axis=1)       # (out, sum r)

    # ---- switching off and the all-or-nothing walk ---------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model computes exactly the base model's outputs.

        A merged adapter is taken out of the weights for the block and its merged
        weights put back, bit for bit, afterwards. Blocks nest: only the outermost
        one switches the adapters back on.
        """
        if self._disabled:                  # an inner block: the outer one decides
            yield self
            return
        merged = self._merged_wrappers()
        saved = [(w, *_base_weights(w)) for w in merged]
        self._apply_all(merged, "unmerge_in_place")
        wrappers = [w for _, w in self.wrappers()]
        for w in wrappers:
            w.disabled = True
        self._disabled = True
        try:
            yield self
        finally:
            for w in wrappers:
                w.disabled = False
            self._disabled = False
            for w, W, b in saved:           # exactly the merged weights again
                w.set_base_weights(W, b)
                w.merged = True

    def _merged_wrappers(self):
        return [w for _, w in self.wrappers() if getattr(w, "merged", False)]

    def _apply_all(self, wrappers, operation):
        """``wrapper.<operation>()`` for every wrapper, or for none: all are asked first
        (``check_merge``), and if one still fails the weights and flags written so far
        are put back from copies (exactly, not by subtracting the update again)."""
        merging = operation == "merge_in_place"
        for w in wrappers:
            w.check_merge(merging)
        saved = [(w, *_base_weights(w), w.merged) for w in wrappers]
        try:
            for w in wrappers:
                getattr(w, operation)()
        except BaseException:
            for w, W, b, flag in saved:
                w.set_base_weights(W, b)
                w.merged = flag
            raise

    # ---- merging -----------------------------------------------------------
    def _mergeable_wrappers(self):
        for name in self.active_adapters:
            if not self.adapters[name].config.mergeable:
                raise ValueError(f"adapter {name!r} ({self.adapters[name].config.peft_type}) "
                                 f"cannot be merged into the weights")
        return [w for _, w in self.wrappers() if getattr(w, w.adapter_attr) is not None]

    def merge_adapter(self):
        """Fold the active adapter into the base weights (no inference overhead); every
        target is checked before one is merged, so a failure merges nothing."""
        self._apply_all(self._mergeable_wrappers(), "merge_in_place")

    def unmerge_adapter(self):
        self._apply_all(self._mergeable_wrappers(), "unmerge_in_place")

    def merge_and_unload(self):
        """Return the plain base model with the active adapter folded into its weights."""
        wrappers = self._mergeable_wrappers() and self.wrappers()
        for path, w in wrappers:
            method = method_for(type(w).peft_type)
            replacement = (method.merge_and_unload_module(w) if getattr(w, w.adapter_attr) is not None
                           else w.base_layer)
            set_submodule(self.base_model, path, replacement)
        return self.unload_model()

    def unload(self):
        """Return the base model without any adapter (nothing merged)."""
        for path, w in self.wrappers():
            if getattr(w, "merged", False):
                w.unmerge_in_place()
            set_submodule(self.base_model, path, w.base_layer)
        return self.unload_model()

    def unload_model(self):
        model = self.base_model
        model.unfreeze()
        self.adapters, self.active_adapters = {}, []
        return model
